# Config and settings validation, the preset's globals and wildcard constraints (helpers only, no rules).
import re
import shlex

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from vq4dit.methods import CALIBRATED, HESSIAN_METHODS

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
