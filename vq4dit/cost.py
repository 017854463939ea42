"""What a target will cost, before any job runs: ``python -m vq4dit cost <target> [--configfile …]``.

The jobs come from Snakemake's own DAG: a dry run of the target from scratch (``snakemake -n -F <target>
--configfile …``) lists every job with its rule, wildcards and resources. Each job is priced with the
rates recorded in ``benchmarks/rates.yaml`` (each names the device, date and command it was measured
with; estimates say so): a GPU preset by its rate model (images × steps / measured images·steps/s for
sampling, k-means and calibration from their measured parts, …), the smoke and rehearsal presets by
the measured mean of each rule's jobs. Printed per rule: jobs, seconds per job, hours, GPU-hours (jobs
that hold a GPU token), peak host memory and disk kept; then the total, the device the rates were
measured on, and every estimate the total includes. Jobs without a rate are listed and left out of the
total, never guessed.

    python -m vq4dit cost review                 # config/review.yaml
    python -m vq4dit cost all                    # config/config.yaml
    python -m vq4dit cost smoke                  # config/smoke.yaml
    python -m vq4dit cost table_256 --configfile config/rehearsal.yaml

Time limits: the GPU rules' ``runtime`` resource is :func:`runtime_minutes` (workflow/helpers/resources.smk),
the same prices × config key ``runtime.safety_factor`` × attempt, capped at ``runtime.max_runtime``. With
``--profile profiles/slurm`` the dry run goes through the profile and every job whose time does not fit its
runtime or the partition's limit (``--max-runtime``, else the profile's or the config's ``runtime.max_runtime``)
is listed, and the command exits 1:

    python -m vq4dit cost all --profile profiles/slurm [--max-runtime 1440]
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from vq4dit import size
from vq4dit.methods import REGISTRY

#: the preset a named target needs when no --configfile is given
DEFAULT_CONFIGS = {"smoke": "config/smoke.yaml", "review": "config/review.yaml"}
DEFAULT_CONFIG = "config/config.yaml"
#: bytes per image of the features stage's .npz (pool 2048 + spatial 2023 + logits 1008, float32)
FEATURE_BYTES = (2048 + 2023 + 1008) * 4
#: bytes of an .npz read at once by the features stage (features.CHUNK_BYTES; not imported: it needs torch)
READ_CHUNK_BYTES = 64 * 2**20
#: config key runtime.safety_factor's default (workflow/schemas/config.schema.yaml): an A100 in TF32
SAFETY_FACTOR = 3.0
#: minutes a job gets when the rates do not price it and no runtime.max_runtime is set
UNPRICED_RUNTIME = 24 * 60
#: the least runtime a job gets, minutes: a node's start-up (environment, a cold shared file system) is not in the rates
MIN_RUNTIME = 10
GB = 1e9
MIB = 2**20


@dataclass
class Job:
    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    gpu: int = 0
    runtime: int | None = None  # minutes, as the dry run gives it


def parse_dry_run(text: str) -> list[Job]:
    """The jobs of a ``snakemake -n`` listing: ``[local]rule NAME:`` blocks with ``wildcards:`` and ``resources:``."""
    jobs = []
    for block in re.split(r"\n\s*\n", text):
        header = re.search(r"^(?:local)?rule (\w+):$", block, re.M)
        if not header:
            continue
        job = Job(header.group(1))
        if wildcards := re.search(r"^\s+wildcards: (.*)$", block, re.M):
            job.wildcards = dict(item.split("=", 1) for item in wildcards.group(1).split(", ") if "=" in item)
        if gpu := re.search(r"^\s+resources: .*\bgpu=(\d+)", block, re.M):
            job.gpu = int(gpu.group(1))
        if runtime := re.search(r"^\s+resources: .*\bruntime=(\d+)", block, re.M):
            job.runtime = int(runtime.group(1))
        jobs.append(job)
    if not jobs:
        raise ValueError("the dry run lists no jobs (expected 'rule NAME:' blocks of `snakemake -n`)")
    return jobs


def dry_run(target: str, configfile: str, snakefile: str, remaining: bool, profile: str | None = None) -> str:
    command = ["snakemake", "-n", target, "--snakefile", snakefile]
    if not remaining:
        command.append("--forceall")
    if profile:
        command += ["--workflow-profile", profile]
    command += ["--configfile", configfile]  # last: it takes several values
    result = subprocess.run(command, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        errors = [i for i, line in enumerate(lines) if re.search(r"(Error|Exception)\b", line)]
        reason = " ".join(lines[errors[0]:errors[0] + 4]) if errors else " ".join(lines[-3:])
        raise ValueError(f"`{' '.join(command)}` failed: {reason.split(' Wildcards:')[0]}")
    return output


def read_yaml(path: str) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise OSError(f"{path}: cannot read ({err})") from err


@dataclass
class Price:
    seconds: float | None          # None: no rate
    gb: float | None = None        # peak host memory of the job
    disk: float = 0.0              # bytes the job leaves on disk
    basis: str = ""                # which rate


class Pricer:
    """Seconds, memory and disk of one job from the rates, for one preset's config."""

    def __init__(self, config: dict, rates: dict, settings: pd.DataFrame, overrides: dict[str, float] | None = None):
        self.config, self.rates, self.settings = config, rates, settings
        self.overrides = overrides or {}
        profile = rates["profiles"]
        device = str(config.get("device", "cpu"))
        self.name = profile["gpu"] if device.startswith("cuda") or device == "auto" else profile.get(config["preset"])
        self.profile = rates.get(self.name, {}) if self.name else {}
        self.device = rates["devices"].get(self.profile.get("device", ""), "?")
        self.estimates: set[str] = set()

    # -- per-rule means (CPU presets) -----------------------------------------------------------------

    def measured(self, job: Job) -> Price:
        rule = self.profile.get("rules", {}).get(job.rule)
        if rule is None:
            return Price(None, basis="no measured job of this rule")
        if job.rule == "quantize" and "by_method" in rule:
            method = self.setting(job)["method"]
            rule = rule["by_method"].get(method, rule)
        return Price(rule["s"], rule.get("gb"), rule.get("disk_mb", 0) * MIB, "measured mean per job")

    # -- the GPU rate model ---------------------------------------------------------------------------

    def price(self, job: Job) -> Price:
        if job.rule in TARGET_RULES:
            return Price(0.0, None, 0.0, "target")
        if self.name != "h200":
            return self.measured(job)
        if job.wildcards.get("model") in self.config["models"] and "arch" not in self.model(job):
            return Price(None, basis="the GPU rates price DiT models (models.<model>.arch) only")  # e.g. smoke on cuda
        model = getattr(self, f"_{job.rule}", None)
        if model is None:
            fallback = self.rates.get("rehearsal-cpu", {}).get("rules", {}).get(job.rule)
            if fallback:
                return Price(fallback["s"], fallback.get("gb"), 0.0, "rehearsal (CPU) mean")
            return Price(None, basis="no rate for this rule")
        return model(job)

    def value(self, *keys: str) -> float:
        entry = self.profile
        for key in keys:
            entry = entry[key]
        name = ".".join(keys)
        if name in self.overrides:
            self.estimates.add(f"{name} = {self.overrides[name]:g}, set with --rate (rates.yaml: "
                               f"{entry['value'] if isinstance(entry, dict) else entry})")
            return self.overrides[name]
        if isinstance(entry, dict) and entry.get("estimate"):
            self.estimates.add(f"{name} = {entry['value']}: {' '.join(entry['source'].split())}")
        return float(entry["value"] if isinstance(entry, dict) else entry)

    def memory(self, rule: str) -> float | None:
        return self.profile["host_memory_gb"]["by_rule"].get(rule)

    def setting(self, job: Job) -> pd.Series:
        sid = job.wildcards.get("setting")
        if sid not in self.settings.index:
            raise ValueError(f"setting {sid!r} of a {job.rule} job is not in {self.config['settings_table']}")
        return self.settings.loc[sid]

    def model(self, job: Job) -> dict:
        return self.config["models"][job.wildcards["model"]]

    def downloads(self) -> dict[str, dict]:
        """resources path -> file spec, as workflow/helpers/config.smk's downloads()."""
        files = {f"checkpoints/{m}.pt": s["checkpoint"] for m, s in self.config["models"].items() if "checkpoint" in s}
        files.update({f"reference/{n}.npz": s for n, s in self.config.get("references", {}).items()})
        files.update({f"vae/{n}": s for n, s in self.config.get("vae", {}).get("files", {}).items()})
        if weights := self.config["feature_extractor"].get("weights"):
            files[f"feature_extractor/{weights['file']}"] = weights
        return files

    def startup(self) -> float:
        return self.value("job_startup_s")

    def _download(self, job):
        spec = self.downloads().get(job.wildcards.get("download"), {})
        return Price(0.0, self.memory("download"), spec.get("size", 0), "network-bound: not estimated")

    def _verify_download(self, job):
        spec = self.downloads().get(job.wildcards.get("download"), {})
        hashing = spec.get("size", 0) / MIB / self.value("sha256_mib_per_s")
        return Price(self.value("verify_download_s") + hashing, self.memory("verify_download"), 0.0, "verify + sha256")

    def _convert_checkpoint(self, job):
        size_bytes = self.model(job)["checkpoint"].get("size") or self.value("checkpoint_bytes")
        return Price(self.value("convert_checkpoint_s"), self.memory("convert_checkpoint"), size_bytes, "measured")

    def _quantize(self, job):
        setting, model = self.setting(job), self.model(job)
        method = setting["method"]
        shapes = size.dit_block_linear_shapes(model["arch"])
        gb = self.profile["host_memory_gb"]["quantize_by_method"].get(method)
        seconds, nonblock = self.value("quantize_fixed_s"), self.value("nonblock_mib") * MIB
        spec = REGISTRY.get(method)
        if method == "fp":
            return Price(seconds, gb, size.fp_size(shapes)["total_mb"] * MIB + nonblock, "fixed part")
        if method == "rtn":
            disk = size.scalar_size(shapes, int(setting["bits"]))["total_mb"] * MIB + nonblock
            return Price(seconds + self.value("rtn_s"), gb, disk, "fixed + RTN")
        if spec is not None and (spec.hessians or method == "repq-vit"):
            return self._baseline(setting, model, shapes, seconds, gb, nonblock)
        if spec is None or spec.format != "vq":
            return Price(None, gb, 0.0, f"no rate for method {method!r}")
        k, d = int(setting["k"]), int(setting["d"])
        calib = {"kmeans_iters": 100, "outer_iterations": 1000, "steps": 50, **self.config.get("calibration", {})}
        seconds += self.kmeans_seconds(shapes, k, d, calib["kmeans_iters"])
        basis = "fixed + k-means (derived)"
        if spec.calibrated:
            factor = self.value("calibration", "resolution_factor_512") if model["image_size"] >= 512 else 1.0
            steps = calib["outer_iterations"] * calib["steps"]  # whole-model steps, each incl. its teacher forward
            seconds += factor * steps * self.value("calibration", "ms_per_step") / 1000
            basis += f" + {steps:,} calibration steps"
        return Price(seconds, gb, size.vq_size(shapes, k, d)["total_mb"] * MIB + nonblock, basis)

    def _baseline(self, setting, model, shapes, seconds: float, gb, nonblock: float) -> Price:
        """RepQ-ViT (RTN's rate), GPTQ (one pass), Q-DiT (one pass per candidate group size, or one with a fixed
        group), GPTVQ: the passes measured on all 196 DiT-XL/2 block linears, plus the Hessians' teacher
        trajectories at the sampling rate."""
        method, bits = setting["method"], setting.get("bits")
        if method == "repq-vit":
            disk = size.scalar_size(shapes, int(bits))["total_mb"] * MIB + nonblock
            return Price(seconds + self.value("rtn_s"), gb, disk, "fixed + RTN")
        options = {"qdit_group_sizes": [32, 64, 128, 256, 0], "qdit_budget_group_size": 128, "act_order": False,
                   "trajectories": 8, "labels_per_trajectory": 4, "steps": 50, **self.config.get("baselines", {})}
        rate = f"{model['image_size']}-tf32" if model["image_size"] >= 512 else "256-tf32"
        image_steps = options["trajectories"] * options["labels_per_trajectory"] * options["steps"]
        seconds += image_steps / self.value("sampling_image_steps_per_s", rate)
        if method == "gptvq":
            k, d = int(setting["k"]), int(setting["d"])
            disk = size.vq_size(shapes, k, d)["total_mb"] * MIB
            return Price(seconds + self.value("baselines", "gptvq_s"), gb, disk + nonblock, "fixed + Hessians + GPTVQ")
        raw = setting.get("group_size")  # text; "" (or missing) where a setting has none
        group = int(raw) if raw not in (None, "") and not pd.isna(raw) else None
        searched = method == "qdit" and group is None
        passes = len(options["qdit_group_sizes"]) if searched else 1
        group = options["qdit_budget_group_size"] if searched else group or 0
        overhead = [size.grouped_overhead_bits(s, group, options["act_order"]) for s in shapes]
        disk = size.scalar_size(shapes, int(bits), overhead)["total_mb"] * MIB + nonblock
        return Price(seconds + passes * self.value("baselines", "gptq_pass_s"), gb, disk,
                     f"fixed + Hessians + {passes} GPTQ pass{'es' if passes > 1 else ''}")

    def kmeans_seconds(self, shapes, k: int, d: int, iters: int) -> float:
        """Every layer: seeding (on <= 64 k points) + iters x (assignment ∝ weights·k, update ∝ sub-vectors)."""
        rate = self.profile["kmeans"]
        layers = sum(o * i for o, i in shapes) / rate["layer_weights"]
        per_layer_ms = rate["seeding_ms"] * k / 256 + iters * (rate["assign_ms"] * k / 256 + rate["update_ms"] * 4 / d)
        return layers * per_layer_ms / 1000

    def _sample(self, job):
        sampling, model = self.config["sampling"], self.model(job)
        start = int(job.wildcards["shard"]) * sampling["shard_size"]
        count = min(sampling["shard_size"], sampling["n_samples"] - start)
        steps, res = int(job.wildcards["steps"]), model["image_size"]
        key = f"{res}-{sampling.get('precision', 'fp32')}"
        rates = self.profile["sampling_image_steps_per_s"]
        image_bytes = count * res * res * 3
        disk = image_bytes if sampling.get("keep_samples", True) else 0.0
        gb = self.memory("sample") + 2 * image_bytes / GB
        if key not in rates:
            return Price(None, gb, disk, f"no sampling rate for {key}")
        return Price(self.startup() + count * steps / rates[key]["value"], gb, disk, f"{key} images x steps")

    def _features(self, job):
        n, res = self.config["sampling"]["n_samples"], self.model(job)["image_size"]
        return self.feature_pass(n, res)

    def _reference_features(self, job):
        n = self.value("reference_images")
        res = max((m.get("image_size", 256) for m in self.config["models"].values()
                   if m.get("reference") == job.wildcards.get("reference")), default=256)
        return self.feature_pass(n, res)

    def feature_pass(self, n: int, res: int) -> Price:
        """Inception over n images streamed from their files (features.ImageStream): memory is the measured job's
        (its images a few hundred, held whole) + the n images' features + one read chunk + one batch of images,
        uint8 as read and float32 at Inception's 299 px."""
        batch = self.config["metrics"]["batch_size"]
        streamed = READ_CHUNK_BYTES + batch * (res * res * 3 + 299 * 299 * 3 * 4)
        gb = self.memory("features") + (n * FEATURE_BYTES + streamed) / GB
        return Price(self.startup() + n / self.value("inception_images_per_s"), gb, n * FEATURE_BYTES,
                     "Inception images/s")

    def _metrics(self, job):
        n = self.config["sampling"]["n_samples"]
        counts = [n] + [c for c in self.config["metrics"].get("sample_counts", []) if c < n]
        parts = [self.metrics_at(c) for c in counts]
        return Price(self.startup() + sum(s for s, _ in parts), max(g for _, g in parts), 1e4, "CPU-measured metrics")

    def metrics_at(self, n: int) -> tuple[float, float]:
        """(seconds, GiB) at n samples: the measured count at or above n, else the largest scaled by (n / it)²."""
        by_count = {int(c): v for c, v in self.profile["metrics"]["by_count"].items()}
        above = [c for c in sorted(by_count) if c >= n]
        if above:
            return by_count[above[0]]["s"], by_count[above[0]]["gib"] * 2**30 / GB
        top = max(by_count)
        return by_count[top]["s"] * (n / top) ** 2, by_count[top]["gib"] * 2**30 / GB * n / top

    def _local(self, job):
        return Price(self.value("local_job_s"), self.memory(job.rule), 0.0, "small local job")

    _tables = _paper_table = _ablation_table = _benchmark_table = _claims_table = _local
    _tradeoff_plot = _sample_grid = _calibration_plot = _local

    def _manifest(self, job):
        return Price(self.startup(), self.memory("manifest"), 0.0, "sha256 of every artifact")  # + hashing: cost_table

    def hashing_seconds(self, disk_bytes: float) -> float:
        return disk_bytes / MIB / self.value("sha256_mib_per_s")


