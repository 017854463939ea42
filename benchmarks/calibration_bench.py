"""Variants of VQ4DiT's calibration on the smoke model: quality per second.

For a VQ setting (default 2-bit: k=256, d=4, n=2) on the trained digits DiT, each variant starts
from the same k-means codebooks and candidates, runs :func:`vq4dit.methods.calibration.calibrate` with the
smoke preset's calibration config (``config/smoke.yaml``) changed as the variant says, hardens the
assignments, rounds the codebooks to fp16 (what the packed file stores) and reports calibration
seconds, block MSE on held-out teacher trajectories and FID of generated samples against
scikit-learn's digits, with the sample stage's seed, count, batch and steps (``--samples``,
``--sample-steps``): the same numbers as the smoke run's metrics table for the same model.

Variants (``--variants``; each changes the smoke preset's calibration in one respect):

- ``preset``: ``config/smoke.yaml``'s calibration as it is;
- ``blockwise`` / ``sequential``: the objective (student blocks fed the teacher's block inputs / their
  own activations, the authors');
- ``trajectory-min``: L_r added whenever it is above its running minimum of the trajectory (the
  authors' code) instead of the patience rule;
- ``after-hard``: codebooks train only once their layer is hard (the authors' code);
- ``one-stream``: every step at one timestep (the authors' loop) instead of staggered streams;
- ``authors``: the authors' loop in every respect (sequential, trajectory-min, after-hard, one stream,
  4 labels a step);
- ``n3`` / ``n1``: three / one candidates (n = 1 is the codebook-only ablation);
- ``kmeans``: no calibration (k-means assignments).

``--outer`` lists the budgets (teacher trajectories of 50 steps, one whole-model step each).

    python benchmarks/calibration_bench.py --variants preset blockwise trajectory-min after-hard --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from vq4dit.methods.assignments import quantize_model_linears
from vq4dit.methods.calibration import CalibrationConfig, Trajectories, block_mse, calibrate, collect_calibration_inputs
from vq4dit.features import FeatureModel, extract
from vq4dit.metrics import fid_from_features
from vq4dit.models import block_linear_names, load_transformer
from vq4dit.prepare import digits_uint8
from vq4dit.sample import generate_shard

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cpu")

#: variant -> (candidates or None for the setting's n, calibration config changes; None: no calibration)
VARIANTS: dict[str, tuple[int | None, dict | None]] = {
    "preset": (None, {}),
    "blockwise": (None, {"objective": "blockwise"}),
    "sequential": (None, {"objective": "sequential"}),
    "trajectory-min": (None, {"ratio_reg_rule": "trajectory-min"}),
    "after-hard": (None, {"codebook_training": "after-hard"}),
    "one-stream": (None, {"streams": 1}),
    "authors": (None, {"objective": "sequential", "ratio_reg_rule": "trajectory-min", "codebook_training": "after-hard",
                       "streams": 1, "labels_per_trajectory": 4}),
    "n3": (3, {}),
    "n1": (1, {}),
    "kmeans": (1, None),
}


def fid(model, feature_model, reference: dict, args) -> float:
    images, _ = generate_shard(model, None, seed=args.seed, start=0, count=args.samples, batch_size=400,
                               steps=args.sample_steps, cfg_scale=1.5, cfg_channels=None)
    return fid_from_features(extract(images, feature_model, 500, DEVICE)["pool"], reference["pool"])


HELD_OUT_SEED = 1000
"""Seed of the two held-out teacher trajectories of the block MSE (the same for every calibration seed)."""


def quantized_copy(fp_model, names: list[str], n: int, args, base: CalibrationConfig, seed: int):
    """A VQ copy of ``fp_model`` with k-means codebooks and candidates (k-means seeded with ``seed``)."""
    q_model = copy.deepcopy(fp_model)
    quantize_model_linears(q_model, names, k=args.k, d=args.d, n_candidates=n, kmeans_iters=base.kmeans_iters, seed=seed)
    return q_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer", default=REPO / "results/smoke/models/digits/transformer")
    parser.add_argument("--features", default=REPO / "results/smoke/models/feature_network.pt")
    parser.add_argument("--variants", nargs="+", default=["preset"], choices=list(VARIANTS))
    parser.add_argument("--outer", type=int, nargs="+", default=[8], help="budgets: teacher trajectories")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (k-means, trajectories)")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--n", type=int, default=2, help="candidates of the VQ4DiT variants")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more calibration config changes for every variant (YAML values)")
    parser.add_argument("--samples", type=int, default=800, help="generated images per FID")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the smoke preset's quantize jobs: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the quantize stage

    smoke = yaml.safe_load((REPO / "config/smoke.yaml").read_text())["calibration"]
    smoke.update({key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)})
    base = CalibrationConfig.from_dict(smoke)
    fp_model = load_transformer(args.transformer, DEVICE)
    spec = Trajectories(2, base.labels_per_trajectory, base.steps, base.cfg_scale, base.cfg_channels, HELD_OUT_SEED)
    held_out = collect_calibration_inputs(fp_model, spec, DEVICE)
    feature_model = FeatureModel("digits-cnn", str(args.features))
    reference = extract(digits_uint8()[0], feature_model, 500, DEVICE)
    names = block_linear_names(fp_model)
    print(f"calibration base: {base}\n")
    print("| variant | seed | outer x steps | calibration s | L_r on at step (steps on) | block MSE (held-out) | FID |\n"
          "|---|---:|---|---:|---|---:|---:|", flush=True)
    print(f"| fp | – | – | – | – | 0 | {fid(fp_model, feature_model, reference, args):.2f} |", flush=True)
    rows = []
    for seed in args.seeds:
        kmeans: dict[int, torch.nn.Module] = {}
        for name in args.variants:
            n, changes = VARIANTS[name]
            n = args.n if n is None else n
            if n not in kmeans:  # k-means once per candidate count and seed
                kmeans[n] = quantized_copy(fp_model, names, n, args, base, seed)
            for outer in args.outer if changes is not None else [0]:
                q_model = copy.deepcopy(kmeans[n])  # deep-copies the container with the layers that share it
                layers = {layer: q_model.get_submodule(layer) for layer in names}
                vq = next(iter(layers.values())).vq
                seconds, switch = 0.0, "–"
                if changes is not None:
                    cfg = CalibrationConfig.from_dict({**vars(base), **changes, "outer_iterations": outer, "seed": seed})
                    start = time.perf_counter()
                    history = calibrate(fp_model, q_model, vq, layers, cfg)
                    seconds = time.perf_counter() - start
                    switch = f"{history['ratio_reg_on']} ({history['ratio_reg_steps']})"
                vq.harden_()
                with torch.no_grad():
                    vq.codebook.copy_(vq.codebook.half().float())  # the packed file's fp16 codebooks
                mse, score = block_mse(fp_model, q_model, held_out), fid(q_model, feature_model, reference, args)
                rows.append({"variant": f"{name} (n={n}), {outer} x {base.steps}", "seconds": seconds, "fid": score})
                print(f"| {name} (n={n}) | {seed} | {outer} x {base.steps} | {seconds:.1f} | {switch} | {mse:.3g} | "
                      f"{score:.2f} |", flush=True)
    summary = pd.DataFrame(rows).groupby("variant", sort=False).agg(
        seeds=("fid", "size"), calibration_s=("seconds", "mean"), fid_mean=("fid", "mean"), fid_std=("fid", "std"))
    print("\n" + summary.round(2).to_markdown())


if __name__ == "__main__":
    main()
