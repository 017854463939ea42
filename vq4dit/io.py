"""Small file and device helpers shared by the stages.

torch is imported inside the device helpers only: the stages that never touch a model (tables, claims,
manifest, plots) import this module without paying torch's start-up (seconds per job).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch


#: open lock files of the GPUs this process holds (released when the process exits)
_GPU_LOCKS: dict[int, object] = {}


def claim_gpu(lock_dir: str | None = None) -> int:
    """Index of a visible GPU no other vq4dit process on this node holds (an flock per GPU).

    Snakemake never sets CUDA_VISIBLE_DEVICES, so local jobs running side by side (``--resources
    gpu=N``) would all pick GPU 0; each job instead locks the first free GPU for its lifetime.
    """
    import torch

    if _GPU_LOCKS:
        return next(iter(_GPU_LOCKS))
    folder = Path(lock_dir or os.environ.get("VQ4DIT_GPU_LOCKS", tempfile.gettempdir()))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "-")
    for index in range(torch.cuda.device_count()):
        handle = open(folder / f"vq4dit-gpu-{visible}-{index}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _GPU_LOCKS[index] = handle
        return index
    raise RuntimeError(f"all {torch.cuda.device_count()} GPUs are held by other vq4dit jobs "
                       f"(lock files in {folder}); run with --resources gpu=<number of GPUs>")


def resolve_device(name: str) -> torch.device:
    """``auto``: a free GPU when CUDA is present (see :func:`claim_gpu`), else the CPU; else as given."""
    import torch

    if name in ("auto", "cuda"):
        return torch.device("cuda", claim_gpu()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.part")


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz so that an interrupted job never leaves a complete-looking file."""
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_npz(path: str | Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load the named arrays of an .npz, with an error naming the file and the missing key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with np.load(path) as data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; found {data.files}")
        return {k: data[k] for k in keys}


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm progress bar; in log files (no terminal) it updates every 10 s instead of 10 times a second."""
    return tqdm(iterable, mininterval=0.1 if sys.stderr.isatty() else 10.0, **kwargs)


def log_peak_gpu_memory(logger, device: torch.device) -> None:
    """Log the peak GPU memory of this process (read by benchmarks/rehearsal_costs.py); nothing on the CPU."""
    import torch

    if device.type == "cuda":
        logger.info("peak GPU memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)


#: key of the job's environment (:func:`environment`) in the .npz files the sample and features stages write
META_KEY = "meta"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``, else ``platform``)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, **extra) -> dict:
    """Device and numerics of this job, for its outputs and the run's manifest (``vq4dit.manifest``).

    The device's name, torch/CUDA versions, TF32 and deterministic-kernel flags, float32 matmul
    precision and torch's thread count as they are when called (call it after the work), plus
    ``extra`` (seeds, precision).
    """
    import torch

    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        **extra,
    }


def meta_array(meta: dict) -> np.ndarray:
    """``meta`` as a 0-d string array, storable in an .npz without pickling."""
    return np.array(json.dumps(meta, sort_keys=True))


def read_meta(path: str | Path) -> dict | None:
    """The ``meta`` entry of an .npz written by :func:`meta_array`, or None when it has none."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data[META_KEY])) if META_KEY in data.files else None


def config_from_dict(cls, d: dict, section: str):
    """Dataclass ``cls`` from a (possibly partial) dict of config key ``section``; an unknown key raises ValueError naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {section} key(s) {unknown}; expected some of {sorted(known)}")
    return cls(**d)


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Many mid-sized temporaries (below glibc's mmap threshold) stay resident after they are freed, and
    later large tensors are mmapped afresh instead of reusing them: after the k-means initialisation of
    DiT-XL/2 that was gigabytes of resident but free memory under the calibration's peak.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
