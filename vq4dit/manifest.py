"""Manifest stage: the provenance of one run in ``results/<preset>/manifest.json``, and its comparison.

``python -m vq4dit manifest`` records, for every artifact of the run in DAG order (prepare → quantize →
sample → features → metrics), its path, size and sha256, plus the job's device and numerics where the
job recorded them (quantize infos' ``environment``, the ``meta`` entry of sample and feature .npz
files: :func:`vq4dit.io.environment`), and for the whole run: the config, the settings rows, every
``seed`` of the config, library versions, the git commits of the workflow and of the vq4dit package, the
distinct device names and the distinct numerics flags (TF32, deterministic kernels, precision) per stage.

What ``sha256`` hashes: the file's bytes, except for the .npz files the pipeline writes (samples,
features, the digits reference), whose zip headers carry the time they were written (``np.savez``):
for those it hashes the arrays (name, dtype, shape, bytes, in name order) without ``meta`` and the
checksum record (:func:`vq4dit.io.atomic_savez`), so two runs that computed the same numbers have
the same hash (``hash_of: arrays``). Packed models (.safetensors) are hashed by content (``hash_of:
tensors``): safetensors writes its metadata map in a random order per process, so equal models can
differ in bytes. Downloaded files (``resources/…``) are hashed as files, the value their ``sha256`` in
the config pins.

``python -m vq4dit compare-manifests A B`` names the first artifact, in DAG order, whose hash differs
or that only one run has, with both jobs' environments, and the config keys, libraries and devices
that differ. Its exit status follows ``diff`` and ``cmp``: 0 when every artifact is equal, 1 when one
differs, 2 on bad input (a missing or malformed manifest).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import platform
import subprocess
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vq4dit.io import CHECKSUM_KEY, META_KEY, atomic_write_json, file_sha256, read_meta
from vq4dit.tables import read_json

log = logging.getLogger(__name__)

#: the pipeline's stages in DAG order: the order artifacts are recorded and compared in
STAGES = ("prepare", "quantize", "sample", "features", "metrics")
#: libraries whose versions are recorded
LIBRARIES = ("torch", "numpy", "scipy", "pandas", "diffusers", "safetensors", "torch-fidelity", "snakemake", "vq4dit-bench")
#: quantize info keys copied into the packed model's entry (timings and what the issue-17 driver records)
INFO_KEYS = ("quantize_seconds", "calibration_seconds", "optimizer_steps", "device", "precision", "block_mse")
#: numerics flags summarised per stage
NUMERICS = ("tf32_matmul", "tf32_cudnn", "float32_matmul_precision", "deterministic", "precision", "threads")


def arrays_sha256(path: Path) -> str:
    """sha256 of an .npz's arrays (name, dtype, shape, C-order bytes; names sorted), ``meta`` and the
    checksum record left out."""
    digest = hashlib.sha256()
    with np.load(path, allow_pickle=False) as data:
        for name in sorted(n for n in data.files if n not in (META_KEY, CHECKSUM_KEY)):
            array = np.ascontiguousarray(data[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def tensors_sha256(path: Path) -> str:
    """sha256 of a .safetensors file's header with sorted keys (metadata included) and its data bytes.

    Written by hand: safetensors has no content hash, and the order of its header's metadata map is random.
    """
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > path.stat().st_size - 8:
            raise ValueError(f"header length {length} exceeds the file: not a safetensors file")
        header = json.loads(f.read(length))
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_hash(file: Path) -> tuple[str, str]:
    """(sha256, what it hashes) of one artifact: arrays of the pipeline's .npz, content of packed models, else bytes."""
    if file.as_posix().startswith("resources/"):
        return file_sha256(file), "file"
    if file.suffix == ".npz":
        return arrays_sha256(file), "arrays"
    if file.suffix == ".safetensors" and file.parent.parent.name == "quantized":
        return tensors_sha256(file), "tensors"
    return file_sha256(file), "file"


