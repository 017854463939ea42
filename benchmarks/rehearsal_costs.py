"""Time and peak memory of every job of the rehearsal (DiT-XL/2 at full size, random weights).

CPU (what the rehearsal preset runs):

    python benchmarks/rehearsal_costs.py --target table_256 [--workdir DIR]

GPU (device cuda; counts sized so the DAG fits a short GPU lease: 125 samples at 50 steps, the
paper's calibration loop for 2 trajectories (100 whole-model steps), 20 k-means iterations; ``--gpu-jobs``: the
number of GPUs; per-image and per-step costs without start-up come from ``sampling_bench.py`` and
``calibration_cost.py``, see ``gpu_session.sh``):

    python benchmarks/rehearsal_costs.py --target table_256 --gpu --cores 16

The review target (``config/review.yaml``: DiT-XL/2 256, FP, RTN W2, codebook-only, VQ4DiT W2 and W3, claims,
manifest) on the rehearsal's stand-in downloads, with counts cut further for one short lease
(``--base review``: 32 samples at 50 steps, 2 teacher trajectories, 20 calibration steps, 10 k-means iterations):

    python benchmarks/rehearsal_costs.py --base review --target review --gpu --cores 16 --workdir DIR
    python benchmarks/rehearsal_costs.py --base review --gpu --workdir DIR --no-run   # the table of what finished

Copies the workflow into a fresh folder (or uses --workdir, so a finished run is only re-read),
runs ``snakemake <target> --cores N --keep-going --configfile <config>``, and prints one row per job from
Snakemake's benchmark records (wall s, max RSS MiB, CPU s) and peak GPU memory where the job's
log has it. Rehearsal numbers say nothing about quality (random weights).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke_run import copy_workflow  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: the GPU run on top of each base preset: the paper's sampler and calibration loop, short budgets
GPU_OVERRIDES = {
    "rehearsal": {
        "device": "cuda",
        "sampling": {"steps": [50], "n_samples": 125, "shard_size": 125, "batch_size": 125, "precision": "tf32"},
        "calibration": {"outer_iterations": 2, "labels_per_trajectory": 4, "steps": 50, "kmeans_iters": 20},
        "metrics": {"batch_size": 250},
    },
    "review": {  # five quantize jobs and five sample sets in one lease of < 10 minutes
        "device": "cuda",
        "sampling": {"steps": [50], "n_samples": 32, "shard_size": 32, "batch_size": 32, "precision": "tf32"},
        "calibration": {"outer_iterations": 1, "labels_per_trajectory": 4, "steps": 20, "kmeans_iters": 10},
        "metrics": {"batch_size": 250},
    },
}
#: what a non-rehearsal base takes from config/rehearsal.yaml: every download stood in for, the notice
STAND_INS = ("references", "vae", "feature_extractor", "rehearsal", "notice")


def write_config(workdir: Path, gpu: bool, base: str = "rehearsal") -> str:
    """The run's config: config/<base>.yaml, its downloads replaced by the rehearsal's stand-ins, GPU counts."""
    rehearsal = yaml.safe_load((REPO / "config/rehearsal.yaml").read_text())
    if base == "rehearsal" and not gpu:
        return "config/rehearsal.yaml"
    config = yaml.safe_load((REPO / f"config/{base}.yaml").read_text())
    if base != "rehearsal":
        config["models"] = {m: rehearsal["models"][m] for m in config["models"]}
        config.update({key: rehearsal[key] for key in STAND_INS})
        config["references"] = {r: rehearsal["references"][r] for r in {m["reference"] for m in config["models"].values()}}
        for key in ("sampling", "metrics", "calibration"):
            config[key] = {**config[key], **rehearsal[key]}
    for key, value in (GPU_OVERRIDES[base] if gpu else {}).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    name = f"config/{base}-rehearsal{'-gpu' if gpu else ''}.yaml"
    (workdir / name).write_text(yaml.safe_dump(config, sort_keys=False))
    return name


def job_table(workdir: Path) -> pd.DataFrame:
    """One row per benchmark record below results/ (job, wall s, max RSS MiB, CPU s, peak GPU GiB)."""
    rows = []
    for path in sorted((workdir / "results").rglob("*.tsv")):
        if "benchmarks" not in path.as_posix():
            continue
        record = pd.read_csv(path, sep="\t").iloc[-1]
        job = path.relative_to(workdir / "results").with_suffix("").as_posix()
        rows.append({"job": job, "s": record["s"], "max_rss_mib": record["max_rss"], "cpu_s": record["cpu_time"],
                     "gpu_gib": peak_gpu(workdir, job)})
    return pd.DataFrame(rows)


def peak_gpu(workdir: Path, job: str) -> float | None:
    """The 'peak GPU memory X GiB' line the quantize and sample stages log on CUDA (None elsewhere)."""
    parts = job.split("/")
    if len(parts) < 4 or parts[1] != "benchmarks":
        return None
    log = workdir / "logs" / parts[0] / Path(*parts[2:]).with_suffix(".log")
    found = re.findall(r"peak GPU memory ([\d.]+) GiB", log.read_text()) if log.is_file() else []
    return float(found[-1]) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="table_256", help="table_256, table_512, review or all")
    parser.add_argument("--base", default="rehearsal", choices=sorted(GPU_OVERRIDES),
                        help="preset whose settings run on the stand-ins (review: config/review.yaml)")
    parser.add_argument("--gpu", action="store_true", help="device cuda and the short-lease counts of GPU_OVERRIDES")
    parser.add_argument("--workdir", type=Path, help="run here instead of a new temporary folder")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--gpu-jobs", type=int, default=1, help="GPUs of this machine (Snakemake resource gpu)")
    parser.add_argument("--no-run", action="store_true", help="only print the table of the jobs that finished in --workdir")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vq4dit-rehearsal-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "Snakefile").is_file():
        copy_workflow(workdir)
    config = write_config(workdir, args.gpu, args.base)
    status = 0
    if not args.no_run:
        start = time.perf_counter()
        status = subprocess.run(["snakemake", args.target, "--cores", str(args.cores), "--resources", f"gpu={args.gpu_jobs}",
                                 "--keep-going", "--configfile", config], cwd=workdir, stdout=subprocess.DEVNULL).returncode
        print(f"workdir: {workdir}\n{args.target} ({config}): exit {status} after {time.perf_counter() - start:.0f} s "
              f"on {args.cores} cores\n")
    table = job_table(workdir)
    print(table.to_markdown(index=False, floatfmt=".1f") if not table.empty else "no job finished")
    sample = table[table["job"].str.contains("/benchmarks/sample/")] if not table.empty else table
    if args.gpu and not sample.empty:
        per_shard = GPU_OVERRIDES[args.base]["sampling"]["shard_size"]
        print(f"\nsampling: {per_shard / sample['s'].median():.2f} images/s (median shard, incl. start-up)")
    return status


if __name__ == "__main__":
    sys.exit(main())
