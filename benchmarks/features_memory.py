"""Peak host memory of the features job for N and 4N stand-in images: flat in the sample count (bar: within 10 %).

Writes N and 4N random uint8 images at 256 px as sample shards (``arr_0``, ``--shard-size`` images each), a
random-weight Inception (``features.save_random_weights``: the real one's architecture and memory), and runs
``python -m vq4dit features`` on each set in a child process; its peak resident memory (VmHWM, the child's
``ru_maxrss`` from ``os.wait4``) is printed per set with their ratio.

    python benchmarks/features_memory.py [--n 200] [--shard-size 150] [--batch-size 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vq4dit.features import save_random_weights

SIDE = 256


def write_shards(folder: Path, count: int, shard_size: int) -> list[str]:
    """``count`` random images in shards of ``shard_size``, one shard in memory at a time."""
    rng = np.random.default_rng(count)
    paths = []
    for shard, begin in enumerate(range(0, count, shard_size)):
        path = folder / f"shard{shard}.npz"
        np.savez(path, arr_0=rng.integers(0, 256, (min(shard_size, count - begin), SIDE, SIDE, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


def features_job_peak(shards: list[str], weights: Path, batch_size: int, output: Path) -> tuple[float, float]:
    """(VmHWM in MB, seconds) of one features job."""
    command = [sys.executable, "-m", "vq4dit", "features", "--inputs", *shards, "--extractor", "inception-v3-compat",
               "--weights", str(weights), "--batch-size", str(batch_size), "--device", "cpu", "--output", str(output)]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"`{' '.join(command)}` failed: {child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux: kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="images of the small set (the large one has 4N)")
    parser.add_argument("--shard-size", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=10, help="small: the network's activations are not what grows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = save_random_weights("inception-v3-compat", folder / "random.pth")
        peaks = []
        for count in (args.n, 4 * args.n):
            sets = folder / f"n{count}"
            sets.mkdir()
            shards = write_shards(sets, count, args.shard_size)
            peak, seconds = features_job_peak(shards, weights, args.batch_size, sets / "features.npz")
            peaks.append(peak)
            print(f"features of {count} images ({len(shards)} shards of <= {args.shard_size}, {SIDE} px, "
                  f"batch {args.batch_size}): VmHWM {peak:.0f} MB, {seconds:.0f} s", flush=True)
    ratio = peaks[1] / peaks[0]
    print(f"4N / N peak: {ratio:.3f} ({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10 %); "
          f"the set's images would be {3 * args.n * SIDE * SIDE * 3 / 1e6:.0f} MB more at 4N held whole")


if __name__ == "__main__":
    main()
