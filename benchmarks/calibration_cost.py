"""What VQ4DiT's calibration costs per whole-model optimiser step at DiT-XL/2 size, against dense arithmetic.

Random weights (speed does not depend on their values), the first ``--blocks`` blocks of the model
(every block costs the same; the step time scales with their number). Measured on the quantize
stage's code path with deterministic algorithms on:

- k-means codebooks and candidate assignments per block (``quantize_model_linears``);
- the driver (``vq4dit.methods.calibration.calibrate``): ms per optimiser step, i.e. one teacher sampling step
  (forward of the guided batch of ``2 x --labels`` inputs), the student's forward and backward through
  the soft VQ weights, L_r, the switch, RMSprop and freezing;
- the same arithmetic with dense weights: teacher forward + student forward and backward (the driver's
  objective) with ``nn.Linear`` layers, same batch, same device;
- the profiler's operator count per step of both (each operator is at least one kernel launch on a GPU).

The last line is ``overhead ratio: X`` = driver ms per step / dense ms per step. The paper preset's
budget (``config/config.yaml``: outer iterations x steps) turns the per-step time, scaled to all 28
blocks, into an extrapolated time per calibrated setting.

    python benchmarks/calibration_cost.py --device cpu            # default: 2 blocks, batch 8, 256 px (≈ 5 min on 2 cores)
    python benchmarks/calibration_cost.py --device cuda --blocks 28 --precision tf32   # a GPU: the real model
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.profiler import ProfilerActivity, profile

from vq4dit.methods.assignments import quantize_model_linears
from vq4dit.methods.calibration import CalibrationConfig, calibrate
from vq4dit.io import device_name, resolve_device
from vq4dit.models import block_linear_names, build_transformer
from vq4dit.sample import set_precision

from timing import sync

GIB = 2**30
PAPER_CONFIG = Path(__file__).resolve().parents[1] / "config/config.yaml"


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


def wall(fn, device: torch.device) -> float:
    """Seconds of one call, the device synchronised on both ends."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def operators(fn) -> int:
    """Operators (profiler events) recorded during one call."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return len(prof.events())


def keep_blocks(model: torch.nn.Module, n: int) -> None:
    """Cut the model to its first ``n`` transformer blocks."""
    model.transformer_blocks = torch.nn.ModuleList(list(model.transformer_blocks)[:n])


class DenseStep:
    """Teacher forward + dense student forward and backward on one guided batch (the driver's arithmetic)."""

    def __init__(self, teacher: torch.nn.Module, cfg: CalibrationConfig, device: torch.device) -> None:
        self.teacher, self.cfg = teacher, cfg
        self.student = copy.deepcopy(teacher)
        names = set(block_linear_names(self.student))
        for name, p in self.student.named_parameters():
            p.requires_grad_(name.rsplit(".", 1)[0] in names)
        config = teacher.config
        batch = 2 * cfg.labels_per_trajectory
        self.x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, device=device)
        self.t = torch.full((batch,), 500, device=device)
        self.y = torch.randint(int(config.num_embeds_ada_norm) + 1, (batch,), device=device)
        self.autocast = set_precision(cfg.precision, device.type)

    def __call__(self) -> None:
        acts = []
        handles = [self.teacher.pos_embed.register_forward_hook(lambda m, a, out: acts.append(out))]
        handles += [b.register_forward_hook(lambda m, a, out: acts.append(out)) for b in self.teacher.transformer_blocks]
        with torch.no_grad(), self.autocast:
            self.teacher(self.x, timestep=self.t, class_labels=self.y)
        for handle in handles:
            handle.remove()
        with self.autocast:
            if self.cfg.objective == "sequential":
                outputs, hooks = [], [b.register_forward_hook(lambda m, a, out: outputs.append(out))
                                      for b in self.student.transformer_blocks]
                self.student(self.x, timestep=self.t, class_labels=self.y)
                for hook in hooks:
                    hook.remove()
            else:
                outputs = [block(h, timestep=self.t, class_labels=self.y)
                           for block, h in zip(self.student.transformer_blocks, acts[:-1])]
            loss = torch.stack([F.mse_loss(o.float(), a.float()) for o, a in zip(outputs, acts[1:])]).mean()
        loss.backward()
        self.student.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=2, help="blocks kept (DiT-XL/2 has 28)")
    parser.add_argument("--labels", type=int, default=4, help="labels per step (batch = 2x with the null labels)")
    parser.add_argument("--steps", type=int, default=2, help="timed optimiser steps per round (after a warm-up step)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of driver and dense steps, interleaved (medians)")
    parser.add_argument("--kmeans-iters", type=int, default=1, help="Lloyd iterations (their cost is not the point)")
    parser.add_argument("--candidates", type=int, default=2, help="n of VQ4DiT (1: codebook-only calibration)")
    parser.add_argument("--objective", default=None, help="blockwise or sequential (default: the paper preset's)")
    parser.add_argument("--precision", default="tf32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as the quantize stage
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(args.device)
    paper = yaml.safe_load(PAPER_CONFIG.read_text())["calibration"]
    settings = {**paper, "labels_per_trajectory": args.labels, "kmeans_iters": args.kmeans_iters,
                "precision": args.precision, "checkpoint_minutes": 1e9}
    if args.objective:
        settings["objective"] = args.objective
    cfg = CalibrationConfig.from_dict(settings)
    teacher = build_transformer(args.arch, args.image_size // 8, 4, 1000).to(device).eval()
    full_blocks = len(teacher.transformer_blocks)
    keep_blocks(teacher, args.blocks)
    student = copy.deepcopy(teacher)
    names = block_linear_names(student)
    start = time.perf_counter()
    vq, layers = quantize_model_linears(student, names, k=256, d=4, n_candidates=args.candidates,
                                        kmeans_iters=cfg.kmeans_iters, seed=cfg.seed)
    kmeans_s = (time.perf_counter() - start) / args.blocks

    def driver(steps: int):
        run = CalibrationConfig.from_dict({**vars(cfg), "outer_iterations": 1, "steps": steps})
        return lambda: calibrate(teacher, student, vq, layers, run)

    dense = DenseStep(teacher, cfg, device)
    wall(driver(1), device)  # warm-ups
    wall(dense, device)
    vq_times, dense_times = [], []
    for _ in range(args.rounds):  # interleaved, so a change of machine load hits both alike
        vq_times.append(wall(driver(args.steps), device) / args.steps)
        dense_times.append(statistics.mean(wall(dense, device) for _ in range(args.steps)))
    vq_ms, dense_ms = statistics.median(vq_times) * 1e3, statistics.median(dense_times) * 1e3
    vq_ops = operators(driver(2)) - operators(driver(1))
    dense_ops = operators(dense)
    budget = paper["outer_iterations"] * paper["steps"]
    per_setting_h = vq_ms / 1e3 * full_blocks / args.blocks * budget / 3600
    print(f"device: {device_name(device)}, torch {torch.__version__}; {args.arch} at {args.image_size}x{args.image_size}, "
          f"first {args.blocks} of {full_blocks} blocks; VQ k=256 d=4 n={args.candidates}; batch {2 * args.labels}; "
          f"objective {cfg.objective}; precision {cfg.precision}\n")
    print("| quantity | value |\n|---|---:|")
    print(f"| k-means ({cfg.kmeans_iters} Lloyd iterations) + candidates, s per block | {kmeans_s:.1f} |")
    print(f"| driver, ms per whole-model optimiser step (median of {args.rounds} rounds of {args.steps}) | {vq_ms:.1f} |")
    print(f"| dense arithmetic (teacher fwd + student fwd/bwd, nn.Linear), ms per step (likewise) | {dense_ms:.1f} |")
    print(f"| operators per step: driver / dense | {vq_ops} / {dense_ops} |")
    print(f"| peak GPU memory, GiB | {peak_gib(device):.2f} |")
    print(f"| peak host memory of the process (all of the above), GiB | "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.2f} |")
    print(f"| extrapolated: {budget:,} steps x {full_blocks} blocks, h per calibrated setting | {per_setting_h:.2f} |")
    print(f"\noverhead ratio: {vq_ms / dense_ms:.2f}")


if __name__ == "__main__":
    main()
