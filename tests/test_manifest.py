"""Manifest: hashes of every artifact in DAG order, the jobs' environments, and the first difference of two runs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vq4dit import io, manifest
from vq4dit.__main__ import main

ENV = {"device": "cpu", "device_name": "CPU", "tf32_matmul": False, "deterministic": True}


def make_run(root: Path, seed: int, preset: str = "p") -> dict[str, list[str]]:
    """A tiny run: one file per stage, samples depending on ``seed``; paths relative to ``root``."""
    results = root / "results" / preset
    files = {
        "prepare": results / "models/m/transformer/diffusion_pytorch_model.safetensors",
        "quantize": results / "quantized/m/vq.safetensors",
        "sample": results / "samples/m/vq/steps10/shard0.npz",
        "features": results / "features/m/vq/steps10.npz",
        "metrics": results / "metrics/m/vq/steps10.json",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    files["prepare"].write_bytes(b"weights")
    save_file({"w": torch.zeros(2)}, str(files["quantize"]), metadata={"setting": "{}"})
    files["quantize"].with_suffix(".json").write_text(json.dumps({"quantize_seconds": 1.0 + seed, "environment": ENV}))
    images = np.random.default_rng(seed).integers(0, 255, (4, 8, 8, 1), dtype=np.uint8)
    io.atomic_savez(files["sample"], arr_0=images, labels=np.arange(4),
                    **{io.META_KEY: io.meta_array({**ENV, "seed": seed})})
    io.atomic_savez(files["features"], pool=images.reshape(4, -1).astype(np.float32),
                    **{io.META_KEY: io.meta_array({**ENV, "inputs": [{**ENV, "seed": seed}]})})
    files["metrics"].write_text(json.dumps({"fid": float(images.mean())}))
    return {stage: [str(path.relative_to(root))] for stage, path in files.items()}


def build(root: Path, seed: int, preset: str = "p") -> dict:
    files = make_run(root, seed, preset)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return manifest.build_manifest(preset, {"preset": preset, "sampling": {"seed": seed}}, {}, files)
    finally:
        os.chdir(cwd)


def test_npz_hash_is_of_the_arrays_not_of_the_zip_or_its_meta(tmp_path):
    arrays = {"arr_0": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    io.atomic_savez(tmp_path / "a.npz", **arrays, **{io.META_KEY: io.meta_array({"device": "cpu"})})
    time.sleep(2.1)  # zip timestamps have a 2-second resolution
    io.atomic_savez(tmp_path / "b.npz", **arrays, **{io.META_KEY: io.meta_array({"device": "cuda:0"})})
    assert manifest.file_sha256(tmp_path / "a.npz") != manifest.file_sha256(tmp_path / "b.npz")
    assert manifest.arrays_sha256(tmp_path / "a.npz") == manifest.arrays_sha256(tmp_path / "b.npz")
    io.atomic_savez(tmp_path / "c.npz", arr_0=arrays["arr_0"].astype(np.int16))
    assert manifest.arrays_sha256(tmp_path / "c.npz") != manifest.arrays_sha256(tmp_path / "a.npz")  # dtype counts


def reordered_metadata(source: Path, target: Path) -> None:
    """``source`` rewritten by the format's definition (u64 LE header length, JSON header, data) with the
    header's metadata entries in reverse order, as another safetensors process may write them."""
    raw = source.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header["__metadata__"] = dict(reversed(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to 8 bytes
    target.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


def test_packed_model_hash_is_of_its_content_not_of_its_metadata_order(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"setting": "{}", "layers": "{}", "tied": "[]"})
    reordered_metadata(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"packed, but not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        manifest.tensors_sha256(tmp_path / "bad.safetensors")
    with safe_open(tmp_path / "b.safetensors", "pt") as f:  # still a valid file, same tensors
        assert torch.equal(f.get_tensor("w"), tensors["w"]) and f.metadata() == {"setting": "{}", "layers": "{}",
                                                                                 "tied": "[]"}
    assert manifest.file_sha256(tmp_path / "a.safetensors") != manifest.file_sha256(tmp_path / "b.safetensors")
    assert manifest.tensors_sha256(tmp_path / "a.safetensors") == manifest.tensors_sha256(tmp_path / "b.safetensors")
    save_file({**tensors, "w": tensors["w"] + 1}, str(tmp_path / "c.safetensors"),
              metadata={"setting": "{}", "layers": "{}", "tied": "[]"})
    assert manifest.tensors_sha256(tmp_path / "c.safetensors") != manifest.tensors_sha256(tmp_path / "a.safetensors")


def test_manifest_records_every_stage_with_environments_and_seeds(tmp_path):
    m = build(tmp_path, seed=0)
    assert [a["stage"] for a in m["artifacts"]] == list(manifest.STAGES)
    sample = m["artifacts"][2]
    assert sample["hash_of"] == "arrays" and sample["environment"]["seed"] == 0
    assert m["artifacts"][1]["job"] == {"quantize_seconds": 1.0} and m["artifacts"][1]["environment"] == ENV
    assert m["devices"] == ["CPU"] and m["seeds"] == {"sampling.seed": 0}
    assert m["numerics"]["quantize"] == [{"tf32_matmul": False, "deterministic": True}]
    assert m["libraries"]["torch"] and "python" in m["libraries"]


def test_compare_names_the_first_differing_artifact_in_dag_order(tmp_path):
    a, b, again = build(tmp_path / "a", 0), build(tmp_path / "b", 1), build(tmp_path / "c", 0)
    lines = manifest.compare(a, b)
    assert lines[0] == "first differing artifact (DAG order): sample results/p/samples/m/vq/steps10/shard0.npz"
    assert "equal before it: 2 artifact(s) (prepare 1, quantize 1)" in lines[3]
    assert "differing after it: 2 more of 2" in lines[4]  # features and metrics follow the samples
    assert any(line.startswith("config that differ: sampling.seed: 0 → 1") for line in lines)
    assert manifest.compare(a, again)[0] == "no differing artifact: all 5 artifacts have equal sha256"
    a["artifacts"][0]["sha256"] = "0" * 64  # a different download comes first, whatever follows
    assert manifest.compare(a, b)[0].startswith("first differing artifact (DAG order): prepare results/p/models/")
    del b["artifacts"][1]
    assert "B: absent" in manifest.compare(again, b)[2]


def test_compare_manifests_command_and_bad_input(tmp_path, capsys):
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(build(tmp_path / name, seed)))
        paths.append(str(path))
    with pytest.raises(SystemExit) as differ:
        main(["compare-manifests", *paths])
    assert differ.value.code == 1  # as diff: 1 when the runs differ
    assert "first differing artifact (DAG order): sample" in capsys.readouterr().out
    main(["compare-manifests", paths[0], paths[0]])  # equal runs: returns, exit status 0
    assert capsys.readouterr().out.startswith("no differing artifact")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"preset": "p"}))
    for args in ([paths[0], str(bad)], [paths[0], str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit) as trouble:
            main(["compare-manifests", *args])
        assert trouble.value.code == 2  # as diff: 2 on bad input
    err = capsys.readouterr().err
    assert "bad.json: not a vq4dit manifest (missing ['artifacts', 'config'])" in err and "missing.json" in err


def test_environment_records_device_and_numerics():
    env = io.environment(torch.device("cpu"), seed=3)
    assert env["device"] == "cpu" and env["seed"] == 3 and env["device_name"]
    assert env["deterministic"] == torch.are_deterministic_algorithms_enabled()
    assert {"tf32_matmul", "tf32_cudnn", "float32_matmul_precision", "threads", "torch"} <= set(env)
