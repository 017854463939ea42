"""Metric variation between sampling seeds: same models, new samples; writes the preset's seed-spread record.

Copies a finished run (``--from``, default this checkout's ``results/<preset>``: trained or converted
models, quantized models, reference images and features, timestamps kept; a ``resources/`` folder next
to its ``results/`` is linked, not copied) into a fresh folder per seed (a seed the finished run itself
sampled with is read from its tables, not redone), sets ``sampling.seed`` and lets Snakemake redo
exactly what depends on it (sample -> features -> metrics -> tables, and the run's manifest; where the
preset has ``baseline_settings``, the ``baselines`` target's table too). Prints FID per (setting, steps,
N) for every seed with mean, standard deviation and range, checks the 2-bit ordering per seed, compares the manifests of the first two seeds
(``python -m vq4dit compare-manifests``), and writes the **seed-spread record**
``config/seed_spread/<preset>.csv`` (``--record``): one row per (model, setting, steps, N, metric) with
the seeds, their values, mean and standard deviation (ddof 1). The claims stage
(``python -m vq4dit claims``) takes its noise from that record.

    python benchmarks/seed_variation.py [--configfile config/smoke.yaml] [--seeds 0 1 2] [--from results/smoke]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from smoke_run import REPO, copy_workflow  # the sibling script (benchmarks/ is on sys.path when run)

#: what a seed's folder reuses from the finished run (below results/<preset>)
REUSED = ("models", "quantized", "reference", "features/reference")
#: metrics recorded in the seed-spread record
METRICS = ("fid", "sfid", "is", "precision", "recall")


def prepare(workdir: Path, source: Path, configfile: Path, seed: int) -> tuple[str, str]:
    """The seed's folder: workflow, reused results, config with ``sampling.seed``; returns (config, preset)."""
    copy_workflow(workdir)
    config = yaml.safe_load(configfile.read_text())
    preset = config["preset"]
    for part in REUSED:
        if (source / part).is_dir():
            shutil.copytree(source / part, workdir / "results" / preset / part, copy_function=shutil.copy2)
    resources = source.parent.parent / "resources"
    if resources.is_dir():
        (workdir / "resources").symlink_to(resources.resolve())
    config["sampling"]["seed"] = seed
    (workdir / "config/seed.yaml").write_text(yaml.safe_dump(config))
    return "config/seed.yaml", preset


def sampled_seed(run: Path, tidy: list[str]) -> int | None:
    """The sampling seed of a finished run (its manifest's config) when it has every tidy table, else None."""
    manifest = run / "manifest.json"
    if not manifest.is_file() or not all((run / f"tables/{t}.csv").is_file() for t in tidy):
        return None
    newest_table = max((run / f"tables/{t}.csv").stat().st_mtime for t in tidy)
    samples = list((run / "samples").rglob("*.npz"))
    if samples and max(p.stat().st_mtime for p in samples) > newest_table:
        return None  # samples newer than the tables: not a finished run
    return json.loads(manifest.read_text())["config"]["sampling"]["seed"]


#: the method's claim at 2 bits, best first (lower FID)
ORDERING = ("vq4dit-w2", "vq-codebook-w2", "vq-kmeans-w2", "rtn-w2")


def ordering_holds(fid: pd.DataFrame) -> pd.DataFrame:
    """True where FID increases strictly along ORDERING, for every (steps, N) row and seed column.

    A missing FID counts as broken (NaN > 0 is False), never as a comparison skipped.
    """
    by_setting = fid.stack().unstack("setting").reindex(columns=list(ORDERING))
    return by_setting.apply(lambda row: bool((row.diff().iloc[1:] > 0).all()), axis=1).unstack("seed")


