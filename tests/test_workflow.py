"""The Snakemake workflow through its command line: lint, dry runs, settings validation, one smoke run."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COPIED = ("Snakefile", "workflow", "config", "profiles", "envs", "benchmarks")  # benchmarks: rates.yaml (runtimes)


def snakemake(workdir: Path, *args: str, check: bool = True) -> tuple[int, str]:
    """Exit code and the whole output (stdout + stderr) of a snakemake command."""
    result = subprocess.run(["snakemake", *args], cwd=workdir, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{output}")
    return result.returncode, output


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name in COPIED:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    return tmp_path


def write_config(workdir: Path, name: str, base: str = "config/smoke.yaml", **sections) -> str:
    config = yaml.safe_load((REPO / base).read_text())
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path = workdir / "config" / name
    path.write_text(yaml.safe_dump(config))
    return f"config/{name}"


def test_lint_is_clean():
    code, output = snakemake(REPO, "--lint", "--configfile", "config/smoke.yaml", check=False)
    assert code == 0, output


def test_paper_preset_dry_run_lists_every_job(workdir):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    counts = job_counts(snakemake(workdir, "-n", "--configfile", "config/config.yaml")[1])
    models, settings = len(config["models"]), len(config["settings"])
    steps = len(config["sampling"]["steps"])
    shards = math.ceil(config["sampling"]["n_samples"] / config["sampling"]["shard_size"])
    assert counts["sample"] == counts["features"] * shards
    assert counts["convert_checkpoint"] == models and counts["tables"] == 1
    ablation = config["ablation_candidates"]
    extra = [s for s in ablation["settings"] if s not in config["settings"]]
    assert counts["quantize"] == models * settings + len(extra)
    assert counts["metrics"] == models * settings * steps + len(extra) * len(ablation["steps"])
    assert counts["paper_table"] == counts["tradeoff_plot"] == models and counts["ablation_table"] == 1
    assert counts["verify_download"] == counts["download"] - models  # checkpoints: verified by conversion


@pytest.mark.parametrize("target, expected", [("table_512", r"no model of preset 'smoke' has paper_resolution 512"),
                                              ("review", r"target review: this is preset 'smoke'"),
                                              ("smoke", None)])
def test_named_targets_of_the_smoke_preset(workdir, target, expected):
    code, output = snakemake(workdir, "-n", target, "--configfile", "config/smoke.yaml", check=False)
    if expected:
        assert code != 0 and re.search(expected, output), output
    else:
        assert code == 0 and job_counts(output)["benchmark_table"] == 1, output


def test_baselines_target_runs_the_baseline_settings_beside_the_smoke_ones(workdir):
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    smoke = job_counts(snakemake(workdir, "-n", "smoke", "--configfile", "config/smoke.yaml")[1])
    counts = job_counts(snakemake(workdir, "-n", "baselines", "--configfile", "config/smoke.yaml")[1])
    main = set(config["settings"]) | set(config["ablation_candidates"]["settings"])
    extra = set(config["baseline_settings"]) - main
    # tables/metrics.csv and tables/baselines.csv, and claims-baselines from both
    assert counts["quantize"] == len(main | extra) and counts["tables"] == 2 and counts["claims_table"] == 1
    assert counts["metrics"] == smoke["metrics"] + len(extra) * len(config["sampling"]["steps"])
    assert smoke["quantize"] == len(main)
    code, output = snakemake(workdir, "-n", "baselines", "--configfile", "config/config.yaml", check=False)
    assert code != 0 and "no config key 'baseline_settings'" in output


def test_review_preset_runs_the_headline_settings_once_with_claims_and_manifest(workdir):
    config = yaml.safe_load((REPO / "config/review.yaml").read_text())
    counts = job_counts(snakemake(workdir, "-n", "review", "--configfile", "config/review.yaml")[1])
    shards = math.ceil(config["sampling"]["n_samples"] / config["sampling"]["shard_size"])
    assert config["sampling"]["n_samples"] == 10000 and len(config["sampling"]["steps"]) == 1
    assert list(config["models"]) == ["DiT-XL-2-256"]
    assert counts["quantize"] == 5 and counts["sample"] == 5 * shards and counts["metrics"] == 5
    assert counts["claims_table"] == counts["manifest"] == counts["convert_checkpoint"] == 1


def test_table_256_needs_only_the_256_model(workdir):
    counts = job_counts(snakemake(workdir, "-n", "table_256", "--configfile", "config/config.yaml")[1])
    assert counts["convert_checkpoint"] == 1 and counts["paper_table"] == 1 and "tradeoff_plot" not in counts


def test_smoke_preset_dry_run_does_not_merge_the_paper_config(workdir):
    counts = job_counts(snakemake(workdir, "-n", "--configfile", "config/smoke.yaml")[1])
    assert "download" not in counts and counts["train_transformer"] == 1


@pytest.mark.parametrize(
    "row, message",
    [("rtn-w9\tmagic\t9\t\t\t\t\tunknown method", r"line {line} \(id 'rtn-w9'\).*'magic' is not one of"),
     ("rtn-wx\trtn\t\t\t\t\t\tmissing bits", r"line {line} \(id 'rtn-wx'\).*'bits' is a required property")],
)
def test_bad_settings_row_fails_before_any_job(workdir, row, message):
    table = workdir / "config" / "settings.tsv"
    text = table.read_text()
    table.write_text(text + row + "\n")
    message = message.format(line=len(text.splitlines()) + 1)
    code, output = snakemake(workdir, "--cores", "1", "--configfile", "config/smoke.yaml", check=False)
    assert code != 0 and re.search(message, output, re.S), output
    assert "settings.tsv" in output
    assert not (workdir / "results").exists()


def test_sample_count_above_n_samples_fails_before_any_job(workdir):
    config = write_config(workdir, "counts.yaml", metrics={"sample_counts": [900]})
    code, output = snakemake(workdir, "-n", "--configfile", config, check=False)
    assert code != 0 and "metrics.sample_counts" in output and "n_samples = 800" in output


def test_unknown_setting_id_in_config_is_named(workdir):
    config = write_config(workdir, "bad.yaml", settings=["fp", "vq-nope"])
    code, output = snakemake(workdir, "-n", "--configfile", config, check=False)
    assert code != 0 and "vq-nope" in output


def rule_threads_in_dry_run(output: str, rule: str) -> set[int]:
    """Thread counts of ``rule``'s jobs in a dry run (Snakemake prints ``threads:`` only above 1)."""
    blocks = [b for b in output.split("\n\n") if re.search(rf"^(local)?rule {rule}:", b, re.M)]
    return {int(m[1]) if (m := re.search(r"^\s+threads: (\d+)", b, re.M)) else 1 for b in blocks}


