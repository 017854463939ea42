"""Cost: parsing Snakemake's dry run, pricing jobs from benchmarks/rates.yaml, and the command on real targets."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vq4dit import cost

REPO = Path(__file__).resolve().parents[1]
DRY_RUN = """
Building DAG of jobs...
Job stats:
job         count
--------  -------
quantize        1
sample          2
total           3

[Tue Dec  1 04:07:35 2026]
rule quantize:
    input: results/review/models/DiT-XL-2-256/transformer/config.json
    output: results/review/quantized/DiT-XL-2-256/vq4dit-w2.safetensors, results/review/quantized/DiT-XL-2-256/vq4dit-w2.json
    jobid: 3
    reason: Forced execution
    wildcards: preset=review, model=DiT-XL-2-256, setting=vq4dit-w2
    resources: tmpdir=<TBD>, gpu=1

[Tue Dec  1 04:07:35 2026]
rule sample:
    output: results/review/samples/DiT-XL-2-256/fp/steps50/shard3.npz
    wildcards: preset=review, model=DiT-XL-2-256, setting=fp, steps=50, shard=3
    resources: tmpdir=<TBD>, gpu=1

[Tue Dec  1 04:07:35 2026]
localrule tables:
    output: results/review/tables/metrics.csv
    wildcards: preset=review
    resources: tmpdir=<TBD>
Shell command: python -m vq4dit tables metrics ...

[Tue Dec  1 04:07:35 2026]
localrule review:
    jobid: 0
