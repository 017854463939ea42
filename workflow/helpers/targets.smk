# Target lists: the outputs of the named targets and the file sets the rules and tables gather (helpers only).
from pathlib import Path

from snakemake.exceptions import WorkflowError


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


def baselines_outputs(wildcards=None):
    if not BASELINE_SETTINGS:
        raise WorkflowError(f"target baselines: preset {PRESET!r} has no config key 'baseline_settings' "
                            "(the paper preset runs the baselines in its main settings)")
    return (expand("results/{preset}/tables/baselines.{ext}", preset=PRESET, ext=TABLE_FORMATS)
            + expand("results/{preset}/claims-baselines.{ext}", preset=PRESET, ext=CLAIMS_FORMATS))


def calibrated_infos(model):
    """Quantize infos of one model's calibrated settings (main and ablation), for the calibration curves."""
    return [p for p in runs(QUANTIZE_INFO, model=model) if SETTINGS[Path(p).stem]["method"] in CALIBRATED]


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
