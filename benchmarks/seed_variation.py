"""FID variation between sampling seeds on the smoke preset: same models, new samples.

Copies a finished smoke run (``--from``, default this checkout's ``results/smoke``: trained models,
quantized models, reference features, timestamps kept) into a fresh folder per seed, sets
``sampling.seed`` and lets Snakemake redo exactly what depends on it (sample -> features ->
metrics -> tables). Prints FID per (setting, steps) for every seed and its mean, standard
deviation and range; the README quotes the result.

    python benchmarks/seed_variation.py [--seeds 0 1 2] [--from results/smoke]
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
from smoke_run import REPO, copy_workflow  # the sibling script (benchmarks/ is on sys.path when run)
REUSED = ("models", "quantized", "reference", "features/reference")


def prepare(workdir: Path, source: Path, seed: int) -> str:
    copy_workflow(workdir)
    for part in REUSED:
        shutil.copytree(source / part, workdir / "results/smoke" / part, copy_function=shutil.copy2)
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    config["sampling"]["seed"] = seed
    (workdir / "config/seed.yaml").write_text(yaml.safe_dump(config))
    return "config/seed.yaml"


#: the method's claim at 2 bits, best first (lower FID)
ORDERING = ("vq4dit-w2", "vq-codebook-w2", "vq-kmeans-w2", "rtn-w2")


def ordering_holds(fid: pd.DataFrame) -> pd.DataFrame:
    """True where FID increases strictly along ORDERING, for every (steps, N) row and seed column.

    A missing FID counts as broken (NaN > 0 is False), never as a comparison skipped.
    """
    by_setting = fid.stack().unstack("setting")[list(ORDERING)]
    return by_setting.apply(lambda row: bool((row.diff().iloc[1:] > 0).all()), axis=1).unstack("seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--from", dest="source", type=Path, default=REPO / "results/smoke",
                        help="a finished smoke run's results folder")
    args = parser.parse_args()
    missing = [p for p in REUSED if not (args.source / p).is_dir()]
    if missing:
        sys.exit(f"{args.source}: missing {missing}; run `snakemake --cores 2 --configfile config/smoke.yaml` first")
    tables = []
    for seed in args.seeds:
        workdir = Path(tempfile.mkdtemp(prefix=f"vq4dit-seed{seed}-"))
        config = prepare(workdir, args.source, seed)
        start = time.perf_counter()
        subprocess.run(["snakemake", "results/smoke/tables/metrics.csv", "--cores", "2", "--configfile", config],
                       cwd=workdir, check=True, stdout=subprocess.DEVNULL)
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s in {workdir}", flush=True)
        tables.append(pd.read_csv(workdir / "results/smoke/tables/metrics.csv").assign(seed=seed))
    runs = pd.concat(tables)
    # one row per sample count (N): all samples and the paper-share subsets of metrics.sample_counts
    fid = runs.pivot_table(index=["setting", "steps", "n_samples"], columns="seed", values="fid", sort=False)
    summary = fid.assign(mean=fid.mean(axis=1), std=fid.std(axis=1), range=fid.max(axis=1) - fid.min(axis=1))
    print(summary.round(2).to_markdown())
    relative = (summary["std"] / summary["mean"]).round(3)
    print(f"\nstd / mean: median {relative.median():.3f}, max {relative.max():.3f}")
    print("\n2-bit ordering " + " < ".join(ORDERING) + " per (steps, N, seed):")
    print(ordering_holds(fid).replace({True: "holds", False: "BROKEN"}).to_markdown())


if __name__ == "__main__":
    main()
