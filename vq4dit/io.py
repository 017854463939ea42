"""Small file and device helpers shared by the stages."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
            raise KeyError(f"{path}: missing key(s) {missing}; found {data.files}")
        return {k: data[k] for k in keys}


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm progress bar; in log files (no terminal) it updates every 10 s instead of 10 times a second."""
    return tqdm(iterable, mininterval=0.1 if sys.stderr.isatty() else 10.0, **kwargs)
