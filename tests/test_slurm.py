"""The smoke DAG through a real single-node SLURM cluster (tests/slurm/cluster.sh), profile unchanged.

Run with ``pytest -m slurm`` as root on Debian (the cluster script installs SLURM if missing). One
run of a reduced smoke configuration (every rule, ``device: auto``) goes through ``sbatch`` with
``--workflow-profile profiles/slurm`` and only account and partition on the command line, while one
quantize and one sample job are killed (SIGKILL) mid-run; the tests then read ``sacct`` and compare
the metrics with a local run of the same configuration. A job cancelled with ``scancel`` is a strict
xfail: snakemake-executor-plugin-slurm 2.8.0 waits forever for it (see that test).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_workflow import REPO, snakemake, write_config, COPIED

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests/slurm/cluster.sh"
ACCOUNT = "vq4dit"
PROFILE = yaml.safe_load((REPO / "profiles/slurm/profile.yaml").read_text())
# The profile's status checks suit jobs of minutes to hours (the plugin's first check after 40 s,
# growing to 180 s while nothing finishes); the smoke jobs last seconds, so the tests check every 2 s.
FAST_STATUS = ("--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2")
GPU_RULES = [rule for rule, res in PROFILE["set-resources"].items() if res.get("gpu")]
SACCT_FIELDS = ["JobID", "State", "ExitCode", "ReqMem", "AllocTRES", "Comment"]
REDUCED = dict(
    device="auto",  # GPU rules ask SLURM for a GPU; torch finds no CUDA on the stand-in GPUs and runs on the CPU
    models={"digits": {"source": "train", "reference": "digits",
                       "train": {"steps": 60, "batch_size": 32, "lr": 0.001, "seed": 0}}},
    feature_extractor={"train": {"steps": 60, "batch_size": 64, "lr": 0.002, "seed": 0}},
    sampling={"steps": [4], "n_samples": 120, "shard_size": 60, "batch_size": 60},
    metrics={"sample_counts": [60]},  # the first shard: metrics at two counts, as the smoke preset has
    settings=["fp", "rtn-w2", "vq4dit-w2"],
    ablation_candidates={"settings": ["vq-codebook-w2", "vq4dit-w2"], "steps": [4]},
    calibration={"outer_iterations": 2, "steps": 4, "kmeans_iters": 10},
)


def run(*args: str, **kwargs) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs).stdout


@pytest.fixture(scope="session")
def cluster():
    """A running test cluster for the session, always stopped afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM suite needs root: tests/slurm/cluster.sh installs and starts the daemons")
    up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True)
    try:
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}{up.stderr}"
        yield
    finally:
        down = subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True)
        assert down.returncode == 0, down.stderr


def workflow_copy(folder: Path) -> Path:
    folder.mkdir()
    for name in COPIED:
        run("cp", "-r", str(REPO / name), str(folder / name))
    return folder


def sacct(since: str) -> pd.DataFrame:
    """One row per job (allocation) submitted since ``since``, with the rule taken from its comment."""
    out = run("sacct", "-X", "-n", "-P", "-S", since, "-o", ",".join(SACCT_FIELDS))
    rows = [dict(zip(SACCT_FIELDS, line.split("|"))) for line in out.splitlines() if line]
    table = pd.DataFrame(rows, columns=SACCT_FIELDS)
    table["rule"] = table.Comment.str.extract(r"rule_(\w+?)_wildcards", expand=False)
    table["rule"] = table.rule.fillna(table.Comment.str.extract(r"rule_(\w+)", expand=False))
    return table