def runtime_settings(config: dict) -> tuple[float, int | None]:
    """(safety factor, max_runtime in minutes or None) of config key ``runtime``."""
    runtime = config.get("runtime") or {}  # numbers, or their text where they came from Snakemake's --config
    limit = runtime.get("max_runtime")
    return float(runtime.get("safety_factor", SAFETY_FACTOR)), int(limit) if limit else None


def runtime_minutes(pricer: Pricer, rule: str, wildcards: dict[str, str], attempt: int = 1) -> int:
    """A GPU job's ``runtime`` resource: its predicted time × the safety factor × attempt (at least MIN_RUNTIME),
    at most max_runtime.

    A job the rates do not price gets max_runtime (else UNPRICED_RUNTIME); ``cost --profile`` lists it. A sample
    shard must fit one attempt: its runtime is its own predicted time (× factor), so a shard that does not fit
    max_runtime is listed by ``cost --profile`` and wants a smaller ``sampling.shard_size`` — resuming a killed
    shard saves the work of a slow node or a preemption, it is not counted on to finish a shard.
    """
    factor, limit = runtime_settings(pricer.config)
    seconds = pricer.price(Job(rule, dict(wildcards))).seconds
    if seconds is None:
        return limit or UNPRICED_RUNTIME
    minutes = max(MIN_RUNTIME, math.ceil(seconds * factor * attempt / 60))
    return min(minutes, limit) if limit else minutes


