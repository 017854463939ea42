# Helpers only: config and settings validation, wildcard constraints, path and parameter lookups.
import json
import re
from pathlib import Path
import math
import shlex
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

PRESET = config["preset"]
SAMPLE_COUNTS = config["metrics"].get("sample_counts", [])
if any(n > config["sampling"]["n_samples"] for n in SAMPLE_COUNTS):
    raise WorkflowError(f"config key 'metrics.sample_counts': {SAMPLE_COUNTS} must not exceed "
                        f"sampling.n_samples = {config['sampling']['n_samples']}")
MODELS = config["models"]
SAMPLING = config["sampling"]
USE_GPU = config["device"] != "cpu"


def load_settings(path, ids):
    """The settings table rows of ``ids``, each row validated with the row and key named on error."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#").fillna("")
    rows = {}
    for number, record in enumerate(table.to_dict("records"), start=2):
        row = {k: (int(v) if v.lstrip("-").isdigit() else v) for k, v in record.items() if v != ""}
        try:
            validate(row, schema="../schemas/settings.schema.yaml")
        except WorkflowError as err:
            raise WorkflowError(f"{path} line {number} (id {row.get('id')!r}): {err}") from None
        if row["id"] in rows:
            raise WorkflowError(f"{path} line {number}: duplicate setting id {row['id']!r}")
        rows[row["id"]] = row
    missing = [s for s in ids if s not in rows]
    if missing:
        raise WorkflowError(f"config keys 'settings', 'ablation_candidates' and 'baseline_settings' name ids missing from {path}: {missing}")
    return {s: rows[s] for s in ids}


ABLATION = config.get("ablation_candidates", {})
if ABLATION and ABLATION["model"] not in MODELS:
    raise WorkflowError(f"config key 'ablation_candidates.model': {ABLATION['model']!r} is not one of models {list(MODELS)}")
MAIN_SETTINGS = config["settings"]
# the ablation's settings plus FP (for ΔFID to our own FP run; not a row of the ablation table)
ABLATION_IDS = list(dict.fromkeys(["fp"] + ABLATION["settings"])) if ABLATION else []
# the `baselines` target's extra settings (beside the main ones), not part of the preset's other outputs
BASELINE_SETTINGS = config.get("baseline_settings", [])
SETTINGS = load_settings(config["settings_table"], list(dict.fromkeys(MAIN_SETTINGS + ABLATION_IDS + BASELINE_SETTINGS)))


def alternation(names):
    """A wildcard regex matching exactly the given names (and nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


TRAINED = [m for m, spec in MODELS.items() if spec["source"] == "train"]
DOWNLOADED = [m for m, spec in MODELS.items() if spec["source"] == "download"]
REFERENCES = sorted({spec["reference"] for spec in MODELS.values()})


wildcard_constraints:
    preset=re.escape(PRESET),
    model=alternation(MODELS),
    setting=alternation(SETTINGS),
    steps=r"\d+",
    shard=r"\d+",
    reference=alternation(REFERENCES),


def sample_output(path):
    """Sample shards are kept unless sampling.keep_samples is false (then deleted once features exist)."""
    return path if SAMPLING.get("keep_samples", True) else temp(path)


def shards():
    """Shard indices: n_samples split into shards of shard_size."""
    return range(math.ceil(SAMPLING["n_samples"] / SAMPLING["shard_size"]))


def shard_range(wildcards):
    """(start, count) of one shard."""
    start = int(wildcards.shard) * SAMPLING["shard_size"]
    return start, min(SAMPLING["shard_size"], SAMPLING["n_samples"] - start)


def downloads():
    """Every file the preset downloads: resources path -> {url, sha256, size (optional)}."""
    files = {}
    for model in DOWNLOADED:
        files[f"checkpoints/{model}.pt"] = MODELS[model]["checkpoint"]
    for name, spec in config.get("references", {}).items():
        files[f"reference/{name}.npz"] = spec
    for name, spec in config.get("vae", {}).get("files", {}).items():
        files[f"vae/{name}"] = spec
    weights = config["feature_extractor"].get("weights")
    if weights:
        files[f"feature_extractor/{weights['file']}"] = weights
    return files


DOWNLOADS = downloads()
NOTICE = f"--notice {shlex.quote(config['notice'])}" if config.get("notice") else ""
REHEARSAL_SEED = config.get("rehearsal", {}).get("seed", 0)


def local_source(wildcards):
    """The file behind a ``file:`` URL (an input, so a rule that writes it runs first); nothing for remote URLs."""
    url = DOWNLOADS[wildcards.download]["url"]
    return [url2pathname(urlparse(url).path)] if url.startswith("file:") else []


def verified(paths):
    """Verification markers of the downloaded files among ``paths``: a hand-placed file is checked before first use."""
    return [f"resources/verified/{p[len('resources/'):]}.json" for p in paths if p.startswith("resources/")]


def feature_inputs_verified(wildcards):
    return verified([feature_weights()])


def reference_inputs_verified(wildcards):
    return verified([reference_images(wildcards), feature_weights()])


def vae_verified(wildcards):
    return verified(vae_config(wildcards))


def transformer_config(wildcards):
    return f"results/{PRESET}/models/{wildcards.model}/transformer/config.json"


def vae_config(wildcards):
    """The VAE's config.json for latent-space models, nothing for pixel-space ones."""
    return ["resources/vae/config.json", "resources/vae/diffusion_pytorch_model.safetensors"] if MODELS[wildcards.model].get("vae") else []


def reference_images(wildcards):
    name = wildcards.reference
    return f"results/{PRESET}/reference/{name}.npz" if name == "digits" else f"resources/reference/{name}.npz"


def feature_weights(wildcards=None):
    weights = config["feature_extractor"].get("weights")
    if weights:
        return f"resources/feature_extractor/{weights['file']}"
    return f"results/{PRESET}/models/feature_network.pt"


def reference_features(wildcards):
    return f"results/{PRESET}/features/reference/{MODELS[wildcards.model]['reference']}.npz"


def sample_shards(wildcards):
    return expand(
        "results/{preset}/samples/{model}/{setting}/steps{steps}/shard{shard}.npz",
        shard=shards(),
        **wildcards,
    )


def setting_json(wildcards):
    return json.dumps(SETTINGS[wildcards.setting], sort_keys=True)


HESSIAN_METHODS = {"gptq", "qdit", "gptvq"}


def baselines_json(wildcards):
    """Config key baselines for the Hessian-based methods (others get none: changing it reruns only those)."""
    used = SETTINGS[wildcards.setting]["method"] in HESSIAN_METHODS
    return json.dumps(config.get("baselines", {}) if used else {}, sort_keys=True)


def vae_folder(wildcards, input):
    return str(Path(input.vae[0]).parent) if input.vae else ""


def rule_threads(rule, default=2):
    """Threads of ``rule``'s local jobs: config key ``threads.<rule>`` or ``default``."""
    return config.get("threads", {}).get(rule, default)


def gpu(wildcards=None):
    """GPU tokens of a GPU job: 1 when the preset runs on CUDA."""
    return int(USE_GPU)


METRICS_FILE = "results/{preset}/metrics/{model}/{setting}/steps{steps}.json"
QUANTIZE_INFO = "results/{preset}/quantized/{model}/{setting}.json"
TABLE_FORMATS = ["csv", "md", "tex", "html"]


def runs(pattern, **fixed):
    """``pattern`` expanded over the main runs (models x settings x steps) and the ablation's runs."""
    main = expand(pattern, preset=PRESET, model=fixed.get("model", MODELS), setting=MAIN_SETTINGS,
                  steps=SAMPLING["steps"], allow_missing=True)
    ablation = []
    if ABLATION and fixed.get("model", ABLATION["model"]) == ABLATION["model"]:
        ablation = expand(pattern, preset=PRESET, model=ABLATION["model"], setting=ABLATION_IDS,
                          steps=ABLATION["steps"], allow_missing=True)
    return list(dict.fromkeys(main + ablation))


def metric_files():
    return runs(METRICS_FILE)


def quantize_infos():
    return runs(QUANTIZE_INFO)


def baseline_runs(pattern):
    """``pattern`` over models x (main and baseline settings) x steps: the `baselines` target's table."""
    return expand(pattern, preset=PRESET, model=MODELS, setting=list(dict.fromkeys(MAIN_SETTINGS + BASELINE_SETTINGS)),
                  steps=SAMPLING["steps"])


def tidy_metric_files(wildcards):
    """The tidy table's runs: every main and ablation run (metrics) or the baselines target's (baselines)."""
    return metric_files() if wildcards.tidy == "metrics" else baseline_runs(METRICS_FILE)


def tidy_quantize_infos(wildcards):
    return quantize_infos() if wildcards.tidy == "metrics" else baseline_runs(QUANTIZE_INFO)


def baselines_outputs(wildcards=None):
    if not BASELINE_SETTINGS:
        raise WorkflowError(f"target baselines: preset {PRESET!r} has no config key 'baseline_settings' "
                            "(the paper preset runs the baselines in its main settings)")
    return (expand("results/{preset}/tables/baselines.{ext}", preset=PRESET, ext=TABLE_FORMATS)
            + expand("results/{preset}/claims-baselines.{ext}", preset=PRESET, ext=CLAIMS_FORMATS))


def claims_tidy_tables(wildcards):
    """claims: the main tidy table; claims-baselines: it and the baselines target's."""
    tidy = ["metrics", "baselines"] if wildcards.claims == "claims-baselines" else ["metrics"]
    return expand("results/{preset}/tables/{tidy}.csv", preset=PRESET, tidy=tidy)


def claims_quantize_infos(wildcards):
    extra = baseline_runs(QUANTIZE_INFO) if wildcards.claims == "claims-baselines" else []
    return list(dict.fromkeys(quantize_infos() + extra))


def model_metric_files(wildcards):
    """The main runs of one model (the paper-layout table)."""
    return expand(METRICS_FILE, preset=PRESET, model=wildcards.model, setting=MAIN_SETTINGS, steps=SAMPLING["steps"])


def model_quantize_infos(wildcards):
    return expand(QUANTIZE_INFO, preset=PRESET, model=wildcards.model, setting=MAIN_SETTINGS)


CALIBRATED = {"vq-codebook", "vq4dit"}


def calibrated_infos(model):
    """Quantize infos of one model's calibrated settings (main and ablation), for the calibration curves."""
    return [p for p in runs(QUANTIZE_INFO, model=model) if SETTINGS[Path(p).stem]["method"] in CALIBRATED]


def model_calibrated_infos(wildcards):
    return calibrated_infos(wildcards.model)


def ablation_metric_files(wildcards=None):
    return expand(METRICS_FILE, preset=PRESET, model=ABLATION["model"], setting=ABLATION_IDS, steps=ABLATION["steps"])


def ablation_quantize_infos(wildcards=None):
    return expand(QUANTIZE_INFO, preset=PRESET, model=ABLATION["model"], setting=ABLATION_IDS)


def paper_resolution(wildcards):
    """``--resolution N`` for a model the paper evaluated (models.<m>.paper_resolution), else nothing."""
    return resolution_arg(wildcards.model)


def ablation_resolution(wildcards):
    return resolution_arg(ABLATION["model"])


def paper_count_arg(wildcards=None):
    """``--paper-count N``: the first of metrics.sample_counts (the paper's sample count), else nothing."""
    return f"--paper-count {SAMPLE_COUNTS[0]}" if SAMPLE_COUNTS else ""


def resolution_arg(model):
    resolution = MODELS[model].get("paper_resolution")
    return f"--resolution {resolution}" if resolution else ""


def kept_shards():
    """Every sample shard when shards are kept: a deleted shard is then regenerated, and so is what it feeds."""
    if not SAMPLING.get("keep_samples", True):
        return []
    return [
        f"{run}/shard{shard}.npz"
        for run in runs("results/{preset}/samples/{model}/{setting}/steps{steps}")
        for shard in shards()
    ]


def calibrated_models():
    """Models with at least one calibrated setting (they get calibration curves)."""
    return [m for m in MODELS if calibrated_infos(m)]


def tradeoff_figures(wildcards=None):
    return expand("results/{preset}/plots/tradeoff-{model}.{ext}", preset=PRESET, model=MODELS, ext=["png", "pdf"])


def paper_tables(resolution):
    """Input function of a ``table_<resolution>`` target: the paper-layout tables of the models at that resolution."""

    def tables(wildcards):
        models = [m for m, spec in MODELS.items() if spec.get("paper_resolution") == resolution]
        if not models:
            raise WorkflowError(f"target table_{resolution}: no model of preset {PRESET!r} has "
                                f"paper_resolution {resolution}; run it with --configfile config/config.yaml")
        return expand("results/{preset}/tables/paper-{model}.{ext}", preset=PRESET, model=models, ext=TABLE_FORMATS)

    return tables


def ablation_outputs(wildcards=None):
    if not ABLATION:
        raise WorkflowError(f"target ablation_candidates: preset {PRESET!r} has no config key 'ablation_candidates'")
    return expand("results/{preset}/tables/ablation-candidates.{ext}", preset=PRESET, ext=TABLE_FORMATS)


def smoke_outputs(wildcards):
    if PRESET != "smoke":
        raise WorkflowError(f"target smoke: this is preset {PRESET!r}; run it with --configfile config/smoke.yaml")
    return final_outputs()


def review_outputs(wildcards):
    if PRESET != "review":
        raise WorkflowError(f"target review: this is preset {PRESET!r}; run it with --configfile config/review.yaml")
    return final_outputs()


CLAIMS_FORMATS = ["csv", "md", "html"]


def claims_outputs(wildcards=None):
    return expand("results/{preset}/claims.{ext}", preset=PRESET, ext=CLAIMS_FORMATS)


def seed_spread(wildcards=None):
    """The preset's seed-spread record: config key seed_spread (must exist), else config/seed_spread/<preset>.csv if it exists."""
    path = config.get("seed_spread")
    if path and not Path(path).is_file():
        raise WorkflowError(f"config key 'seed_spread': {path} does not exist; write it with benchmarks/seed_variation.py")
    path = path or f"config/seed_spread/{PRESET}.csv"
    return [path] if Path(path).is_file() else []


def seed_spread_arg(wildcards, input):
    return f"--seed-spread {input.spread}" if input.spread else ""


def config_json(wildcards=None):
    """The preset's config as JSON (the claims and manifest stages read it)."""
    return json.dumps(config, sort_keys=True)


def prepared_files():
    """What the prepare stage leaves: downloads, trained or converted transformers, trained feature network, references."""
    files = [f"resources/{path}" for path in DOWNLOADS]
    for model in MODELS:
        folder = f"results/{PRESET}/models/{model}/transformer"
        files += [f"{folder}/config.json", f"{folder}/diffusion_pytorch_model.safetensors"]
    files.append(feature_weights())
    files += [f"results/{PRESET}/reference/{name}.npz" for name in REFERENCES if name == "digits"]
    return list(dict.fromkeys(files))


def packed_models():
    return runs("results/{preset}/quantized/{model}/{setting}.safetensors")


def feature_files():
    """Reference features, then every sample set's."""
    return (expand("results/{preset}/features/reference/{reference}.npz", preset=PRESET, reference=REFERENCES)
            + runs("results/{preset}/features/{model}/{setting}/steps{steps}.npz"))


def final_outputs():
    """Everything of the preset: claims, manifest, tables, figures, sample grids, calibration curves, benchmark records."""
    return (
        claims_outputs()
        + [f"results/{PRESET}/manifest.json"]
        + kept_shards()
        + expand("results/{preset}/tables/metrics.{ext}", preset=PRESET, ext=TABLE_FORMATS)
        + expand("results/{preset}/tables/paper-{model}.{ext}", preset=PRESET, model=MODELS, ext=TABLE_FORMATS)
        + (ablation_outputs() if ABLATION else [])
        + tradeoff_figures()
        + expand("results/{preset}/plots/samples/{model}-steps{steps}.png", preset=PRESET, model=MODELS,
                 steps=SAMPLING["steps"])
        + expand("results/{preset}/plots/calibration-{model}.png", preset=PRESET, model=calibrated_models())
        + benchmark_tables()
    )


def benchmark_tables():
    return expand("results/{preset}/tables/benchmarks.{ext}", preset=PRESET, ext=TABLE_FORMATS)


def report_inputs(wildcards=None):
    """What the benchmark table waits for: every other final output (so it sees their records)."""
    own = set(benchmark_tables())
    return [p for p in final_outputs() if p not in own]