class Faults(threading.Thread):
    """Mid-run faults: SIGKILL of the ``python -m vq4dit <stage>`` process of the first running quantize
    and sample job, once each (as the kernel's OOM killer would end them)."""

    def __init__(self, stages=("quantize", "sample")):
        super().__init__(daemon=True)
        self.stages = stages
        self.done: dict[str, str] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and len(self.done) < len(self.stages):
            out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i|%k"], capture_output=True, text=True).stdout
            for line in out.splitlines():
                job, comment = line.split("|", 1)
                for stage in self.stages:
                    if f"rule_{stage}_" in comment and stage not in self.done and self.kill_stage(job, stage):
                        self.done[stage] = job
            time.sleep(0.5)

    @staticmethod
    def kill_stage(job: str, stage: str) -> bool:
        """SIGKILL the job's ``python -m vq4dit <stage>`` process once it runs (PIDs from SLURM)."""
        out = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True).stdout
        pids = [line.split()[0] for line in out.splitlines()[1:]]
        for pid in pids:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if command[:4] == [b"python", b"-m", b"vq4dit", stage.encode()]:
                os.kill(int(pid), signal.SIGKILL)
                return True
        return False


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """The reduced smoke DAG through SLURM with two faults injected, and the same config run locally."""
    base = tmp_path_factory.mktemp("slurm")
    remote, local = workflow_copy(base / "remote"), workflow_copy(base / "local")
    config = write_config(remote, "slurm.yaml", **REDUCED)
    write_config(local, "slurm.yaml", **REDUCED)
    since = run("date", "+%Y-%m-%dT%H:%M:%S").strip()
    time.sleep(1)
    # the local reference, side by side with the SLURM run (whose jobs wait on the scheduler much of the time):
    # same config and seeds, each rule with the profile's thread count
    threads = [f"{rule}={n}" for rule, n in PROFILE["set-threads"].items()]
    local_log = (base / "local.log").open("w")  # a file, not a pipe: nothing read from it before the end
    reference = subprocess.Popen(["snakemake", "--cores", str(max(PROFILE["set-threads"].values())), "--configfile",
                                  config, "--set-threads", *threads], cwd=local, stdout=local_log,
                                 stderr=subprocess.STDOUT, text=True)
    faults = Faults()
    faults.start()
    code, output = snakemake(
        remote, "--workflow-profile", "profiles/slurm", "--configfile", config,
        "--default-resources", f"slurm_account={ACCOUNT}", "slurm_partition=cpu", *FAST_STATUS, check=False)
    faults.stop.set()
    jobs = sacct(since)
    reference.wait()
    local_log.close()
    assert reference.returncode == 0, (base / "local.log").read_text()[-5000:]
    return dict(code=code, output=output, jobs=jobs, faults=faults.done, remote=remote, local=local)


def test_every_job_went_through_sbatch_and_completed(slurm_run):
    assert slurm_run["code"] == 0, slurm_run["output"][-5000:]
    output, jobs = slurm_run["output"], slurm_run["jobs"]
    submitted = output.count("has been submitted with SLURM jobid")
    completed = jobs[jobs.State == "COMPLETED"]
    # every remote job has exactly one COMPLETED allocation; local rules (tables, plots) never reach SLURM
    remote_rules = set(jobs.rule)
    assert {"train_transformer", "quantize", "sample", "features", "reference_features", "metrics"} <= remote_rules
    assert not {"tables", "paper_table", "tradeoff_plot", "benchmark_table"} & remote_rules
    assert len(completed) == completed.Comment.nunique() == submitted - len(slurm_run["faults"]), jobs
    assert (slurm_run["remote"] / "results/smoke/tables/benchmarks.csv").is_file()


def test_gpu_rules_got_a_gpu_from_slurm(slurm_run):
    jobs = slurm_run["jobs"]
    completed = jobs[jobs.State == "COMPLETED"]
    gpu = completed.AllocTRES.str.contains("gres/gpu=1")
    assert set(completed[gpu].rule) == set(GPU_RULES) & set(completed.rule) == {
        "quantize", "sample", "features", "reference_features", "metrics"}, completed
    assert not gpu[~completed.rule.isin(GPU_RULES)].any()
    assert completed[completed.rule.isin(GPU_RULES)].AllocTRES.str.contains("cpu=8").all()


def test_metrics_equal_a_local_run(slurm_run):
    """Every column but the quantize timings, exactly (same seeds, same thread counts)."""
    remote, local = (pd.read_csv(slurm_run[k] / "results/smoke/tables/metrics.csv").filter(regex=r"^(?!.*_seconds$)")
                     for k in ("remote", "local"))
    # 4 runs (3 settings + the ablation's codebook-only row), each at all 120 samples and the first 60
    assert len(remote) == 4 * 2 and sorted(remote["n_samples"].unique()) == [60, 120]
    assert {"fid", "sfid", "is", "precision", "recall", "block_mse"} <= set(remote.columns)
    pd.testing.assert_frame_equal(remote, local)


def test_killed_jobs_are_retried_with_more_memory(slurm_run):
    jobs, faults = slurm_run["jobs"].set_index("JobID"), slurm_run["faults"]
    assert set(faults) == {"quantize", "sample"}, faults
    for rule, job in faults.items():
        hit = jobs.loc[job]
        assert hit.State == "FAILED" and hit.ExitCode != "0:0", hit
        retries = jobs[(jobs.Comment == hit.Comment) & (jobs.index != job)]
        assert list(retries.State) == ["COMPLETED"], retries
        base = int(PROFILE["set-resources"][rule]["mem_mb"].split("*")[0])
        assert mem_mb(hit.ReqMem) == base and mem_mb(retries.ReqMem.iloc[0]) == 2 * base, (hit, retries)