def runtime_pricer(config: dict, rates: str) -> Pricer:
    """The pricer of a workflow's config, for its rules' ``runtime`` resources (workflow/helpers/resources.smk)."""
    return Pricer(config, read_yaml(rates), settings_table(config))


def overruns(jobs: list[Job], pricer: Pricer, max_runtime: int | None) -> list[str]:
    """Jobs whose predicted time exceeds their runtime (attempt 1, as the dry run gives it) or max_runtime (minutes).

    A GPU job's time is its predicted time × the safety factor (the slower GPU the factor covers); a CPU job's
    its predicted time.
    """
    factor, _ = runtime_settings(pricer.config)
    found = []
    for job in jobs:
        seconds = pricer.price(job).seconds
        limits = [m for m in (job.runtime, max_runtime) if m]
        if seconds is None or not limits or job.rule in TARGET_RULES:
            continue
        needed = seconds * (factor if job.gpu else 1.0) / 60
        if needed > min(limits):
            found.append(f"{job.rule} {job.wildcards}: needs {needed:.0f} min ({seconds:.0f} s predicted"
                         + (f" × {factor:g}" if job.gpu else "") + f"); runtime {job.runtime} min, max_runtime {max_runtime} min")
    return found


#: rules that only name outputs
TARGET_RULES = {"all", "smoke", "review", "claims", "table_256", "table_512", "ablation_candidates", "figure_tradeoff"}


