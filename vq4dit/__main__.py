"""Command line: ``python -m vq4dit [--debug] <stage> [options]``, one sub-command per pipeline stage.

Expected failures (``EXPECTED_ERRORS``: a bad file, key or value is a ``ValueError``; a missing,
unreadable or unreachable file an ``OSError``) end the command with one line on stderr naming what
failed and a non-zero exit; ``--debug`` shows their traceback. Anything else is a bug and keeps its traceback.
"""

import argparse
import importlib
import logging
import os
import sys

STAGES = {
    "prepare": "train (smoke) or download (paper) the models and reference data",
    "quantize": "quantize one model with one setting of config/settings.tsv",
    "sample": "generate one shard of samples",
    "features": "extract metric features of a sample set",
    "metrics": "FID, sFID, IS, Precision, Recall of one sample set",
    "tables": "collect all metrics into CSV, Markdown and LaTeX tables",
    "plots": "trade-off plots and sample grids",
    "claims": "one verdict per claim of the paper this preset can test (claims.csv, .md, .html)",
    "manifest": "the run's provenance: sha256 of every artifact, settings, versions, devices, numerics",
    "rehearsal": "write the rehearsal preset's stand-in downloads (random weights, full size)",
    "size": "model size by the paper's convention (shapes only)",
    "cost": "what a target will cost (jobs x measured rates), before any job runs",
    "compare-manifests": "the first artifact in DAG order where two runs' manifests differ",
}
#: commands whose module is not named like them: command -> (module, suffix of its add_arguments/run functions)
ENTRY_POINTS = {"compare-manifests": ("manifest", "compare")}
#: the exceptions stages raise for a user's input or environment (not bugs)
EXPECTED_ERRORS = (ValueError, OSError)
#: exit status of an expected failure; commands with a convention of their own: command -> status
EXIT_FAILURE = 1
EXIT_FAILURE_OF = {"compare-manifests": 2}  # as diff and cmp: 1 means "differ", 2 "trouble"


def cap_threads() -> None:
    """At most one compute thread per CPU this process may run on (read by torch at import).

    Snakemake sets OMP_NUM_THREADS to the rule's threads; a job given more threads than its CPU
    mask holds (a node that declares more CPUs than it has, e.g. the SLURM test cluster) would
    otherwise oversubscribe the cores. On a cluster with CPU binding the mask is the allocation.
    """
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit():
        os.environ["OMP_NUM_THREADS"] = str(max(1, min(int(requested), len(os.sched_getaffinity(0)))))


def main(argv: list[str] | None = None) -> None:
    """Parse the stage name, import only that stage's module and run it."""
    cap_threads()
    parser = argparse.ArgumentParser(prog="python -m vq4dit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected failures too")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    argv = sys.argv[1:] if argv is None else argv
    stage = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == stage:
            module_name, suffix = ENTRY_POINTS.get(name, (name, ""))
            module = importlib.import_module(f"vq4dit.{module_name}")
            suffix = f"_{suffix}" if suffix else ""
            getattr(module, f"add{suffix}_arguments")(stage_parser)
            stage_parser.set_defaults(run=getattr(module, f"run{suffix}"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except EXPECTED_ERRORS as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message's own line breaks
        print(f"vq4dit {args.stage}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(EXIT_FAILURE_OF.get(args.stage, EXIT_FAILURE))


def exit_now() -> None:
    """Flush the standard streams and log handlers, then end the successful process without interpreter teardown.

    Teardown with torch and diffusers loaded (module and C++ static destructors) takes about 1.1 s per
    process, 0.4 s with torch alone (benchmarks/README.md, "The slower 2-core machine, emulated"): paid by
    every job, a twelfth of a smoke sample job. Each stage has closed its outputs when it returns (atomic writes),
    and none registers exit handlers or starts non-daemon threads, so nothing else is left to finalise.
    Under a profiler or tracer (cProfile, coverage), which write their results at teardown, it returns.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if sys.getprofile() is None and sys.gettrace() is None:
        os._exit(0)


if __name__ == "__main__":
    main()
    exit_now()
