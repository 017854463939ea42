"""What VQ4DiT's zero-data calibration costs at full size (random weights), on the quantize stage's code path.

Steps, each timed: the teacher trajectories (``collect_calibration_inputs`` on the whole model, the
real cache size), k-means codebooks and candidate assignments for the first ``--blocks`` blocks
(``quantize_model_linears``), then ``calibrate_blockwise`` on those blocks with ``--iterations``
optimiser steps each. Seconds per step are extrapolated to the paper preset's budget
(``config/config.yaml``: 50,000 steps per block, every block of the model). Deterministic
algorithms are on, as in the quantize stage. Timing does not depend on weight values.

    python benchmarks/calibration_cost.py --arch DiT-XL/2 --image-size 256 --blocks 2 --iterations 300  # GPU
    python benchmarks/calibration_cost.py --arch DiT-S/2 --image-size 32 --trajectories 1 --steps 2 \\
        --blocks 1 --iterations 3 --kmeans-iters 1                                                     # CPU check
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
import yaml

from vq4dit.assignments import quantize_model_linears
from vq4dit.calibration import CalibrationConfig, calibrate_blockwise, collect_calibration_inputs
from vq4dit.io import resolve_device
from vq4dit.models import block_linear_names, build_transformer

from timing import device_name, sync

GIB = 2**30
PAPER_CONFIG = Path(__file__).resolve().parents[1] / "config/config.yaml"


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


def timed_once(fn, device: torch.device):
    """(fn(), wall seconds) of one call, the device synchronised on both ends."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def keep_blocks(model: torch.nn.Module, n: int) -> None:
    """Cut the model to its first ``n`` transformer blocks (calibration only runs pos_embed and the blocks)."""
    model.transformer_blocks = torch.nn.ModuleList(list(model.transformer_blocks)[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=2, help="blocks quantized and calibrated")
    parser.add_argument("--iterations", type=int, default=300, help="optimiser steps per block")
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="sampling steps per teacher trajectory")
    parser.add_argument("--kmeans-iters", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=2, help="n of VQ4DiT (1: codebook-only calibration)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as the quantize stage
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(args.device)
    paper = yaml.safe_load(PAPER_CONFIG.read_text())["calibration"]
    cfg = CalibrationConfig.from_dict({**paper, "trajectories": args.trajectories, "steps": args.steps,
                                       "iterations": args.iterations, "kmeans_iters": args.kmeans_iters})
    teacher = build_transformer(args.arch, args.image_size // 8, 4, 1000).to(device).eval()
    n_blocks = len(teacher.transformer_blocks)
    calib, t_collect = timed_once(lambda: collect_calibration_inputs(teacher, cfg, device), device)
    keep_blocks(teacher, args.blocks)
    student = copy.deepcopy(teacher)
    names = block_linear_names(student)
    vq = dict(k=256, d=4, n_candidates=args.candidates, kmeans_iters=cfg.kmeans_iters, seed=cfg.seed)
    layers, t_kmeans = timed_once(lambda: quantize_model_linears(student, names, **vq), device)
    result, t_calib = timed_once(lambda: calibrate_blockwise(teacher, student, layers, calib, cfg), device)
    per_step = sorted(result["block_seconds"])[len(result["block_seconds"]) // 2] / cfg.iterations
    per_block = per_step * paper["iterations"] + t_kmeans / args.blocks
    print(f"device: {device_name(device)}, torch {torch.__version__}; "
          f"{args.arch} at {args.image_size}x{args.image_size}, "
          f"VQ k=256 d=4 n={args.candidates}, batch {cfg.batch_size}\n")
    print("| quantity | value |\n|---|---:|")
    print(f"| teacher trajectories ({cfg.trajectories} x {cfg.labels_per_trajectory} labels x {cfg.steps} steps), s "
          f"| {t_collect:.1f} |")
    print(f"| calibration inputs (doubled batch) | {len(calib)} |")
    print(f"| k-means ({cfg.kmeans_iters} iterations) + assignments, s per block | {t_kmeans / args.blocks:.2f} |")
    print(f"| calibration, ms per optimiser step (median block of {args.blocks}, {cfg.iterations} steps) "
          f"| {per_step * 1e3:.2f} |")
    print(f"| calibration of {args.blocks} blocks incl. caches, s | {t_calib:.1f} |")
    print(f"| peak GPU memory, GiB | {peak_gib(device):.2f} |")
    print(f"| extrapolated: one block at the paper preset's {paper['iterations']} steps, s | {per_block:.0f} |")
    print(f"| extrapolated: all {n_blocks} blocks, h | {per_block * n_blocks / 3600:.2f} |")


if __name__ == "__main__":
    main()
