"""Small file and device helpers shared by the stages.

torch is imported inside the device helpers only: the stages that never touch a model (tables, claims,
manifest, plots) import this module without paying torch's start-up (seconds per job).
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
    """``path``'s name in a hidden folder beside it: writers that record their file's name (torch.save names
    its zip's records after it) write the same bytes as to ``path`` itself."""
    folder = path.with_name(f".{path.name}.part")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / path.name


@contextmanager
def atomic_output(path: Path, write_errors: tuple[type[Exception], ...] = ()) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed to ``path`` when the block succeeds and removed otherwise.

    A failed write (disk full, quota, I/O error) raises OSError naming ``path`` and the space left
    there; no partial file ever carries its name, and a previous complete file of that name stays as
    it was. ``write_errors``: what the block's writer raises instead of OSError (torch.save: RuntimeError).
    """
    path = Path(path)
    tmp = _tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, *write_errors) as err:
        reason = " ".join(str(getattr(err, "strerror", None) or err).split())
        free = shutil.disk_usage(path.parent).free / 2**20
        message = f"{path}: cannot write it ({reason}; {free:.1f} MiB free there); no partial file was kept"
        raise (OSError(err.errno, message) if getattr(err, "errno", None) else OSError(message)) from err
    finally:
        tmp.unlink(missing_ok=True)
        tmp.parent.rmdir()


#: key of the checksum record (:func:`atomic_savez`) in the .npz files the pipeline writes
CHECKSUM_KEY = "sha256"
#: bytes read at a time when hashing a file
CHUNK = 1 << 22


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    while block := stream.read(CHUNK):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    with open(path, "rb") as f:
        return _sha256(f)


def npz_member_sha256(path: str | Path) -> dict[str, str]:
    """sha256 of every stored array (its whole .npy member) of an .npz but the checksum record, streamed.

    Reading a member to its end also checks the zip's CRC-32 (``zipfile.BadZipFile`` on a mismatch).
    """
    digests = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.removesuffix(".npy") != CHECKSUM_KEY:
                with archive.open(name) as member:
                    digests[name.removesuffix(".npy")] = _sha256(member)
    return digests


def atomic_savez(path: Path, made_by: str | None = None, **arrays: np.ndarray) -> None:
    """Write an .npz so that an interrupted or failed job never leaves a complete-looking file.

    The file carries a checksum record (key :data:`CHECKSUM_KEY`): the sha256 of each array as
    stored and ``made_by``, the rule that writes it, which :func:`verify_npz` checks and names.
    """
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        record = {"rule": made_by, "members": npz_member_sha256(tmp)}
        with zipfile.ZipFile(tmp, "a") as archive, archive.open(f"{CHECKSUM_KEY}.npy", "w") as f:
            np.lib.format.write_array(f, np.array(json.dumps(record, sort_keys=True)), allow_pickle=False)


def corrupt(path: str | Path, what: str, made_by: str | None) -> ValueError:
    """The one-line error of a file that fails its check: what failed and the rule to rerun."""
    rule = f"the rule '{made_by}'" if made_by else "the rule"
    return ValueError(f"{path}: {what}: the file is corrupt; delete it and rerun {rule} that makes it")


def verify_file(path: str | Path, expected: str | None, made_by: str) -> str:
    """The file's sha256; ValueError (:func:`corrupt`) unless it is ``expected`` (None: nothing recorded, not checked)."""
    actual = file_sha256(path)
    if not expected:
        log.warning("%s: no sha256 recorded by the rule '%s'; not checked", path, made_by)
    elif actual != expected:
        raise corrupt(path, f"sha256 mismatch (expected {expected}, got {actual})", made_by)
    return actual


def verify_npz(path: str | Path) -> None:
    """Check an .npz against its checksum record (:func:`atomic_savez`) before it is used.

    ValueError (:func:`corrupt`) naming the file and the rule recorded as its maker when an array's
    sha256 or the zip's CRC differs; a file without a record (a download, checked by its own rule)
    is logged and passed.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: file not found")
    made_by = None
    try:
        with zipfile.ZipFile(path) as archive:
            if f"{CHECKSUM_KEY}.npy" not in archive.namelist():
                log.warning("%s: no checksum record; not checked", path)
                return
            with archive.open(f"{CHECKSUM_KEY}.npy") as member:
                record = json.loads(str(np.lib.format.read_array(member, allow_pickle=False)))
        made_by, expected = record["rule"], record["members"]
        actual = npz_member_sha256(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, TypeError) as err:
        raise corrupt(path, f"unreadable ({' '.join(str(err).split())})", made_by) from err
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            raise corrupt(path, f"sha256 mismatch of '{name}' (expected {expected.get(name)}, got {actual.get(name)})",
                          made_by)


def atomic_write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class JobTerminated(OSError):
    """The job was asked to end (SIGTERM: a scheduler's warning before its time limit, or the limit itself)."""


class TerminationRequest:
    """While entered, SIGTERM only sets :attr:`requested` (main thread only; elsewhere SIGTERM is left as is).

    The job polls :meth:`check` where stopping loses nothing (a finished batch, an optimiser step's end);
    SLURM sends SIGTERM before its time limit (``sbatch --signal``) and again at it, then SIGKILL.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> TerminationRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def check(self, what: str) -> None:
        """Raise :class:`JobTerminated` saying ``what`` was kept, once SIGTERM has arrived."""
        if self.requested:
            raise JobTerminated(f"SIGTERM received (a scheduler's time limit?): {what}")


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


def halved_batch_size(batch_size: int, device: torch.device, logger) -> int:
    """Half ``batch_size`` after an out-of-memory error (re-raised at 1), the device's cache emptied, said in the log."""
    if batch_size == 1:
        raise
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    logger.warning("out of %s memory at batch size %d: going on at %d", device.type, batch_size, batch_size // 2)
    return batch_size // 2


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
