"""Plots stage: size/bits vs quality trade-offs, side-by-side sample grids and calibration curves (seaborn, PNG + PDF)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from vq4dit.io import load_npz  # noqa: E402
from vq4dit.tables import read_paper  # noqa: E402

log = logging.getLogger(__name__)


def save(fig, png: str, pdf: str) -> None:
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    plt.close(fig)


TRADEOFF_METRICS = {"fid": "FID ↓", "sfid": "sFID ↓", "is": "IS ↑"}
TRADEOFF_AXES = {"size_mb": "size of the DiT blocks (MB)", "bits_per_weight": "bits per weight"}


def tradeoff(table: pd.DataFrame, paper: pd.DataFrame | None = None, resolution: int | None = None, title: str = ""):
    """Size (MB) and bits per weight against FID, sFID and IS: one line per (method, steps).

    Rows: the two size axes; columns: the metrics; colour: method; line style and marker: sampling steps.
    The paper's numbers at ``resolution`` (settings with a method in ``table``) are overlaid as hollow
    markers in the method's colour.
    """
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    palette = method_palette(list(dict.fromkeys(table["method"])))
    data = table.assign(steps=table["steps"].astype(str) + " steps")
    fig, axes = plt.subplots(len(TRADEOFF_AXES), len(TRADEOFF_METRICS), figsize=(4.2 * len(TRADEOFF_METRICS), 7.6),
                             squeeze=False)
    overlay = _paper_points(table, paper, resolution)
    for i, (x, x_label) in enumerate(TRADEOFF_AXES.items()):
        for j, (y, y_label) in enumerate(TRADEOFF_METRICS.items()):
            ax = axes[i, j]
            sns.lineplot(data=data.sort_values(x), x=x, y=y, hue="method", style="steps", markers=True,
                         palette=palette, markersize=8, ax=ax, legend=(i, j) == (0, len(TRADEOFF_METRICS) - 1),
                         estimator=None, sort=False)
            for method, points in overlay.groupby("method"):
                ax.scatter(points[x], points[y], s=90, facecolors="none", edgecolors=[palette[method]],
                           linewidths=1.5, marker="o", zorder=5)
            ax.set(xscale="log", xlabel=x_label, ylabel=y_label)
            if y != "is":
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ticks = spread_ticks(data[x], min_ratio=1.5 if x == "size_mb" else 1.25)
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    legend = axes[0, -1].get_legend()
    if legend is not None:
        handles = list(legend.legend_handles)
        labels = [t.get_text() for t in legend.get_texts()]
        if not overlay.empty:
            handles.append(matplotlib.lines.Line2D([], [], marker="o", linestyle="", markerfacecolor="none",
                                                   markeredgecolor="black", markersize=9))
            labels.append("paper (hollow)")
        legend.remove()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


#: colorblind-palette index per registered method (vq4dit.methods.REGISTRY; others take the remaining colours in order)
METHOD_COLOURS = {"fp": 7, "rtn": 1, "vq-kmeans": 2, "vq-codebook": 0, "vq4dit": 4, "repq-vit": 3, "gptq": 5, "qdit": 6,
                  "gptvq": 8}


def method_palette(methods: list[str]) -> dict[str, tuple]:
    """A fixed colour per known method (same in every figure), distinct ones for the others."""
    colours = sns.color_palette("colorblind", 10)
    free = [i for i in range(10) if i not in METHOD_COLOURS.values()]
    return {m: colours[METHOD_COLOURS[m]] if m in METHOD_COLOURS else colours[free.pop(0) % 10] for m in methods}


def spread_ticks(values: pd.Series, min_ratio: float = 1.25) -> list[float]:
    """Sorted distinct values, skipping any within ``min_ratio`` of the previous tick (log axis, no overlap)."""
    ticks: list[float] = []
    for v in sorted(values.dropna().unique()):
        if not ticks or v / ticks[-1] >= min_ratio:
            ticks.append(float(v))
    return ticks


def _paper_points(table: pd.DataFrame, paper: pd.DataFrame | None, resolution: int | None) -> pd.DataFrame:
    """Paper rows at ``resolution`` whose setting is in ``table``, with our method, size and bits per weight."""
    columns = ["method", *TRADEOFF_AXES, *TRADEOFF_METRICS]
    if paper is None or resolution is None:
        return pd.DataFrame(columns=columns)
    ours = table.drop_duplicates("setting").set_index("setting")
    rows = paper[(paper["resolution"] == resolution) & paper["setting"].isin(ours.index)]
    points = rows[["setting", *TRADEOFF_METRICS]].assign(
        method=rows["setting"].map(ours["method"]),
        size_mb=rows["size_mb"].fillna(rows["setting"].map(ours["size_mb"])),
        bits_per_weight=rows["setting"].map(ours["bits_per_weight"]),
    )
    return points[columns]


def calibration_curves(histories: dict[str, dict]):
    """L_d, L_r and the frozen fraction over calibration steps: one row per setting, one line per block."""
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    records = [
        {"setting": setting, "block": str(b), "step": step, "L_d": l_d, "L_r": l_r, "frozen fraction": frozen}
        for setting, history in histories.items()
        for b, block in enumerate(history["blocks"])
        for step, l_d, l_r, frozen in block
    ]
    data = pd.DataFrame(records)
    fig, axes = plt.subplots(len(histories), 3, figsize=(13, 2.8 * len(histories)), squeeze=False)
    for row, (setting, history) in zip(axes, histories.items()):
        part = data[data["setting"] == setting]
        for ax, y in zip(row, ("L_d", "L_r", "frozen fraction")):
            sns.lineplot(data=part, x="step", y=y, hue="block", palette="viridis", ax=ax, legend=y == "L_d")
            ax.set_title(f"{setting}: {y}")
            if y == "L_d":
                ax.set_yscale("log")
                ax.legend(title="block", ncols=2, fontsize="small")
        if history.get("ratio_reg_on") is not None:  # the first whole-model step with L_r on
            row[1].axvline(history["ratio_reg_on"], color="grey", lw=0.8, ls=":")
    fig.tight_layout()
    return fig


def tile(images: np.ndarray, columns: int, gap: int = 0, fill: int = 0) -> np.ndarray:
    """NHWC images -> one mosaic of ``columns`` per row, ``gap`` pixels of ``fill`` between images."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    padded = np.full((rows * columns, h + gap, w + gap, c), fill, images.dtype)
    padded[:n, :h, :w] = images
    mosaic = padded.reshape(rows, columns, h + gap, w + gap, c).transpose(0, 2, 1, 3, 4)
    return mosaic.reshape(rows * (h + gap), columns * (w + gap), c)[: rows * (h + gap) - gap, : columns * (w + gap) - gap]


