"""Command line: ``python -m vq4dit <stage> [options]``, one sub-command per pipeline stage."""

import argparse
import importlib
import logging
import sys

STAGES = {
    "prepare": "train (smoke) or download (paper) the models and reference data",
    "quantize": "quantize one model with one setting of config/settings.tsv",
    "sample": "generate one shard of samples",
    "features": "extract metric features of a sample set",
    "metrics": "FID, sFID, IS, Precision, Recall of one sample set",
    "tables": "collect all metrics into CSV, Markdown and LaTeX tables",
    "plots": "trade-off plots and sample grids",
    "rehearsal": "write the rehearsal preset's stand-in downloads (random weights, full size)",
    "size": "model size by the paper's convention (shapes only)",
}


def main(argv: list[str] | None = None) -> None:
    """Parse the stage name, import only that stage's module and run it."""
    parser = argparse.ArgumentParser(prog="python -m vq4dit", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    argv = sys.argv[1:] if argv is None else argv
    for name, help_text in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            module = importlib.import_module(f"vq4dit.{name}")
            module.add_arguments(stage_parser)
            stage_parser.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.run(args)


if __name__ == "__main__":
    main()
