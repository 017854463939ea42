"""Time and peak memory of vq4dit.metrics on random features.

    python benchmarks/metrics_bench.py --n 10000 50000 --dim 2048 [--device cpu]

Each sample count runs in a fresh process, so its peak resident memory (``ru_maxrss``) covers the
random sample and reference features (pool, spatial, logits) plus all five metrics. The issue's
budget is 8 GiB at 50k samples x 2048 features.
"""

import argparse
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch

from vq4dit import metrics

SPATIAL_DIM = 2023  # 7 x 17 x 17
NUM_CLASSES = 1008
GIB = 2**30


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench(n: int, dim: int, device: str) -> dict[str, float]:
    """Seconds per metric and peak RSS (GiB) for ``n`` random samples and ``n`` references."""
    rng = np.random.default_rng(0)
    sample = {"pool": rng.random((n, dim), dtype=np.float32),
              "spatial": rng.random((n, SPATIAL_DIM), dtype=np.float32),
              "logits": rng.normal(size=(n, NUM_CLASSES)).astype(np.float32)}
    reference = {"pool": rng.random((n, dim), dtype=np.float32) * 1.05,
                 "spatial": rng.random((n, SPATIAL_DIM), dtype=np.float32)}
    times = {}
    _, times["fid_s"] = _timed(lambda: metrics.fid_from_features(sample["pool"], reference["pool"]))
    _, times["sfid_s"] = _timed(
        lambda: metrics.fid_from_features(sample["spatial"], reference["spatial"]))
    _, times["is_s"] = _timed(lambda: metrics.inception_score(sample["logits"]))
    _, times["precision_recall_s"] = _timed(
        lambda: metrics.precision_recall(reference["pool"], sample["pool"], device=device))
    times["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return times


def distance_block_timings(dim: int, size: int = 10_000) -> dict[str, float]:
    """Seconds of one float64 ``size x size`` squared-distance block, numpy vs torch (CPU)."""
    rng = np.random.default_rng(0)
    u, v = rng.random((size, dim)), rng.random((size, dim))

    def with_numpy() -> np.ndarray:
        dist = u @ v.T
        dist *= -2
        dist += (u * u).sum(1)[:, None]
        dist += (v * v).sum(1)[None, :]
        return np.maximum(dist, 0, out=dist)

    tu, tv = torch.from_numpy(u), torch.from_numpy(v)
    return {"numpy_s": _timed(with_numpy)[1],
            "torch_s": _timed(lambda: metrics._sq_dists(tu, tv, adm_float16=False))[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block", action="store_true",
                        help="also time one 10k x 10k distance block with numpy and torch")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}", flush=True)
    if args.block:
        print(f"distance block 10000 x 10000 x {args.dim} float64:",
              distance_block_timings(args.dim), flush=True)
    for n in args.n:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(bench, n, args.dim, args.device).result()
        line = "  ".join(f"{key} {value:.1f}" for key, value in result.items())
        verdict = "ok" if result["peak_rss_gib"] < 8 else "OVER 8 GiB"
        print(f"n={n} dim={args.dim}: {line}  ({verdict})", flush=True)


if __name__ == "__main__":
    main()