def spread_record(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: (model, setting, steps, n_samples, metric) -> seeds, values, mean, std (ddof 1), min, max."""
    keys = ["model", "setting", "steps", "n_samples"]
    long = runs.melt(id_vars=[*keys, "seed"], value_vars=[m for m in METRICS if m in runs.columns], var_name="metric")
    rows = []
    for key, group in long.groupby([*keys, "metric"], sort=False):
        group = group.sort_values("seed")
        values = group["value"]
        rows.append({**dict(zip([*keys, "metric"], key)), "seeds": " ".join(map(str, group["seed"])),
                     "values": " ".join(f"{v:.6g}" for v in values), "mean": values.mean(), "std": values.std(ddof=1),
                     "min": values.min(), "max": values.max()})
    return pd.DataFrame(rows)


def write_record(record: pd.DataFrame, path: Path, command: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    header = (f"# seed-spread record of benchmarks/seed_variation.py: the same models sampled with each seed\n"
              f"# command: {command}\n# date: {datetime.date.today()}; commit: {commit or '?'}; "
              f"machine: {platform.machine()}, {platform.processor() or platform.platform()}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + record.to_csv(index=False, float_format="%.6g"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", type=Path, default=REPO / "config/smoke.yaml", help="the preset of the run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--from", dest="source", type=Path, help="a finished run's results/<preset> folder")
    parser.add_argument("--record", type=Path, help="default: config/seed_spread/<preset>.csv of this checkout")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    preset = yaml.safe_load(args.configfile.read_text())["preset"]
    source = args.source or REPO / "results" / preset
    record_path = args.record or REPO / "config/seed_spread" / f"{preset}.csv"
    missing = [p for p in ("quantized", "features/reference") if not (source / p).is_dir()]
    if missing:
        sys.exit(f"{source}: missing {missing}; run `snakemake --cores 2 --configfile {args.configfile}` first")
    has_baselines = bool(yaml.safe_load(args.configfile.read_text()).get("baseline_settings"))
    tidy = ["metrics", "baselines"] if has_baselines else ["metrics"]
    tables, manifests = [], []
    for seed in args.seeds:
        if sampled_seed(source, tidy) == seed:
            run = source
            print(f"seed {seed}: the tables of {source} (sampled with seed {seed})", flush=True)
        else:
            workdir = Path(tempfile.mkdtemp(prefix=f"vq4dit-seed{seed}-"))
            config, _ = prepare(workdir, source, args.configfile, seed)
            start = time.perf_counter()
            targets = [f"results/{preset}/tables/{t}.csv" for t in tidy] + [f"results/{preset}/manifest.json"]
            subprocess.run(["snakemake", *targets, "--cores", str(args.cores), "--configfile", config],
                           cwd=workdir, check=True, stdout=subprocess.DEVNULL)
            print(f"seed {seed}: {time.perf_counter() - start:.0f} s in {workdir}", flush=True)
            run = workdir / "results" / preset
        seed_runs = pd.concat([pd.read_csv(run / f"tables/{t}.csv") for t in tidy])
        tables.append(seed_runs.drop_duplicates(["model", "setting", "steps", "n_samples"]).assign(seed=seed))
        manifests.append(run / "manifest.json")
    runs = pd.concat(tables)
    # one row per sample count (N): all samples and the paper-share subsets of metrics.sample_counts
    fid = runs.pivot_table(index=["setting", "steps", "n_samples"], columns="seed", values="fid", sort=False)
    summary = fid.assign(mean=fid.mean(axis=1), std=fid.std(axis=1), range=fid.max(axis=1) - fid.min(axis=1))
    print(summary.round(2).to_markdown())
    relative = (summary["std"] / summary["mean"]).round(3)
    print(f"\nstd / mean: median {relative.median():.3f}, max {relative.max():.3f}")
    print("\n2-bit ordering " + " < ".join(ORDERING) + " per (steps, N, seed):")
    print(ordering_holds(fid).replace({True: "holds", False: "BROKEN"}).to_markdown())
    if len(manifests) > 1:
        compare = [sys.executable, "-m", "vq4dit", "compare-manifests", str(manifests[0]), str(manifests[1])]
        print(f"\n$ python -m vq4dit compare-manifests {manifests[0]} {manifests[1]}", flush=True)
        if subprocess.run(compare).returncode > 1:  # 1: the seeds' samples differ, as expected; 2: bad input
            raise SystemExit("compare-manifests failed")
    if len(args.seeds) > 1:
        command = "python benchmarks/seed_variation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        write_record(spread_record(runs), record_path, command)
        print(f"\nwrote {record_path}")


if __name__ == "__main__":
    main()