def artifact(stage: str, path: str) -> dict:
    """One manifest entry: stage, path, bytes, sha256 (of the file or of the arrays) and the job's environment."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: file not found (a {stage} output the manifest lists)")
    try:
        sha256, hash_of = file_hash(file)
    except (ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: cannot read {file.suffix} ({err})") from err
    meta = read_meta(file) if hash_of == "arrays" else None
    entry = {"stage": stage, "path": file.as_posix(), "bytes": file.stat().st_size, "sha256": sha256,
             "hash_of": hash_of}
    if file.suffix == ".safetensors" and stage == "quantize":
        info = read_json(file.with_suffix(".json"))
        meta = info.get("environment")
        entry["job"] = {k: info[k] for k in INFO_KEYS if k in info}
    if meta is not None:
        entry["environment"] = meta
    return entry


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(folder: Path) -> dict:
    """The git commit of ``folder``'s checkout and whether tracked files differ from it (None outside git)."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"path": str(folder.resolve()), "commit": commit, "modified": None if status is None else bool(status)}


def workflow_sources() -> dict:
    """Commits of the workflow folder (the run's working directory) and of the vq4dit package the jobs ran."""
    return {"workflow": git_commit(Path.cwd()), "package": git_commit(Path(__file__).resolve().parent)}


def seeds(config: dict, prefix: str = "") -> dict:
    """Every ``seed`` key of the config, by its dotted path."""
    found = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(seeds(value, path + "."))
        elif key == "seed":
            found[path] = value
    return found


def environments(entry: dict) -> list[dict]:
    """The entry's environment and those it records for its inputs (features: the sample shards')."""
    env = entry.get("environment")
    if not env:
        return []
    return [env, *env.get("inputs", [])]


def summary(artifacts: list[dict]) -> tuple[list[str], dict]:
    """Distinct device names, and per stage the distinct numerics flags of the jobs that recorded them."""
    devices, numerics = set(), {}
    for entry in artifacts:
        for env in environments(entry):
            devices.add(env.get("device_name", "?"))
        if env := entry.get("environment"):
            flags = {k: env[k] for k in NUMERICS if k in env}
            numerics.setdefault(entry["stage"], {})[json.dumps(flags, sort_keys=True)] = flags
    return sorted(devices), {stage: list(found.values()) for stage, found in numerics.items()}


def build_manifest(preset: str, config: dict, settings: dict, files: dict[str, list[str]]) -> dict:
    artifacts = [artifact(stage, path) for stage in STAGES for path in files.get(stage, [])]
    devices, numerics = summary(artifacts)
    return {
        "preset": preset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": workflow_sources(),
        "libraries": library_versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "devices": devices,
        "numerics": numerics,
        "seeds": seeds(config),
        "config": config,
        "settings": settings,
        "artifacts": artifacts,
    }


# --- comparison ----------------------------------------------------------------------------------------


def read_manifest(path: str) -> dict:
    manifest = read_json(path)
    missing = [k for k in ("preset", "artifacts", "config") if k not in manifest]
    if missing:
        raise ValueError(f"{path}: not a vq4dit manifest (missing {missing})")
    for entry in manifest["artifacts"]:
        if entry.get("stage") not in STAGES or "path" not in entry or "sha256" not in entry:
            raise ValueError(f"{path}: artifact entry {entry.get('path', entry)!r} needs stage (one of {STAGES}), "
                             "path and sha256")
    return manifest


def artifact_key(entry: dict, preset: str) -> tuple[int, str]:
    """(stage index, path with ``results/<preset>/`` cut), so runs of differently named presets line up."""
    path = entry["path"].removeprefix(f"results/{preset}/")
    return STAGES.index(entry["stage"]), path


