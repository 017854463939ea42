# Helpers only: config and settings validation, wildcard constraints, path and parameter lookups.
import json
import re
from pathlib import Path
import math

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

PRESET = config["preset"]
MODELS = config["models"]
SAMPLING = config["sampling"]
USE_GPU = config["device"] != "cpu"


def load_settings(path):
    """The settings table, one row per setting id, each row validated with the row and key named on error."""
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
    missing = [s for s in config["settings"] if s not in rows]
    if missing:
        raise WorkflowError(f"config key 'settings' names ids missing from {path}: {missing}")
    return {s: rows[s] for s in config["settings"]}


SETTINGS = load_settings(config["settings_table"])


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
    """Every file the preset downloads: resources path -> {url, sha256}."""
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


def vae_folder(wildcards, input):
    return str(Path(input.vae[0]).parent) if input.vae else ""


def gpu(wildcards=None):
    """GPU tokens of a GPU job: 1 when the preset runs on CUDA."""
    return int(USE_GPU)


def metric_files():
    return expand(
        "results/{preset}/metrics/{model}/{setting}/steps{steps}.json",
        preset=PRESET, model=MODELS, setting=SETTINGS, steps=SAMPLING["steps"],
    )


def quantize_infos():
    return expand("results/{preset}/quantized/{model}/{setting}.json", preset=PRESET, model=MODELS, setting=SETTINGS)


def kept_shards():
    """Every sample shard when shards are kept: a deleted shard is then regenerated, and so is what it feeds."""
    if not SAMPLING.get("keep_samples", True):
        return []
    return expand(
        "results/{preset}/samples/{model}/{setting}/steps{steps}/shard{shard}.npz",
        preset=PRESET, model=MODELS, setting=SETTINGS, steps=SAMPLING["steps"], shard=shards(),
    )


def final_outputs():
    return kept_shards() + expand(
        "results/{preset}/tables/metrics.{ext}", preset=PRESET, ext=["csv", "md", "tex"]
    ) + expand("results/{preset}/plots/tradeoff.{ext}", preset=PRESET, ext=["png", "pdf"]) + expand(
        "results/{preset}/plots/samples/{model}-steps{steps}.png", preset=PRESET, model=MODELS, steps=SAMPLING["steps"]
    )
