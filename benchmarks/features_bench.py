"""Feature-extraction throughput of the metrics' feature networks (images/s), on CPU or GPU.

Runs ``vq4dit.features.extract`` (one pass: pool, spatial, logits) over random uint8 images.
Inception weights: a real ``weights-inception-2015-12-05-6726825d.pth`` via ``--weights``, or
random weights (same architecture and cost) when none is given.

    python benchmarks/features_bench.py [--extractor inception-v3-compat] [--n 256] [--size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vq4dit.features import FeatureModel, extract, save_random_weights
from vq4dit.io import device_name, resolve_device



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="inception-v3-compat", choices=["inception-v3-compat", "digits-cnn"])
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--n", type=int, default=256, help="images")
    parser.add_argument("--size", type=int, default=256, help="image side (inception resizes to 299)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    channels, side = (1, 8) if args.extractor == "digits-cnn" else (3, args.size)
    images = np.random.default_rng(0).integers(0, 256, (args.n, side, side, channels), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        weights = args.weights or save_random_weights(args.extractor, Path(folder) / "random.pth")
        model = FeatureModel(args.extractor, str(weights))
        extract(images[: args.batch_size], model, args.batch_size, device)  # warm-up
        start = time.perf_counter()
        extract(images, model, args.batch_size, device)
        seconds = time.perf_counter() - start
    print(f"{args.extractor}: {args.n} images {side}x{side} in {seconds:.1f} s = {args.n / seconds:.1f} images/s "
          f"({device_name(device)})")


if __name__ == "__main__":
    main()
