"""Plots stage: the bits-per-weight vs FID trade-off and side-by-side sample grids (seaborn, PNG + PDF)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from vq4dit.io import load_npz  # noqa: E402

log = logging.getLogger(__name__)


def save(fig, png: str, pdf: str) -> None:
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=150, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    plt.close(fig)


def tradeoff(table: pd.DataFrame):
    """FID against bits per weight: one line per method, one panel per (model, steps)."""
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.2)
    data = table.assign(panel=table["model"] + ", " + table["steps"].astype(str) + " steps")
    grid = sns.relplot(
        data=data, x="bits_per_weight", y="fid", hue="method", style="method", col="panel",
        kind="line", markers=True, dashes=False, markersize=9, height=3.5, aspect=1.2,
    )
    grid.set_axis_labels("bits per weight (DiT blocks)", "FID ↓").set_titles("{col_name}")
    grid.set(xscale="log", yscale="log", xticks=sorted(data["bits_per_weight"].unique()))
    for ax in grid.axes.flat:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    return grid.figure


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """NHWC images -> one (rows*H, columns*W, C) mosaic."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    padded = np.zeros((rows * columns, h, w, c), images.dtype)
    padded[:n] = images
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


def sample_grid(shards: list[str], names: list[str], title: str, count: int = 32, columns: int = 8,
                panels_per_row: int = 5):
    """The first ``count`` samples of every setting, one panel per setting, ``panels_per_row`` panels a row."""
    rows = -(-count // columns)
    ncols = min(len(shards), panels_per_row)
    nrows = -(-len(shards) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, nrows * (0.5 + 2.6 * rows / columns)), squeeze=False)
    for ax in axes.flat[len(shards):]:
        ax.axis("off")
    for ax, path, name in zip(axes.flat, shards, names):
        mosaic = tile(load_npz(path, ("arr_0",))["arr_0"][:count], columns)
        ax.imshow(mosaic.squeeze(-1) if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plot", required=True)
    p = sub.add_parser("tradeoff")
    p.add_argument("--table", required=True)
    p = sub.add_parser("samples")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--names", nargs="+", required=True)
    p.add_argument("--title", default="")
    for p in sub.choices.values():
        p.add_argument("--png", required=True)
        p.add_argument("--pdf", required=True)


def run(args: argparse.Namespace) -> None:
    if args.plot == "tradeoff":
        fig = tradeoff(pd.read_csv(args.table))
    else:
        if len(args.shards) != len(args.names):
            raise ValueError(f"{len(args.shards)} shards but {len(args.names)} names")
        fig = sample_grid(args.shards, args.names, args.title)
    save(fig, args.png, args.pdf)
    log.info("wrote %s and %s", args.png, args.pdf)