"""


def pricer(overrides=None) -> cost.Pricer:
    config = yaml.safe_load((REPO / "config/review.yaml").read_text())
    rates = yaml.safe_load((REPO / "benchmarks/rates.yaml").read_text())
    return cost.Pricer(config, rates, cost.settings_table({"settings_table": str(REPO / "config/settings.tsv")}),
                       overrides)


def test_dry_run_blocks_give_rule_wildcards_and_gpu():
    jobs = cost.parse_dry_run(DRY_RUN)
    assert [j.rule for j in jobs] == ["quantize", "sample", "tables", "review"]
    assert jobs[1].wildcards == {"preset": "review", "model": "DiT-XL-2-256", "setting": "fp", "steps": "50", "shard": "3"}
    assert [j.gpu for j in jobs] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="lists no jobs"):
        cost.parse_dry_run("Nothing to be done (all requested files are present and up to date).")


def test_jobs_are_priced_from_the_rates_and_overrides_are_said():
    p = pricer()
    rates = yaml.safe_load((REPO / "benchmarks/rates.yaml").read_text())["h200"]
    sample = p.price(cost.parse_dry_run(DRY_RUN)[1])
    assert sample.seconds == pytest.approx(15 + 2500 * 50 / rates["sampling_image_steps_per_s"]["256-tf32"]["value"])
    assert sample.disk == 0  # review keeps features only
    quantize = cost.parse_dry_run(DRY_RUN)[0]
    calibrated = p.price(quantize).seconds
    assert calibrated > 50_000 * rates["calibration"]["ms_per_step"]["value"] / 1000  # the estimate dominates
    assert any("ESTIMATE" in e for e in p.estimates)
    faster = pricer({"calibration.ms_per_step": 100.0})
    estimate = rates["calibration"]["ms_per_step"]["value"] / 1000
    assert calibrated - faster.price(quantize).seconds == pytest.approx(50_000 * (estimate - 0.100))
    assert any("set with --rate" in e for e in faster.estimates)


def test_cost_table_counts_gpu_hours_of_gpu_jobs_only_and_lists_jobs_without_rate():
    jobs = cost.parse_dry_run(DRY_RUN) + [cost.Job("quantize", {"model": "DiT-XL-2-256", "setting": "rtn-w2"}, 1)]
    p = pricer()
    p.settings.loc["new-w2"] = {"id": "new-w2", "method": "new-method", "bits": "2"}  # a method with no rate yet
    jobs.append(cost.Job("quantize", {"model": "DiT-XL-2-256", "setting": "new-w2"}, 1))
    table, unpriced = cost.cost_table(jobs, p)
    assert table.loc[("tables", ""), "gpu_hours"] == 0 and table.loc[("tables", ""), "hours"] > 0
    assert table.loc[("sample", "DiT-XL-2-256, 50 steps"), "gpu_hours"] == pytest.approx(
        table.loc[("sample", "DiT-XL-2-256, 50 steps"), "hours"])
    assert "review" not in table.index.get_level_values("rule")  # target rules cost nothing
    assert len(unpriced) == 1 and "new-method" in unpriced[0]
    text = cost.report("review", "config/review.yaml", table, unpriced, p)
    assert "left out of the total (no rate): 1 job(s)" in text and "NVIDIA H200" in text


@pytest.mark.parametrize("target", ["review", "all"])
def test_cost_command_prints_a_total_in_gpu_hours_and_every_job_fits_the_slurm_profile(target):
    result = subprocess.run([sys.executable, "-m", "vq4dit", "cost", target, "--profile", "profiles/slurm"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    total = re.search(r"^total: ([\d.]+) GPU-hours on one NVIDIA H200", result.stdout, re.M)
    assert total and float(total.group(1)) > 0, result.stdout
    assert "| quantize DiT-XL-2-256 vq4dit-w2" in result.stdout
    assert "safety factor 3; max_runtime 1440 min): no job exceeds its runtime" in result.stdout
    features_512 = re.findall(r"^\| features DiT-XL-2-512, \d+ steps +\| +\d+ \|[^|]+\|[^|]+\|[^|]+\| +([\d.]+) \|",
                              result.stdout, re.M)
    assert target == "review" or (features_512 and max(map(float, features_512)) <= 8), result.stdout  # issue 23's bar


def test_runtimes_are_the_predictions_times_the_safety_factor_times_attempt_capped_at_max_runtime():
    p = pricer()
    sample, quantize = (cost.Job("sample", {"model": "DiT-XL-2-256", "setting": "fp", "steps": "250", "shard": "0"}),
                        cost.Job("quantize", {"model": "DiT-XL-2-256", "setting": "vq4dit-w2"}))
    seconds = p.price(sample).seconds
    assert cost.runtime_minutes(p, "sample", sample.wildcards) == math.ceil(seconds * 3 / 60)
    assert cost.runtime_minutes(p, "sample", sample.wildcards, attempt=2) == math.ceil(seconds * 6 / 60)
    p.config["runtime"] = {"safety_factor": "2", "max_runtime": "100"}  # as Snakemake's --config gives them: text
    assert cost.runtime_minutes(p, "sample", sample.wildcards) == math.ceil(seconds * 2 / 60)
    assert cost.runtime_minutes(p, "quantize", quantize.wildcards) == 100  # 1.6 h x 2 > 100 min
    assert cost.runtime_minutes(p, "quantize", {"model": "DiT-XL-2-256", "setting": "fp"}) == cost.MIN_RUNTIME
    fitting = [cost.Job("sample", sample.wildcards, gpu=1, runtime=math.ceil(seconds * 2 / 60)),
               cost.Job("tables", {"preset": "review"}, runtime=1)]
    assert cost.overruns(fitting, p, max_runtime=None) == []
    too_short = cost.Job("sample", sample.wildcards, gpu=1, runtime=math.ceil(seconds * 2 / 60) - 1)
    assert len(cost.overruns([too_short], p, max_runtime=None)) == 1
    found = cost.overruns(fitting + [quantize], p, max_runtime=math.ceil(seconds * 2 / 60) - 1)
    assert [line.split(" {")[0] for line in found] == ["sample", "quantize"]  # over the partition's limit
    assert "runtime None min" in found[1]  # a job given no runtime is held to max_runtime


def test_dry_run_runtimes_through_the_slurm_profile_are_the_cost_model_predictions_and_overruns_exit_non_zero():
    """The sample and quantize rules' runtime resource as Snakemake submits it = predicted time x 3 (the default
    factor), in minutes; with a partition limit (--max-runtime) below a job's need the command lists it and fails."""
    targets = "results/paper/samples/DiT-XL-2-512/vq4dit-w2/steps250/shard3.npz"
    jobs = cost.parse_dry_run(cost.dry_run(targets, "config/config.yaml", "Snakefile", False, "profiles/slurm"))
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    p = cost.Pricer(config, yaml.safe_load((REPO / "benchmarks/rates.yaml").read_text()), cost.settings_table(config))
    gpu_jobs = [j for j in jobs if j.rule in ("sample", "quantize")]
    assert sorted(j.rule for j in gpu_jobs) == ["quantize", "sample"]
    for job in gpu_jobs:
        assert job.runtime == math.ceil(p.price(job).seconds * 3.0 / 60), job
    result = subprocess.run([sys.executable, "-m", "vq4dit", "cost", targets, "--profile", "profiles/slurm",
                             "--max-runtime", "600"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "max_runtime 600 min): 1 job(s) exceed their runtime" in result.stdout  # quantize (21 h), not the shard (9 h)
    assert re.search(r"^  quantize \{.*'setting': 'vq4dit-w2'\}: needs \d+ min", result.stdout, re.M), result.stdout
    assert "1 job(s) exceed their runtime or max_runtime through profiles/slurm" in result.stderr


def test_cost_of_a_target_of_another_preset_names_it():
    result = subprocess.run([sys.executable, "-m", "vq4dit", "cost", "table_512", "--configfile", "config/smoke.yaml"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "no model of preset 'smoke' has paper_resolution 512" in result.stderr


def test_baselines_are_priced_by_their_passes_and_stored_sizes():
    """Q-DiT's search runs one GPTQ pass per candidate group size, its fixed configuration one; the disk
    counts fp16 scale and zero per row and group (written out here: 28 blocks of DiT-XL/2's 7 linears)."""
    p = pricer()
    job = lambda sid: cost.Job("quantize", {"model": "DiT-XL-2-256", "setting": sid}, 1)  # noqa: E731
    searched, fixed, gptq = (p.price(job(s)) for s in ("qdit-w2", "qdit-w2-g128", "gptq-w2"))
    passes = len(p.config.get("baselines", {}).get("qdit_group_sizes", [32, 64, 128, 256, 0]))
    assert searched.seconds - fixed.seconds == pytest.approx((passes - 1) * p.value("baselines", "gptq_pass_s"))
    assert fixed.seconds == pytest.approx(gptq.seconds)
    shapes = [(1152, 1152)] * 4 + [(4608, 1152), (1152, 4608), (6912, 1152)]  # q, k, v, out, fc1, fc2, adaLN
    rows_groups = sum(o * -(-i // 128) for o, i in shapes) * 28
    rows = sum(o for o, _ in shapes) * 28
    extra_bytes = (rows_groups - rows) * 32 / 8 + 28 * 7 * 32 / 8  # fp16 scale + zero per extra group; int32 group size
    assert fixed.disk - gptq.disk == pytest.approx(extra_bytes, rel=1e-9)