def sample_grid(shards: list[str], names: list[str], title: str, count: int = 32, columns: int = 8,
                panels_per_row: int = 5):
    """The first ``count`` samples of every setting, one panel per setting, ``panels_per_row`` panels a row."""
    rows = -(-count // columns)
    ncols = min(len(shards), panels_per_row)
    nrows = -(-len(shards) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, nrows * (0.5 + 3.2 * rows / columns)), squeeze=False)
    for ax in axes.flat[len(shards):]:
        ax.axis("off")
    for ax, path, name in zip(axes.flat, shards, names):
        mosaic = tile(load_npz(path, ("arr_0",))["arr_0"][:count], columns, gap=max(1, count // 32), fill=128)
        ax.imshow(mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plot", required=True)
    p = sub.add_parser("tradeoff", help="size / bits per weight vs FID, sFID, IS of one model")
    p.add_argument("--table", required=True, help="the tidy CSV of `tables metrics`")
    p.add_argument("--model", required=True)
    p.add_argument("--paper", help="config/paper_results.csv (overlaid as hollow markers)")
    p.add_argument("--resolution", type=int, help="the paper's resolution of this model")
    p = sub.add_parser("samples", help="sample grids, one panel per setting")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--names", nargs="+", required=True)
    p.add_argument("--title", default="")
    p = sub.add_parser("calibration", help="calibration curves of the calibrated settings")
    p.add_argument("--infos", nargs="+", required=True, help="quantize info JSONs (settings without history skipped)")
    for p in sub.choices.values():
        p.add_argument("--png", required=True)
        p.add_argument("--pdf", required=True)
        p.add_argument("--notice", default="", help="warning printed above the figure (rehearsal: random weights)")


def _histories(paths: list[str]) -> dict[str, dict]:
    histories = {}
    for path in paths:
        info = json.loads(Path(path).read_text())
        if "calibration_history" in info:
            histories[info["setting"]["id"]] = info["calibration_history"]
    return histories


def run(args: argparse.Namespace) -> None:
    if args.plot == "tradeoff":
        table = pd.read_csv(args.table)
        table = table[table["model"] == args.model]
        if table.empty:
            raise ValueError(f"{args.table}: no rows for model {args.model!r}")
        paper = read_paper(args.paper) if args.paper else None
        fig = tradeoff(table, paper, args.resolution, title=args.model)
    elif args.plot == "calibration":
        histories = _histories(args.infos)
        if not histories:
            raise ValueError(f"none of {args.infos} has a calibration_history (no calibrated setting)")
        fig = calibration_curves(histories)
    else:
        if len(args.shards) != len(args.names):
            raise ValueError(f"{len(args.shards)} shards but {len(args.names)} names")
        fig = sample_grid(args.shards, args.names, args.title)
    if args.notice:
        fig.text(0.5, 1.0, args.notice, ha="center", va="bottom", color="firebrick", weight="bold")
    save(fig, args.png, args.pdf)
    log.info("wrote %s and %s", args.png, args.pdf)
