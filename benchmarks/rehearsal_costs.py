"""Time and peak memory of every job of the rehearsal (DiT-XL/2 at full size, random weights).

CPU (what the rehearsal preset runs):

    python benchmarks/rehearsal_costs.py --target table_256 [--workdir DIR]

GPU (device cuda; counts sized so the DAG fits a short GPU lease: 125 samples at 50 steps, the
paper's calibration loop for 2 trajectories (100 whole-model steps), 20 k-means iterations; ``--gpu-jobs``: the
number of GPUs; per-image and per-step costs without start-up come from ``sampling_bench.py`` and
``calibration_cost.py``, see ``gpu_session.sh``):

    python benchmarks/rehearsal_costs.py --target table_256 --gpu --cores 16

Copies the workflow into a fresh folder (or uses --workdir, so a finished run is only re-read),
runs ``snakemake <target> --cores N --configfile <config>``, and prints one row per job from
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
#: the GPU run on top of config/rehearsal.yaml: the paper's sampler and calibration loop, short budgets
GPU_OVERRIDES = {
    "device": "cuda",
    "sampling": {"steps": [50], "n_samples": 125, "shard_size": 125, "batch_size": 125, "precision": "tf32"},
    "calibration": {"outer_iterations": 2, "labels_per_trajectory": 4, "steps": 50, "kmeans_iters": 20},
    "metrics": {"batch_size": 250},
}


def write_config(workdir: Path, gpu: bool) -> str:
    config = yaml.safe_load((REPO / "config/rehearsal.yaml").read_text())
    if not gpu:
        return "config/rehearsal.yaml"
    for key, value in GPU_OVERRIDES.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (workdir / "config/rehearsal-gpu.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return "config/rehearsal-gpu.yaml"


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
    parser.add_argument("--target", default="table_256", help="table_256, table_512 or all")
    parser.add_argument("--gpu", action="store_true", help="device cuda and the short-lease counts of GPU_OVERRIDES")
    parser.add_argument("--workdir", type=Path, help="run here instead of a new temporary folder")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--gpu-jobs", type=int, default=1, help="GPUs of this machine (Snakemake resource gpu)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vq4dit-rehearsal-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "Snakefile").is_file():
        copy_workflow(workdir)
    config = write_config(workdir, args.gpu)
    start = time.perf_counter()
    subprocess.run(["snakemake", args.target, "--cores", str(args.cores), "--resources", f"gpu={args.gpu_jobs}",
                    "--configfile", config], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    print(f"workdir: {workdir}\n{args.target} ({config}): {wall:.0f} s on {args.cores} cores\n")
    table = job_table(workdir)
    print(table.to_markdown(index=False, floatfmt=".1f"))
    sample = table[table["job"].str.contains("/benchmarks/sample/")]
    if args.gpu and not sample.empty:
        per_shard = GPU_OVERRIDES["sampling"]["shard_size"]
        print(f"\nsampling: {per_shard / sample['s'].median():.2f} images/s (median shard, incl. start-up)")


if __name__ == "__main__":
    sys.exit(main())