def test_config_threads_set_the_quantize_jobs_threads(workdir):
    paper = snakemake(workdir, "-n", "--cores", "8", "table_256")[1]
    assert rule_threads_in_dry_run(paper, "quantize") == {2}  # the default where config has no threads
    smoke = snakemake(workdir, "-n", "--cores", "2", "--configfile", "config/smoke.yaml")[1]
    assert yaml.safe_load((REPO / "config/smoke.yaml").read_text())["threads"]["quantize"] == 1
    assert rule_threads_in_dry_run(smoke, "quantize") == {1}
    assert rule_threads_in_dry_run(smoke, "train_transformer") == {2}
    config = write_config(workdir, "threads.yaml", threads={"quantize": 3})
    assert rule_threads_in_dry_run(snakemake(workdir, "-n", "--cores", "4", "--configfile", config)[1], "quantize") == {3}


def test_unknown_threads_key_is_named(workdir):
    config = write_config(workdir, "bad-threads.yaml", threads={"sample": 4})
    code, output = snakemake(workdir, "-n", "--configfile", config, check=False)
    assert code != 0 and "sample" in output and "threads" in output


def test_second_run_in_a_locked_folder_is_refused(workdir):
    """A run holding the folder (its output locks, as Snakemake's file persistence writes them) refuses a
    second run that would write the same files; ``--unlock`` clears a lock no live run holds."""
    target = "results/smoke/reference/digits.npz"
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text(target + "\n")
    code, output = snakemake(workdir, target, "--cores", "1", "--configfile", "config/smoke.yaml", check=False)
    assert code != 0 and "LockException" in output and "Directory cannot be locked" in output
    assert "--unlock" in output and not (workdir / target).exists()
    snakemake(workdir, target, "--unlock", "--configfile", "config/smoke.yaml")
    assert not (locks / "0.output.lock").exists()


