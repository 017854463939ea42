# Input, parameter and thread functions of the rules (helpers only, no rules).
import json
import math
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname


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


def tidy_metric_files(wildcards):
    """The tidy table's runs: every main and ablation run (metrics) or the baselines target's (baselines)."""
    return metric_files() if wildcards.tidy == "metrics" else baseline_runs(METRICS_FILE)


def tidy_quantize_infos(wildcards):
    return quantize_infos() if wildcards.tidy == "metrics" else baseline_runs(QUANTIZE_INFO)


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


def report_inputs(wildcards=None):
    """What the benchmark table waits for: every other final output (so it sees their records)."""
    own = set(benchmark_tables())
    return [p for p in final_outputs() if p not in own]
