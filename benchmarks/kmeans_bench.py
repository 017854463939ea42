"""Cost of ``vq4dit.methods.codebook.kmeans`` on one DiT-XL/2 layer, and of each of its parts, on CPU or GPU.

One weight of the given shape (random, DiT-like scale) cut into d=4 sub-vectors, k=256: the whole
k-means (``--iters`` Lloyd iterations, with and without deterministic algorithms, which the quantize
stage turns on), then each part alone: the k-means++ seeding, one assignment pass, one centroid
update, and inside the update the sort, the gather and the float64 cumulative sum, both ways: along
dim 0 of (N, d) (the code before it was found 1,000x slower on CUDA) and per column as 1-D scans
(what ``codebook._update`` runs now); the assignment pass also in its former (k x rows) layout.

    python benchmarks/kmeans_bench.py --shape 4608 1152 --iters 20          # GPU
    python benchmarks/kmeans_bench.py --shape 1152 288 --iters 2 --device cpu
"""

from __future__ import annotations

import argparse

import torch

from vq4dit.methods.codebook import CHUNK_ELEMENTS, _assign, _kmeans_plus_plus, _update, kmeans, subvectors
from vq4dit.io import device_name, resolve_device

from timing import timed

REPEATS = 3
"""Timed calls per part (the best counts), after one warm-up call."""


def assign_over_dim0(x: torch.Tensor, codebook: torch.Tensor) -> None:
    """The assignment pass's former layout: codewords along dim 0, the minimum taken over it."""
    codebook_sq = codebook.pow(2).sum(1, keepdim=True)
    step = CHUNK_ELEMENTS // codebook.shape[0]
    for start in range(0, x.shape[0], step):
        torch.addmm(codebook_sq, codebook, x[start : start + step].t(), alpha=-2.0).min(dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[4608, 1152], help="weight out x in")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    x = subvectors(torch.randn(*args.shape, device=device) * 0.02, 4).contiguous()
    k = 256
    codebook = _kmeans_plus_plus(x[:16384], k, torch.Generator().manual_seed(0))
    assignments, sq = _assign(x, codebook)
    order = torch.argsort(assignments, stable=True)
    rows = []
    for deterministic in (True, False):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        rows.append((f"kmeans, {args.iters} iterations, deterministic={deterministic}",
                     timed(lambda: kmeans(x, k, iters=args.iters), device, repeats=1)))
    torch.use_deterministic_algorithms(True, warn_only=True)
    sorted_x = x[order].double()
    parts = {
        "k-means++ seeding (16384 points)": lambda: _kmeans_plus_plus(x[:16384], k, torch.Generator().manual_seed(0)),
        "assignment pass": lambda: _assign(x, codebook),
        "  the same, (k x rows) distances reduced over dim 0 (before 2026-12-01)": lambda: assign_over_dim0(x, codebook),
        "centroid update": lambda: _update(x, assignments, sq, k),
        "  argsort (stable)": lambda: torch.argsort(assignments, stable=True),
        "  gather + float64": lambda: x[order].double(),
        "  cumsum along dim 0 of (N, d) (the old update)": lambda: sorted_x.cumsum(0),
        "  cumsum per column, 1-D scans (the update now)": lambda: torch.stack([c.cumsum(0) for c in
                                                                                sorted_x.t().unbind()], 1),
    }
    rows += [(label, timed(fn, device, REPEATS)) for label, fn in parts.items()]
    print(f"{device_name(device)}, torch {torch.__version__}; weight {args.shape[0]}x{args.shape[1]} -> "
          f"{x.shape[0]} sub-vectors of d=4, k={k}\n\n| part | ms |\n|---|---:|")
    print("\n".join(f"| {label} | {seconds * 1e3:.1f} |" for label, seconds in rows))


if __name__ == "__main__":
    main()