@pytest.mark.e2e
def test_smoke_run_end_to_end(workdir):
    """Reduced smoke preset: table complete and finite; rerun is a no-op; a deleted shard reruns alone."""
    config = write_config(
        workdir, "tiny.yaml",
        models={"digits": {"source": "train", "reference": "digits",
                           "train": {"steps": 60, "batch_size": 32, "lr": 0.001, "seed": 0}}},
        feature_extractor={"train": {"steps": 60, "batch_size": 64, "lr": 0.002, "seed": 0}},
        sampling={"steps": [4, 8], "n_samples": 120, "shard_size": 60, "batch_size": 60},
        settings=["fp", "rtn-w2", "vq4dit-w2"],
        ablation_candidates={"settings": ["vq-codebook-w2", "vq4dit-w2"], "steps": [4]},
        calibration={"outer_iterations": 2, "steps": 4, "kmeans_iters": 10},
        metrics={"sample_counts": [24]},  # 120 x 10k/50k
    )
    settings = yaml.safe_load((workdir / config).read_text())["settings"]
    snakemake(workdir, "--cores", "2", "--configfile", config)
    csv = workdir / "results/smoke/tables/metrics.csv"
    table = pd.read_csv(csv)
    runs = [(s, n, c) for s in settings for n in (4, 8) for c in (24, 120)] + [("vq-codebook-w2", 4, c) for c in (24, 120)]
    assert sorted(zip(table.setting, table.steps, table.n_samples)) == sorted(runs)
    metrics = ["fid", "sfid", "is", "precision", "recall"]
    assert np.isfinite(table[metrics].to_numpy()).all()
    paper = pd.read_csv(workdir / "results/smoke/tables/paper-digits.csv")
    assert {"ours", "ours (all)"} <= set(paper["source"])
    for name in ("plots/tradeoff-digits.png", "plots/tradeoff-digits.pdf", "plots/samples/digits-steps4.png",
                 "plots/calibration-digits.png", "tables/metrics.md", "tables/metrics.tex", "tables/paper-digits.html",
                 "tables/ablation-candidates.md"):
        assert (workdir / "results/smoke" / name).stat().st_size > 0, name
    assert (workdir / "logs/smoke/quantize/digits/rtn-w2.log").is_file()
    jobs = pd.read_csv(workdir / "results/smoke/tables/benchmarks.csv")["job"]
    assert {"quantize/digits/vq4dit-w2", "tables/metrics", "train_transformer/digits"} <= set(jobs)
    ablation = pd.read_csv(workdir / "results/smoke/tables/ablation-candidates.csv")
    assert sorted(ablation["n"].unique()) == [1, 2]
    claims = pd.read_csv(workdir / "results/smoke/claims.csv")
    assert set(claims["verdict"]) <= {"holds", "does not hold", "not run", "not comparable"} and len(claims) >= 5
    assert {"w2: VQ4DiT < codebook-only", "w2: rtn worse than VQ4DiT", "w2: rtn collapses", "size: vq4dit-w2"} <= set(claims["id"])
    manifest = json.loads((workdir / "results/smoke/manifest.json").read_text())
    stages = [a["stage"] for a in manifest["artifacts"]]
    assert stages == sorted(stages, key=["prepare", "quantize", "sample", "features", "metrics"].index)
    assert {"prepare", "quantize", "sample", "features", "metrics"} == set(stages) and manifest["devices"]

    report = workdir / "results/smoke/report.html"
    snakemake(workdir, "--configfile", config, "--report", str(report))
    assert "results/smoke/tables/paper-digits.html" in report.read_text()

    assert "Nothing to be done" in snakemake(workdir, "--cores", "2", "--configfile", config)[1]

    (workdir / "results/smoke/samples/digits/rtn-w2/steps8/shard1.npz").unlink()
    counts = job_counts(snakemake(workdir, "-n", "--configfile", config)[1])
    assert counts == {"sample": 1, "features": 1, "metrics": 1, "tables": 1, "paper_table": 1, "tradeoff_plot": 1,
                      "claims_table": 1, "manifest": 1, "benchmark_table": 1, "all": 1}
    snakemake(workdir, "--cores", "2", "--configfile", config)
    pd.testing.assert_frame_equal(pd.read_csv(csv), table)