def settings_table(config: dict) -> pd.DataFrame:
    path = config["settings_table"]
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except OSError as err:
        raise OSError(f"{path}: cannot read the settings table ({err})") from err
    return table.set_index("id", drop=False)


def cost_table(jobs: list[Job], pricer: Pricer) -> tuple[pd.DataFrame, list[str]]:
    """Per rule: jobs, seconds per job, hours, GPU-hours, peak host GB, disk GB; and the rules without a rate."""
    rows, unpriced = [], []
    for job in jobs:
        price = pricer.price(job)
        if price.seconds is None:
            unpriced.append(f"{job.rule} {job.wildcards}: {price.basis}")
        rows.append({"rule": job.rule, "part": part(job), "gpu": job.gpu > 0, "s": price.seconds, "gb": price.gb,
                     "disk": price.disk, "basis": price.basis})
    table = pd.DataFrame(rows)
    if pricer.name == "h200":  # the manifest hashes everything the other jobs leave
        table.loc[table["rule"] == "manifest", "s"] += pricer.hashing_seconds(table["disk"].sum())
    per_rule = table.groupby(["rule", "part"], sort=False).agg(
        jobs=("s", "size"), s_per_job=("s", "mean"), hours=("s", lambda s: s.sum(min_count=1) / 3600),
        gpu=("gpu", "any"), peak_gb=("gb", "max"), disk_gb=("disk", lambda d: d.sum() / GB), basis=("basis", "first"))
    per_rule["gpu_hours"] = per_rule["hours"].where(per_rule["gpu"], 0.0)
    per_rule = per_rule[[rule not in TARGET_RULES for rule, _ in per_rule.index]]
    order = {rule: i for i, rule in enumerate(RULE_ORDER)}
    per_rule = per_rule.sort_index(key=lambda level: level.map(lambda v: order.get(v, len(order)))
                                   if level.name == "rule" else level)
    return per_rule.drop(columns="gpu"), unpriced


