"""Published vs our variants of the Hessian baselines on random layers: proxy loss and codes that differ.

For each random layer W (rows x columns, DiT-like scale) and H = 2/N X^T X of N random inputs with
unequal magnitudes and correlations (the Hessian the published GPTQ / Q-DiT / GPTVQ code builds), the
proxy loss tr((W - Q) H (W - Q)^T) of

- GPTQ / Q-DiT group grids (``gptq_group_grid``): ``published`` (the lazy batch's start copy of W)
  vs ``updated`` (the error-updated columns), blocksize 128, groups 32 / 64 / 128, W2 and W3;
- GPTVQ (``gptvq_variant``): ``published`` vs ``exact``, the settings' W2 (k=256, d=4) and W3
  (k=64, d=2), 100 k-means iterations and 25 codebook-update steps (config/config.yaml);

and the share of codes (GPTQ) or assignments (GPTVQ) that differ. ratio: ours / published (< 1: ours lower).
Last, VQ4DiT's initial ratios under ``ratio_init`` ``authors`` vs ``both-eps`` (k=256, d=4, 2 candidates).
``--gptvq-parts`` adds GPTVQ's three parts (k-means, column loop, codebook update) switched one at a time
to ours: proxy loss / the published variant's, e.g. ``kmeans=exact`` (about 4 more minutes).

    python benchmarks/baselines_fidelity.py                 # about a minute on 2 busy CPU cores
    python benchmarks/baselines_fidelity.py --seeds 0 1 2 --samples 8192
    python benchmarks/baselines_fidelity.py --gptvq-parts
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from vq4dit.methods import gptvq, rtn
from vq4dit.methods.assignments import VQLayers, dequantize
from vq4dit.methods.gptq import gptq_quantize
from vq4dit.methods.gptvq import gptvq_quantize, weighted_error

#: (rows, columns) of the random layers: the smoke DiT's MLP out (96 x 384) and a DiT-XL/2-like 1/3-size fc1
SHAPES = [(96, 384), (384, 384)]
GROUP_SIZES = [32, 64, 128]
GPTVQ_SETTINGS = {2: (256, 4), 3: (64, 2)}  # bits -> (k, d), config/settings.tsv


def random_layer(rows: int, columns: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, H): W ~ N(0, 0.02^2); H = 2/N X^T X, X = Z M diag(s) with random mixing M and scales s in [0.1, 2.1]."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(rows, columns, generator=g)
    mix = torch.eye(columns) + 0.3 * torch.randn(columns, columns, generator=g) / columns**0.5
    x = torch.randn(samples, columns, generator=g) @ mix * (0.1 + 2.0 * torch.rand(columns, generator=g))
    return w, 2 / samples * x.T @ x


def gptq_rows(w: torch.Tensor, h: torch.Tensor, bits: int) -> list[dict]:
    rows = []
    for group_size in GROUP_SIZES:
        packed = {grid: gptq_quantize(w, h, bits, group_size=group_size, group_grid=grid)
                  for grid in ("published", "updated")}
        loss = {grid: weighted_error(w, rtn.dequantize(p), h) for grid, p in packed.items()}
        differ = (packed["published"]["codes"] != packed["updated"]["codes"]).float().mean()
        rows.append({"method": "gptq/qdit", "variant": "updated", "group": group_size, "published": loss["published"],
                     "ours": loss["updated"], "codes_differ_%": 100 * float(differ)})
    return rows


def gptvq_row(w: torch.Tensor, h: torch.Tensor, bits: int, seed: int) -> dict:
    k, d = GPTVQ_SETTINGS[bits]
    packed = {v: gptvq_quantize(w, h, k, d, kmeans_iters=100, codebook_update_iters=25, seed=seed, variant=v)
              for v in ("published", "exact")}
    loss = {v: weighted_error(w, dequantize(p)[0], h) for v, p in packed.items()}
    differ = (packed["published"]["assignments"] != packed["exact"]["assignments"]).float().mean()
    return {"method": "gptvq", "variant": "exact", "group": f"k={k},d={d}", "published": loss["published"],
            "ours": loss["exact"], "codes_differ_%": 100 * float(differ)}


def gptvq_parts(w: torch.Tensor, h: torch.Tensor, k: int, d: int, seed: int, kmeans: str, loop: str,
                update: str) -> float:
    """Proxy loss of GPTVQ with each part (k-means, column loop, codebook update) from the named variant."""
    weight, damped, upper = gptvq.prepare_hessian(w, h)
    groups = weight.view(w.shape[0], -1, d)
    if kmeans == "published":
        codebook = gptvq.published_kmeans(groups, torch.diagonal(upper).reshape(-1, d), k, 100)
    else:
        codebook, _ = gptvq.weighted_kmeans(groups, torch.diagonal(upper).pow(-2).reshape(-1, d), k, 100, seed)
    assignments = gptvq.assign_with_feedback(weight, upper, codebook, 128, loop).reshape(-1)
    codebook = (gptvq.adam_codebook_update(w, h, codebook, assignments, 25) if update == "published"
                else gptvq.update_codebook(weight, damped, codebook, assignments, 25))
    return weighted_error(w, codebook.half().float()[assignments].reshape(w.shape), h)


def parts_rows(seeds: list[int], samples: int) -> pd.DataFrame:
    """GPTVQ with one part at a time from ``exact``: proxy loss / all-published, per layer and bits."""
    rows = []
    for seed in seeds:
        for shape in SHAPES:
            w, h = random_layer(*shape, samples, seed)
            for bits, (k, d) in GPTVQ_SETTINGS.items():
                published = gptvq_parts(w, h, k, d, seed, "published", "published", "published")
                for part in ("kmeans", "loop", "update"):
                    choice = {p: "exact" if p == part else "published" for p in ("kmeans", "loop", "update")}
                    rows.append({"bits": bits, "part": f"{part}=exact",
                                 "ratio": gptvq_parts(w, h, k, d, seed, **choice) / published})
    return pd.DataFrame(rows)


def ratio_init_difference(seed: int) -> tuple[float, float]:
    """Max and mean |ratio difference| of the initial VQ4DiT ratios, authors' vs both-eps, on the SHAPES layers."""
    torch.manual_seed(seed)
    linears = [torch.nn.Linear(columns, rows, bias=False) for rows, columns in SHAPES]
    for linear in linears:
        torch.nn.init.normal_(linear.weight, std=0.02)
    with torch.no_grad():
        ratios = {v: VQLayers.from_linears(linears, 256, 4, 2, kmeans_iters=20, seed=seed, ratio_init=v).ratios()
                  for v in ("authors", "both-eps")}
    difference = (ratios["authors"] - ratios["both-eps"]).abs()
    return float(difference.max()), float(difference.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=4096, help="random inputs N per Hessian")
    parser.add_argument("--gptvq-parts", action="store_true", help="also GPTVQ's parts one at a time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, rows = time.perf_counter(), []
    for seed in args.seeds:
        for shape in SHAPES:
            w, h = random_layer(*shape, args.samples, seed)
            for bits in (2, 3):
                new = gptq_rows(w, h, bits) + [gptvq_row(w, h, bits, seed)]
                rows += [{"seed": seed, "shape": f"{shape[0]}x{shape[1]}", "bits": bits, **r} for r in new]
    table = pd.DataFrame(rows)
    table["ratio"] = table["ours"] / table["published"]
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format="%.4g"))
    summary = table.groupby(["method", "variant", "group", "bits"])[["ratio", "codes_differ_%"]]
    print("\nmean over seeds and shapes (ratio min-max):")
    print(summary.agg(["mean", "min", "max"]).to_string(float_format="%.3f"))
    if args.gptvq_parts:
        parts = parts_rows(args.seeds, args.samples).groupby(["bits", "part"])["ratio"]
        print("\nGPTVQ, one part from exact, the rest published: proxy loss / all published (mean, min, max)")
        print(parts.agg(["mean", "min", "max"]).to_string(float_format="%.3f"))
    for seed in args.seeds:
        print("\nVQ4DiT initial ratios, seed %d: max |authors - both-eps| %.2e, mean %.2e"
              % (seed, *ratio_init_difference(seed)))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