def ordered_keys(a: dict, b: dict) -> list[tuple[int, str]]:
    """Every artifact of either manifest: stage by stage in DAG order, A's order within a stage, then B's extras."""
    keys = [artifact_key(e, m["preset"]) for m in (a, b) for e in m["artifacts"]]
    return sorted(dict.fromkeys(keys), key=lambda k: k[0])  # stable sort: A's order, then B's extras, per stage


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing(a: dict, b: dict) -> list[str]:
    """``key: A → B`` for every key whose value differs (missing: '–')."""
    return [f"{k}: {a.get(k, '–')} → {b.get(k, '–')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def commits(m: dict) -> dict:
    """The sources' commits and modified flags (not their paths, which differ between any two sites)."""
    return {k: v for k, v in flatten(m.get("sources", {})).items() if not k.endswith(".path")}


def describe(entry: dict | None) -> str:
    if entry is None:
        return "absent"
    text = f"sha256 {entry['sha256'][:16]}… ({entry.get('hash_of', 'file')}, {entry.get('bytes', '?')} bytes)"
    if env := entry.get("environment"):
        flags = ", ".join(f"{k} {env[k]}" for k in ("device_name", "tf32_matmul", "deterministic", "precision", "seed")
                          if k in env)
        text += f"; job: {flags}"
    return text


#: exit status of ``compare-manifests`` when an artifact differs (as ``diff``; equal: 0, bad input: 2, ``__main__``)
EXIT_DIFFERENT = 1
NO_DIFFERENCE = "no differing artifact"


def compare(a: dict, b: dict) -> list[str]:
    """Lines naming the first differing artifact in DAG order (or that none differs), then what else differs."""
    by_key = [{artifact_key(e, m["preset"]): e for e in m["artifacts"]} for m in (a, b)]
    keys = ordered_keys(a, b)
    first = next((k for k in keys if (by_key[0].get(k) or {}).get("sha256") != (by_key[1].get(k) or {}).get("sha256")),
                 None)
    lines = []
    if first is None:
        lines.append(f"{NO_DIFFERENCE}: all {len(keys)} artifacts have equal sha256")
    else:
        entry_a, entry_b = by_key[0].get(first), by_key[1].get(first)
        path = (entry_a or entry_b)["path"]
        before = keys[:keys.index(first)]
        after = [k for k in keys[keys.index(first) + 1:]
                 if (by_key[0].get(k) or {}).get("sha256") != (by_key[1].get(k) or {}).get("sha256")]
        lines += [f"first differing artifact (DAG order): {STAGES[first[0]]} {path}",
                  f"  A: {describe(entry_a)}", f"  B: {describe(entry_b)}",
                  f"  equal before it: {len(before)} artifact(s) "
                  f"({', '.join(f'{s} {sum(k[0] == i for k in before)}' for i, s in enumerate(STAGES) if any(k[0] == i for k in before)) or 'none'})",
                  f"  differing after it: {len(after)} more of {len(keys) - len(before) - 1}"]
    for title, left, right in (("config", flatten(a["config"]), flatten(b["config"])),
                               ("libraries", a.get("libraries", {}), b.get("libraries", {})),
                               ("devices", {"devices": a.get("devices")}, {"devices": b.get("devices")}),
                               ("numerics", flatten(a.get("numerics", {})), flatten(b.get("numerics", {}))),
                               ("sources", commits(a), commits(b))):
        diff = differing(left, right)
        lines.append(f"{title} that differ: " + ("none" if not diff else "; ".join(diff)))
    return lines


# --- command line --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True)
    parser.add_argument("--config", required=True, help="the run's config as JSON")
    parser.add_argument("--settings", required=True, help="the run's settings rows as JSON (id -> row)")
    for stage in STAGES:
        parser.add_argument(f"--{stage}", nargs="*", default=[], help=f"the {stage} stage's artifacts, in DAG order")
    parser.add_argument("--output", required=True, help="results/<preset>/manifest.json")


def run(args: argparse.Namespace) -> None:
    try:
        config, settings = json.loads(args.config), json.loads(args.settings)
    except json.JSONDecodeError as err:
        raise ValueError(f"--config/--settings: not JSON ({err})") from err
    manifest = build_manifest(args.preset, config, settings, {s: getattr(args, s) for s in STAGES})
    atomic_write_json(Path(args.output), manifest)
    log.info("wrote %s: %d artifacts, devices %s", args.output, len(manifest["artifacts"]), manifest["devices"])


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="manifest.json of run A")
    parser.add_argument("b", help="manifest.json of run B")


def run_compare(args: argparse.Namespace) -> None:
    """Print the comparison; exit with EXIT_DIFFERENT when an artifact differs."""
    lines = compare(read_manifest(args.a), read_manifest(args.b))
    print("\n".join(lines))
    sys.stdout.flush()
    if not lines[0].startswith(NO_DIFFERENCE):
        sys.exit(EXIT_DIFFERENT)