def mem_mb(text: str) -> float:
    """sacct's ReqMem (``32000M``, ``62.50G``) in MB."""
    return float(text[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[text[-1]]


@pytest.mark.xfail(strict=True, reason="snakemake-executor-plugin-slurm 2.8.0 compares sacct's state "
                   "'CANCELLED by <uid>' with 'CANCELLED' and keeps waiting for the job as if it still ran")
def test_cancelled_job_is_retried(cluster, tmp_path):
    workdir = workflow_copy(tmp_path / "w")
    config = write_config(workdir, "slurm.yaml", **REDUCED)
    since = run("date", "+%Y-%m-%dT%H:%M:%S").strip()
    time.sleep(1)
    command = ["timeout", "-k", "10", "60", "snakemake", "results/smoke/reference/digits.npz",
               "--workflow-profile", "profiles/slurm", "--configfile", config, "--default-resources",
               f"slurm_account={ACCOUNT}", "slurm_partition=cpu", *FAST_STATUS]
    snake = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cancelled = None
    while cancelled is None and snake.poll() is None:
        running = run("squeue", "-h", "-t", "R", "-o", "%i").split()
        if running:
            time.sleep(2)
            run("scancel", running[0])
            cancelled = running[0]
        time.sleep(0.5)
    output = snake.communicate()[0]
    run("scancel", "--user", "root")  # what the timeout left behind
    jobs = sacct(since)
    assert cancelled and snake.returncode == 0, output[-3000:]
    retry = jobs[(jobs.rule == "digits_reference") & (jobs.JobID != cancelled)]
    assert list(retry.State) == ["COMPLETED"] and mem_mb(retry.ReqMem.iloc[0]) == 16000, jobs


@pytest.mark.parametrize("resource, refusal, flag", [
    ("mem_mb=4000000", "Memory specification can not be satisfied", "--mem 4000000"),
    ("gpu=8", "Requested node configuration is not available", "--gpus=8"),
])
def test_request_beyond_the_node_fails_naming_rule_and_resource(cluster, tmp_path, resource, refusal, flag):
    """Refused at submission: Snakemake names the rule, the plugin SLURM's refusal and the sbatch call."""
    workdir = workflow_copy(tmp_path / "w")
    config = write_config(workdir, "slurm.yaml", **REDUCED)
    code, output = snakemake(
        workdir, "results/smoke/models/digits/transformer/config.json", "--workflow-profile", "profiles/slurm",
        "--configfile", config, "--default-resources", f"slurm_account={ACCOUNT}", "slurm_partition=cpu",
        *FAST_STATUS, "--set-resources", f"train_transformer:{resource}", check=False)
    assert code != 0
    assert re.search(rf"Error in rule train_transformer:.*SLURM sbatch failed.*{refusal}.*sbatch call:.*{flag}",
                     output, re.S), output[-3000:]


# What a CUDA runtime reports in a job on a GPU node: exactly the devices of CUDA_VISIBLE_DEVICES,
# renumbered from 0. torch sees no CUDA on the stand-in GPUs, so each job patches these two calls
# and then lets vq4dit choose its device as in a GPU rule.
DEVICE_PROBE = """
import json, os, sys, time
import torch
from vq4dit.io import resolve_device
visible = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: len(visible))
device = resolve_device("auto")
start = time.time()
time.sleep(4)  # hold the device while the other jobs choose theirs
record = dict(job=os.environ["SLURM_JOB_ID"], visible=visible, index=device.index,
              gpu=visible[device.index], start=start, end=time.time())
open(sys.argv[1], "w").write(json.dumps(record))
"""


@pytest.mark.parametrize("gpus_per_job", [1, 2])
def test_concurrent_gpu_jobs_each_use_the_gpu_slurm_gave_them(cluster, tmp_path, gpus_per_job):
    probe = tmp_path / "probe.py"
    probe.write_text(DEVICE_PROBE)
    jobs = 4 // gpus_per_job  # the node's 4 GPUs, all taken at once
    ids = [run("sbatch", "--parsable", "-A", ACCOUNT, "-p", "gpu", f"--gpus={gpus_per_job}", "--cpus-per-gpu=8",
               "--mem=32000", "-o", str(tmp_path / "%j.out"), "--wrap",
               f"python {probe} {tmp_path}/$SLURM_JOB_ID.json").strip() for _ in range(jobs)]
    deadline = time.monotonic() + 120
    while run("squeue", "-h", "-j", ",".join(ids)).strip() and time.monotonic() < deadline:
        time.sleep(1)
    records = []
    for job in ids:
        out = tmp_path / f"{job}.json"
        assert out.is_file(), (tmp_path / f"{job}.out").read_text()
        records.append(json.loads(out.read_text()))
    # all ran at once, each on a GPU of its own allocation, no two on the same GPU
    assert max(r["start"] for r in records) < min(r["end"] for r in records), records
    assert all(len(r["visible"]) == gpus_per_job and r["gpu"] in r["visible"] for r in records), records
    assert len({r["gpu"] for r in records}) == jobs, records
    allocated = [set(r["visible"]) for r in records]
    assert set().union(*allocated) == {"0", "1", "2", "3"} and sum(map(len, allocated)) == 4, records


# Time-limit runs: work sized from the speed measured just before (one thread, as the jobs), so that the first
# attempt is cut by SLURM's 1-minute minimum limit (enforced 60-90 s in) and the retry, resuming, finishes.
WORK_SECONDS = 150  # well past the 60-90 s at which SLURM cuts the first attempt, even if measured slow
SAMPLE_BATCH, SAMPLE_STEPS = 4, 50
LONG_CALIBRATION = dict(labels_per_trajectory=2, streams=1, steps=4, kmeans_iters=2,
                        checkpoint_minutes=60)  # no periodic checkpoint: only SIGTERM at the limit writes one
QUANTIZED = "results/smoke/quantized/digits/vq4dit-w2.safetensors"
SHARD = f"results/smoke/samples/digits/fp/steps{SAMPLE_STEPS}/shard0.npz"


def measured_work() -> tuple[int, int]:
    """(calibration outer iterations, shard images) each worth about WORK_SECONDS on this machine now."""
    import copy
    from vq4dit.methods.assignments import quantize_model_linears
    from vq4dit.methods.calibration import CalibrationConfig, calibrate
    from vq4dit.models import block_linear_names, build_transformer
    from vq4dit.sample import generate_shard

    model = build_transformer("DiT-digits", sample_size=8, in_channels=1, num_classes=10).eval()
    student = copy.deepcopy(model)
    vq, layers = quantize_model_linears(student, block_linear_names(student), k=256, d=4, n_candidates=2,
                                        kmeans_iters=1, seed=0)
    start = time.perf_counter()
    calibrate(model, student, vq, layers, CalibrationConfig(**{**LONG_CALIBRATION, "outer_iterations": 2}))
    trajectory = (time.perf_counter() - start) / 2
    start = time.perf_counter()
    generate_shard(model, None, 0, 0, SAMPLE_BATCH, SAMPLE_BATCH, SAMPLE_STEPS, 1.5, None)
    batch = time.perf_counter() - start
    return math.ceil(WORK_SECONDS / trajectory), SAMPLE_BATCH * math.ceil(WORK_SECONDS / batch)


def time_limited_profile(workdir: Path) -> None:
    """profiles/slurm with quantize and sample on one thread, their first attempt limited to 1 minute (no early
    --signal: SLURM's own SIGTERM at the limit, KillWait 5 s before SIGKILL), the retry to 15."""
    path = workdir / "profiles/slurm/profile.yaml"
    profile = yaml.safe_load(path.read_text())
    for rule in ("quantize", "sample"):
        profile["set-resources"][rule]["runtime"] = "1 if attempt == 1 else 15"
        profile["set-resources"][rule].pop("slurm_extra")
        profile["set-threads"][rule] = 1
    path.write_text(yaml.safe_dump(profile))


@pytest.fixture(scope="module")
def time_limit_run(cluster, tmp_path_factory):
    """A calibration and a sample shard longer than their 1-minute limit through SLURM."""
    outer_iterations, images = measured_work()
    workdir = workflow_copy(tmp_path_factory.mktemp("timeout") / "w")
    time_limited_profile(workdir)
    config = write_config(
        workdir, "timeout.yaml", **{**REDUCED, "settings": ["fp", "vq4dit-w2"],
                                    "calibration": {**LONG_CALIBRATION, "outer_iterations": outer_iterations},
                                    "sampling": {"steps": [SAMPLE_STEPS], "n_samples": images, "shard_size": images,
                                                 "batch_size": SAMPLE_BATCH}})
    since = run("date", "+%Y-%m-%dT%H:%M:%S").strip()
    time.sleep(1)
    code, output = snakemake(workdir, QUANTIZED, SHARD, "--workflow-profile", "profiles/slurm", "--configfile", config,
                             "--default-resources", f"slurm_account={ACCOUNT}", "slurm_partition=cpu", *FAST_STATUS,
                             check=False)
    run_ = dict(code=code, output=output, jobs=sacct(since), workdir=workdir,
                config=yaml.safe_load((workdir / config).read_text()))
    if code == 0:
        run_["uninterrupted"] = uninterrupted_runs(run_)
    return run_


def uninterrupted_runs(run_: dict) -> dict[str, Path]:
    """The quantize job and the shard once more outside SLURM, uninterrupted, side by side (one thread each, as
    the jobs had); the paths of their outputs."""
    from vq4dit.io import read_meta

    workdir, sampling = run_["workdir"], run_["config"]["sampling"]
    info = json.loads((workdir / QUANTIZED.replace(".safetensors", ".json")).read_text())
    outputs = {"quantize": workdir / "uninterrupted.safetensors", "sample": workdir / "uninterrupted.npz"}
    commands = {
        "quantize": ([sys.executable, "-m", "vq4dit", "quantize", "--transformer",
                      "results/smoke/models/digits/transformer/config.json", "--setting", json.dumps(info["setting"]),
                      "--calibration", json.dumps(run_["config"]["calibration"]), "--device", "cpu",
                      "--output", str(outputs["quantize"]), "--info", str(workdir / "uninterrupted.json")],
                     info["environment"]["threads"]),
        "sample": ([sys.executable, "-m", "vq4dit", "sample", "--transformer",
                    "results/smoke/models/digits/transformer/config.json", "--quantized",
                    "results/smoke/quantized/digits/fp.safetensors", "--steps", str(SAMPLE_STEPS),
                    "--cfg-scale", str(sampling["cfg_scale"]), "--seed", str(sampling["seed"]), "--start", "0",
                    "--count", str(sampling["n_samples"]), "--batch-size", str(SAMPLE_BATCH), "--device", "cpu",
                    "--output", str(outputs["sample"])], read_meta(workdir / SHARD)["threads"]),
    }
    logs = {name: workdir / f"uninterrupted-{name}.log" for name in commands}
    jobs = {}
    for name, (command, threads) in commands.items():
        with logs[name].open("w") as log:  # files, not pipes: neither job waits on the other's reader
            jobs[name] = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    for name, job in jobs.items():
        assert job.wait() == 0, (name, logs[name].read_text()[-3000:])
    return outputs


def assert_timed_out_then_completed(jobs: pd.DataFrame, rule: str, wildcard: str) -> None:
    states = list(jobs[(jobs.rule == rule) & jobs.Comment.str.contains(wildcard)].State)
    assert states == ["TIMEOUT", "COMPLETED"], (rule, jobs)


def test_calibration_cut_by_the_time_limit_resumes_to_an_uninterrupted_runs_tensors(time_limit_run):
    from safetensors.torch import load_file
    import torch

    run_ = time_limit_run
    assert run_["code"] == 0, run_["output"][-5000:]
    assert_timed_out_then_completed(run_["jobs"], "quantize", "vq4dit-w2")
    workdir = run_["workdir"]
    log = (workdir / "logs/smoke/quantize/digits/vq4dit-w2.log").read_text()
    assert "resuming calibration at optimiser step" in log  # from the checkpoint SIGTERM wrote at the limit
    cut, whole = load_file(str(workdir / QUANTIZED)), load_file(str(run_["uninterrupted"]["quantize"]))
    assert cut.keys() == whole.keys() and all(torch.equal(cut[k], whole[k]) for k in cut)


def test_sample_shard_cut_by_the_time_limit_resumes_to_an_uninterrupted_shard(time_limit_run):
    import numpy as np

    run_ = time_limit_run
    assert run_["code"] == 0, run_["output"][-5000:]
    assert_timed_out_then_completed(run_["jobs"], "sample", "fp")
    workdir = run_["workdir"]
    assert "resuming at image" in (workdir / f"logs/smoke/sample/digits/fp/steps{SAMPLE_STEPS}/shard0.log").read_text()
    assert not (workdir / (SHARD + ".partial")).exists()
    with np.load(workdir / SHARD) as cut, np.load(run_["uninterrupted"]["sample"]) as whole:
        np.testing.assert_array_equal(cut["arr_0"], whole["arr_0"])
        np.testing.assert_array_equal(cut["labels"], whole["labels"])
