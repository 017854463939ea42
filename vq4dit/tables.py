"""Tables stage: every run of a preset in one tidy table (CSV), rendered as Markdown and LaTeX.

One row per (model, setting, steps); the model, setting and steps come from the metrics file's
path (``…/metrics/<model>/<setting>/steps<N>.json``), the size accounting from the quantize stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

METRICS_PATH = re.compile(r"metrics/(?P<model>[^/]+)/(?P<setting>[^/]+)/steps(?P<steps>\d+)\.json$")
INFO_PATH = re.compile(r"quantized/(?P<model>[^/]+)/(?P<setting>[^/]+)\.json$")
COLUMNS = [
    "model", "setting", "method", "bits_per_weight", "size_mb", "steps", "cfg_scale", "n_samples",
    "fid", "sfid", "is", "precision", "recall", "block_mse", "file_mb", "quantize_seconds", "calibration_seconds",
]
#: display names of the metric columns in Markdown and LaTeX (arrows: which way is better)
DISPLAY = {"fid": "FID↓", "sfid": "sFID↓", "is": "IS↑", "precision": "Prec.↑", "recall": "Rec.↑"}


def parse(path: str, pattern: re.Pattern) -> dict:
    """Wildcards encoded in a result path."""
    match = pattern.search(Path(path).as_posix())
    if not match:
        raise ValueError(f"{path}: path does not match {pattern.pattern}")
    return match.groupdict()


def read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON ({err})") from err


def info_row(path: str) -> dict:
    """Size accounting and timings of one quantized model."""
    info, keys = read_json(path), parse(path, INFO_PATH)
    size = info["size"]
    return {
        **keys,
        "method": info["setting"]["method"],
        "bits_per_weight": size["bits_per_weight"],
        "size_mb": size["total_mb"],
        "file_mb": info["file_mb"],
        "quantize_seconds": info["quantize_seconds"],
        "block_mse": info["block_mse"],
        "calibration_seconds": info.get("calibration_seconds"),
    }


def metrics_row(path: str) -> dict:
    keys = parse(path, METRICS_PATH)
    return {**keys, "steps": int(keys["steps"]), **read_json(path)}


def build_table(metric_paths: list[str], info_paths: list[str], cfg_scale: float) -> pd.DataFrame:
    """Join metrics with quantization info; stable row order (model, settings as given, steps)."""
    infos = pd.DataFrame([info_row(p) for p in info_paths])
    metrics = pd.DataFrame([metrics_row(p) for p in metric_paths])
    table = metrics.merge(infos, on=["model", "setting"], how="left", validate="many_to_one")
    missing = table.loc[table["method"].isna(), "setting"].unique().tolist()
    if missing:
        raise ValueError(f"no quantize info for settings {missing}")
    table["cfg_scale"] = cfg_scale
    order = table["setting"].map({s: i for i, s in enumerate(dict.fromkeys(infos["setting"]))})
    table = table.assign(order=order).sort_values(["model", "steps", "order"], kind="stable").drop(columns="order")
    extra = [c for c in table.columns if c not in COLUMNS]
    return table[COLUMNS + extra].reset_index(drop=True)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The human-facing columns, rounded, with metric arrows."""
    shown = table[["model", "setting", "method", "bits_per_weight", "size_mb", "steps", *DISPLAY, "block_mse",
                   "calibration_seconds"]]
    names = {**DISPLAY, "bits_per_weight": "bits/w", "size_mb": "MB", "block_mse": "block MSE",
             "calibration_seconds": "calib. s"}
    return shown.rename(columns=names).round(
        {"bits/w": 2, "MB": 2, "FID↓": 2, "sFID↓": 2, "IS↑": 2, "Prec.↑": 3, "Rec.↑": 3, "calib. s": 1}
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", nargs="+", required=True)
    parser.add_argument("--infos", nargs="+", required=True)
    parser.add_argument("--cfg-scale", type=float, required=True)
    parser.add_argument("--csv", required=True)
    parser.add_argument("--markdown", required=True)
    parser.add_argument("--latex", required=True)


def run(args: argparse.Namespace) -> None:
    table = build_table(args.metrics, args.infos, args.cfg_scale)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.csv, index=False)
    shown = display_table(table)
    Path(args.markdown).write_text(shown.to_markdown(index=False, missingval="–") + "\n")
    latex = shown.rename(columns=lambda c: c.replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$"))
    styler = latex.style.hide(axis="index").format(precision=2, na_rep="--").format("{:.2e}", subset=["block MSE"])
    Path(args.latex).write_text(styler.to_latex(hrules=True))
    log.info("wrote %d rows to %s", len(table), args.csv)
