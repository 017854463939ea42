"""Block-wise vs sequential VQ4DiT calibration on the smoke model: time, block MSE and FID.

For VQ 2-bit (k=256, d=4, n=2) on the trained digits DiT: k-means time per block, block-wise
calibration time per block, the authors' sequential loop at a matched budget, the final block
MSE (held-out teacher trajectories) and the FID of generated samples against scikit-learn's digits.

Budget matching: the sequential loop runs ``--outer`` trajectories of ``--steps`` sampling steps,
one optimiser step per sampling step on a batch of 2 x labels_per_trajectory inputs; block-wise
calibration gives every block the same number of steps (outer x steps) on the same batch size,
and also each smaller budget of ``--blockwise-iterations``. The speed-up reported is time to
quality: the sequential loop's time over the time of the cheapest block-wise run whose block MSE
and FID are both at least as good.

    python benchmarks/calibration_bench.py [--transformer DIR] [--features FILE] [--outer 10]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from vq4dit.assignments import VQLinear, quantize_model_linears
from vq4dit.calibration import (
    CalibrationConfig,
    block_mse,
    calibrate_blockwise,
    calibrate_sequential,
    collect_calibration_inputs,
)
from vq4dit.features import FeatureModel, extract
from vq4dit.metrics import fid_from_features
from vq4dit.models import block_linear_names, load_transformer
from vq4dit.prepare import digits_uint8
from vq4dit.sample import generate_shard

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")


def quantize(fp_model, n_candidates: int, cfg: CalibrationConfig) -> tuple:
    """A VQ 2-bit copy of ``fp_model``, its layers and the k-means seconds of every block."""
    q_model = copy.deepcopy(fp_model)
    names = block_linear_names(q_model)
    layers, seconds = {}, []
    for b in range(len(q_model.transformer_blocks)):
        start = time.perf_counter()
        block_names = [n for n in names if n.startswith(f"transformer_blocks.{b}.")]
        layers.update(quantize_model_linears(q_model, block_names, k=256, d=4, n_candidates=n_candidates,
                                             kmeans_iters=cfg.kmeans_iters, seed=cfg.seed))
        seconds.append(time.perf_counter() - start)
    return q_model, layers, seconds


def harden(layers: dict[str, VQLinear]) -> None:
    """Every layer to its argmax assignments (what the packed model stores)."""
    for layer in layers.values():
        layer.freeze_(0.0)


def fid(model, feature_model, reference: dict, args) -> float:
    images, _ = generate_shard(model, None, seed=0, start=0, count=args.samples, batch_size=args.samples,
                               steps=args.sample_steps, cfg_scale=1.5, cfg_channels=None)
    return fid_from_features(extract(images, feature_model, 500, DEVICE)["pool"], reference["pool"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer", default=REPO / "results/smoke/models/digits/transformer")
    parser.add_argument("--features", default=REPO / "results/smoke/models/feature_network.pt")
    parser.add_argument("--outer", type=int, default=10, help="sequential outer iterations (trajectories)")
    parser.add_argument("--trajectories", type=int, default=8, help="block-wise calibration trajectories")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of a calibration trajectory")
    parser.add_argument("--samples", type=int, default=500, help="generated images per FID")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--ratio-reg-start", type=int, default=10, help="L_r patience (steps)")
    parser.add_argument("--blockwise-iterations", type=int, nargs="*", default=[100, 200],
                        help="smaller block-wise budgets (steps per block) to find the time to quality")
    parser.add_argument("--joint-blocks", type=int, default=1,
                        help="blocks per block-wise optimiser step (0: all; 1: as the smoke preset)")
    parser.add_argument("--blockwise-batch-size", type=int, default=None,
                        help="batch of those smaller budgets (default: the sequential loop's)")
    parser.add_argument("--blockwise-deadline", type=float, default=1.0,
                        help="ratio_reg_deadline of those smaller budgets (1.0: the patience rule alone)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    fp_model = load_transformer(args.transformer, DEVICE)
    cfg = CalibrationConfig(trajectories=args.trajectories, steps=args.steps, iterations=args.outer * args.steps,
                            batch_size=2 * CalibrationConfig.labels_per_trajectory,
                            ratio_reg_start=args.ratio_reg_start, joint_blocks=args.joint_blocks)
    start = time.perf_counter()
    calib = collect_calibration_inputs(fp_model, cfg, DEVICE)
    collect_seconds = time.perf_counter() - start
    held_out = collect_calibration_inputs(fp_model, CalibrationConfig(trajectories=2, steps=args.steps, seed=1), DEVICE)
    feature_model = FeatureModel("digits-cnn", str(args.features))
    reference = extract(digits_uint8()[0], feature_model, 500, DEVICE)

    rows = [("fp", 0.0, 0.0, block_mse(fp_model, fp_model, held_out), fid(fp_model, feature_model, reference, args),
             None)]
    runs = {
        "vq k-means only (n=1)": (1, None, cfg),
        "vq-codebook block-wise (n=1)": (1, "blockwise", cfg),
        "vq4dit sequential (n=2)": (2, "sequential", cfg),
        f"vq4dit block-wise (n=2, {cfg.iterations} steps/block)": (2, "blockwise", cfg),
    }
    batch = args.blockwise_batch_size or cfg.batch_size
    for iterations in args.blockwise_iterations:
        runs[f"vq4dit block-wise (n=2, {iterations} steps/block, batch {batch}, L_r by {args.blockwise_deadline:g})"] = (
            2, "blockwise", CalibrationConfig.from_dict({**vars(cfg), "iterations": iterations, "batch_size": batch,
                                                         "ratio_reg_deadline": args.blockwise_deadline}))
    for name, (n, mode, run_cfg) in runs.items():
        q_model, layers, kmeans_seconds = quantize(fp_model, n, cfg)
        history = {"calibration_seconds": 0.0}
        if mode == "blockwise":
            history = calibrate_blockwise(fp_model, q_model, layers, calib, run_cfg)
            history["calibration_seconds"] += collect_seconds
            print(f"{name}: k-means s/block {np.round(kmeans_seconds, 2).tolist()}, "
                  f"calibration s/block {np.round(history['block_seconds'], 2).tolist()}, "
                  f"L_r on at {history['ratio_reg_on']}")
        elif mode == "sequential":
            history = calibrate_sequential(fp_model, q_model, layers, cfg, DEVICE, args.outer)
            print(f"{name}: L_r on at step {history['ratio_reg_on'][0]}")
        harden(layers)
        rows.append((name, sum(kmeans_seconds), history["calibration_seconds"], block_mse(fp_model, q_model, held_out),
                     fid(q_model, feature_model, reference, args), mode))

    print(f"\ncalibration: {cfg}\nteacher trajectories for the block-wise cache: {collect_seconds:.1f} s "
          f"(included in its calibration time)\n")
    print("| setting | k-means s | calibration s | block MSE (held-out) | FID |")
    print("|---|---:|---:|---:|---:|")
    for name, km, cal, mse, f, _ in rows:
        print(f"| {name} | {km:.1f} | {cal:.1f} | {mse:.3g} | {f:.2f} |")
    report_speedup(rows)


def report_speedup(rows: list[tuple]) -> None:
    """Matched-steps ratio and time-to-quality speed-up of block-wise over sequential calibration."""
    sequential = next(r for r in rows if r[5] == "sequential")
    blockwise = [r for r in rows if r[5] == "blockwise" and "n=2" in r[0]]
    print(f"\nmatched steps: sequential {sequential[2]:.1f} s / block-wise {blockwise[0][2]:.1f} s = "
          f"{sequential[2] / blockwise[0][2]:.2f}x")
    good = [r for r in blockwise if r[3] <= sequential[3] and r[4] <= sequential[4]]
    if good:
        best = min(good, key=lambda r: r[2])
        print(f"time to sequential's quality: {best[0]} in {best[2]:.1f} s vs {sequential[2]:.1f} s = "
              f"{sequential[2] / best[2]:.2f}x faster")
    else:
        print("no block-wise run reached the sequential loop's block MSE and FID")


if __name__ == "__main__":
    main()
