"""What checking a file costs: the checksum record of a sample shard, written and verified, at paper size.

Writes a stand-in shard of random uint8 images (default 2,500 images of 512 px: one paper shard,
1.97 GB) with ``vq4dit.io.atomic_savez`` (which hashes each array as stored), then times what a
consuming job adds before it reads the shard (``verify_npz``: sha256 and the zip's CRC-32 of every
array, streamed) beside the read itself (``np.load`` of ``arr_0``) and a plain file sha256
(``file_sha256``, the packed model's check). The file is freshly written, so it is read from the
page cache: on a network file system a cold read costs one more pass over the file.

    python benchmarks/checksum_cost.py [--images 2500] [--size 512] [--folder /tmp]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vq4dit.io import atomic_savez, file_sha256, verify_npz


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2500)
    parser.add_argument("--size", type=int, default=512, help="image side (px)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--folder", default=None, help="where the stand-in shard is written (default: the temp folder)")
    args = parser.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    labels = np.arange(args.images)
    gb = images.nbytes / 1e9
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        shard = Path(folder) / "shard0.npz"
        timings = {
            "np.savez alone (no record)": seconds(lambda: np.savez(shard, arr_0=images, labels=labels), 1),
            "write with checksum record (atomic_savez)": seconds(
                lambda: atomic_savez(shard, "sample", arr_0=images, labels=labels), 1),
            "verify_npz (sha256 + CRC-32 of every array)": seconds(lambda: verify_npz(shard), args.repeats),
            "np.load arr_0 (the read itself)": seconds(lambda: np.load(shard)["arr_0"], args.repeats),
            "file_sha256 (whole file)": seconds(lambda: file_sha256(shard), args.repeats),
        }
    print(f"stand-in shard: {args.images} images of {args.size} px, {gb:.2f} GB of uint8")
    for name, s in timings.items():
        print(f"{name:46s} {s:7.2f} s  {gb / s:6.2f} GB/s")


if __name__ == "__main__":
    main()
