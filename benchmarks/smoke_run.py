"""Wall time of the README's smoke command from scratch, and the resulting table.

Copies the workflow into a fresh folder (or uses --workdir), runs
``snakemake --cores 2 --configfile config/smoke.yaml`` there, and prints the wall time, the slowest
jobs (from Snakemake's benchmark records) and ``results/smoke/tables/metrics.md``.

    python benchmarks/smoke_run.py [--workdir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def copy_workflow(workdir: Path) -> None:
    """The files a run needs (Snakefile, rules, config, profiles, envs, the rates the runtimes come from) into ``workdir``."""
    for name in ("Snakefile", "workflow", "config", "profiles", "envs", "benchmarks"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, workdir / name)


def prepare_workdir(workdir: Path, seed: int | None) -> str:
    copy_workflow(workdir)
    if seed is None:
        return "config/smoke.yaml"
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    for section in (config["models"]["digits"]["train"], config["sampling"]):
        section["seed"] = seed
    (workdir / "config/smoke-seed.yaml").write_text(yaml.safe_dump(config))
    return "config/smoke-seed.yaml"


def slowest_jobs(results: Path, top: int = 8) -> pd.DataFrame:
    records = [pd.read_csv(p, sep="\t").assign(job=str(p.relative_to(results))) for p in results.rglob("*.tsv")]
    table = pd.concat(records)[["job", "s", "max_rss"]]
    return table.sort_values("s", ascending=False).head(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="run here instead of a new temporary folder")
    parser.add_argument("--seed", type=int, help="override the DiT training and sampling seeds")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vq4dit-smoke-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = prepare_workdir(workdir, args.seed)
    start = time.perf_counter()
    subprocess.run(["snakemake", "--cores", "2", "--configfile", config], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    print(f"workdir: {workdir}\nsmoke preset wall time: {wall:.0f} s ({wall / 60:.1f} min) on 2 cores\n")
    print("slowest jobs (s, max RSS MB):")
    print(slowest_jobs(workdir / "results/smoke/benchmarks").to_string(index=False), "\n")
    print((workdir / "results/smoke/tables/metrics.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