def part(job: Job) -> str:
    """The rows a rule is split into: quantize per (model, setting), sampling and its sequels per (model, steps)."""
    wildcards = job.wildcards
    if job.rule == "quantize":
        return f"{wildcards.get('model', '?')} {wildcards.get('setting', '?')}"
    if job.rule in ("sample", "features", "metrics"):
        return f"{wildcards.get('model', '?')}, {wildcards.get('steps', '?')} steps"
    return ""


#: row order of the cost table (DAG order); rules not listed come last
RULE_ORDER = ["rehearsal_dit", "rehearsal_vae", "rehearsal_inception", "rehearsal_reference", "download", "verify_download",
              "train_transformer", "train_feature_network", "digits_reference", "convert_checkpoint", "quantize", "sample",
              "reference_features", "features", "metrics", "tables", "paper_table", "ablation_table", "tradeoff_plot",
              "sample_grid", "calibration_plot", "claims_table", "manifest", "benchmark_table"]


def report(target: str, configfile: str, per_rule: pd.DataFrame, unpriced: list[str], pricer: Pricer) -> str:
    shown = per_rule.reset_index()
    shown["rule"] = (shown["rule"] + " " + shown["part"]).str.strip()
    shown = shown[["rule", "jobs", "s_per_job", "hours", "gpu_hours", "peak_gb", "disk_gb", "basis"]]
    shown.columns = ["rule", "jobs", "s/job", "hours", "GPU-hours", "peak host GB", "disk GB", "rate"]
    lines = [f"cost of `snakemake {target} --configfile {configfile}` from scratch "
             f"(jobs: Snakemake's dry run; rates: benchmarks/rates.yaml, profile {pricer.name}, measured on {pricer.device})",
             "", shown.to_markdown(index=False, floatfmt=".3g"), ""]
    gpu_hours, hours = per_rule["gpu_hours"].sum(), per_rule["hours"].sum()
    disk = per_rule["disk_gb"].sum()
    lines.append(f"total: {gpu_hours:.1f} GPU-hours on one {pricer.device.split(' (')[0] if gpu_hours else 'GPU (none needed)'}; "
                 f"{hours - gpu_hours:.2f} job-hours of CPU-only jobs (summed: jobs run side by side); "
                 f"peak job host memory {per_rule['peak_gb'].max():.1f} GB; "
                 + (f"disk kept {disk:.1f} GB" if disk else "disk not in this profile's rates"))
    for estimate in sorted(pricer.estimates):
        lines.append(f"includes an ESTIMATE, not a measurement: {estimate}")
    if unpriced:
        lines.append(f"left out of the total (no rate): {len(unpriced)} job(s), e.g. {unpriced[0]}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a Snakemake target: all, review, smoke, table_256, claims, … or an output file")
    parser.add_argument("--configfile", help=f"default: {DEFAULT_CONFIGS} by target, else {DEFAULT_CONFIG}")
    parser.add_argument("--rates", default="benchmarks/rates.yaml")
    parser.add_argument("--snakefile", default="Snakefile")
    parser.add_argument("--remaining", action="store_true", help="only the jobs still to run (default: from scratch)")
    parser.add_argument("--rate", action="append", default=[], metavar="KEY=VALUE",
                        help="replace one rate of the GPU profile, e.g. calibration.ms_per_step=100 (said in the output)")
    parser.add_argument("--profile", help="a Snakemake workflow profile (e.g. profiles/slurm): list every job whose "
                        "predicted time exceeds its runtime or max_runtime, exit non-zero if there is one")
    parser.add_argument("--max-runtime", type=int, metavar="MINUTES",
                        help="the partition's time limit (default: the profile's, else the config's runtime.max_runtime)")


def overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--rate {item!r}: expected KEY=NUMBER, e.g. calibration.ms_per_step=100") from None
    return out


def run(args: argparse.Namespace) -> None:
    configfile = args.configfile or DEFAULT_CONFIGS.get(args.target, DEFAULT_CONFIG)
    config, rates = read_yaml(configfile), read_yaml(args.rates)
    pricer = Pricer(config, rates, settings_table(config), overrides(args.rate))
    if not pricer.name:
        raise ValueError(f"{args.rates}: no rate profile for preset {config['preset']!r} on device {config.get('device')!r} "
                         f"(profiles: {rates['profiles']})")
    jobs = parse_dry_run(dry_run(args.target, configfile, args.snakefile, args.remaining, args.profile))
    per_rule, unpriced = cost_table(jobs, pricer)
    print(report(args.target, configfile, per_rule, unpriced, pricer))
    if args.profile:
        check_runtimes(jobs, pricer, args.profile, args.max_runtime)


def check_runtimes(jobs: list[Job], pricer: Pricer, profile: str, max_runtime: int | None) -> None:
    """Print the runtime check of a profile's jobs; ValueError if a job exceeds its runtime or max_runtime."""
    profile_runtime = (read_yaml(str(Path(profile) / "profile.yaml")).get("config") or {}).get("runtime") or {}
    pricer.config = {**pricer.config, "runtime": {**(pricer.config.get("runtime") or {}), **profile_runtime}}
    factor, configured = runtime_settings(pricer.config)
    max_runtime = max_runtime or configured
    found = overruns(jobs, pricer, max_runtime)
    print(f"\nruntime check ({profile}; GPU jobs: predicted × safety factor {factor:g}; max_runtime "
          f"{f'{max_runtime} min' if max_runtime else 'not set'}): "
          + (f"{len(found)} job(s) exceed their runtime" if found else "no job exceeds its runtime"))
    for line in found:
        print(f"  {line}")
    if found:
        raise ValueError(f"{len(found)} job(s) exceed their runtime or max_runtime through {profile} (listed above)")
