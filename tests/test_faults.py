"""Faults tried with nothing lost: a corrupt file is refused by the job that reads it, and a full disk
leaves no partial file under an output's name."""

from __future__ import annotations

import errno
import hashlib
import io as stdio
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vq4dit import io, packed
from vq4dit.__main__ import main

RULE_HINT = "the file is corrupt; delete it and rerun the rule '{}' that makes it"


def flip_byte(path: Path, offset: int) -> None:
    """Flip the lowest bit of the byte at ``offset`` (a bad disk, a half-synced copy)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def member_data_offset(path: Path, name: str) -> int:
    """Offset in the file of the middle byte of zip member ``name``'s stored data."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with open(path, "rb") as f:  # local header: 30 bytes, then the name and the extra field
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len) + info.compress_size // 2


def refusal(argv: list[str], capsys) -> str:
    """The one-line error of a stage that must refuse its input."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def write_shard(path: Path, images: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (images, 8, 8, 3), dtype=np.uint8)
    io.atomic_savez(path, "sample", arr_0=arr, labels=np.arange(images), meta=io.meta_array({"seed": 0}))
    return arr


def test_checksum_record_is_the_sha256_of_each_array_as_numpy_saves_it(tmp_path):
    arr = write_shard(tmp_path / "shard0.npz")
    expected = {}
    for name, value in (("arr_0", arr), ("labels", np.arange(6)), ("meta", io.meta_array({"seed": 0}))):
        buffer = stdio.BytesIO()
        np.save(buffer, value)  # the .npy bytes np.savez stores for each array
        expected[name] = hashlib.sha256(buffer.getvalue()).hexdigest()
    with np.load(tmp_path / "shard0.npz") as data:
        record = json.loads(str(data[io.CHECKSUM_KEY]))
        assert np.array_equal(data["arr_0"], arr)
    assert record == {"rule": "sample", "members": expected}
    io.verify_npz(tmp_path / "shard0.npz")  # intact: passes


def test_flipped_byte_in_a_packed_model_stops_the_sample_job(tmp_path, capsys):
    model = tmp_path / "vq4dit-w2.safetensors"
    save_file({"block.assignments": torch.arange(4096, dtype=torch.uint8)}, str(model))
    recorded = hashlib.sha256(model.read_bytes()).hexdigest()
    info = tmp_path / "vq4dit-w2.json"
    info.write_text(json.dumps({"packed_sha256": recorded}))
    io.verify_file(model, recorded, "quantize")  # intact: passes
    flip_byte(model, model.stat().st_size // 2)
    err = refusal(["sample", "--transformer", str(tmp_path / "absent"), "--quantized", str(model),
                   "--quantize-info", str(info), "--steps", "2", "--cfg-scale", "1", "--seed", "0", "--start", "0",
                   "--count", "1", "--device", "cpu", "--output", str(tmp_path / "shard0.npz")], capsys)
    got = hashlib.sha256(model.read_bytes()).hexdigest()
    assert f"{model}: sha256 mismatch (expected {recorded}, got {got}): " + RULE_HINT.format("quantize") in err
    assert not (tmp_path / "shard0.npz").exists()


def test_unreadable_quantize_info_stops_the_sample_job(tmp_path, capsys):
    info = tmp_path / "vq4dit-w2.json"
    info.write_text('{"packed_sha256": "ab')  # cut short
    err = refusal(["sample", "--transformer", "absent", "--quantized", "absent.safetensors", "--quantize-info",
                   str(info), "--steps", "2", "--cfg-scale", "1", "--seed", "0", "--start", "0", "--count", "1",
                   "--output", str(tmp_path / "shard0.npz")], capsys)
    assert f"{info}: not JSON (" in err and RULE_HINT.format("quantize") in err


def test_flipped_data_byte_in_a_shard_stops_the_features_job(tmp_path, capsys):
    shard = tmp_path / "shard3.npz"
    write_shard(shard)
    flip_byte(shard, member_data_offset(shard, "arr_0.npy"))  # an image byte, not a zip header
    err = refusal(["features", "--inputs", str(shard), "--extractor", "digits-cnn", "--weights",
                   str(tmp_path / "absent.pt"), "--device", "cpu", "--output", str(tmp_path / "f.npz")], capsys)
    assert f"{shard}: " in err and RULE_HINT.format("sample") in err
    assert not (tmp_path / "f.npz").exists()


def rewrite_member(path: Path, name: str, value: np.ndarray) -> None:
    """Replace one array of an .npz by a well-formed one (valid CRC), keeping every other member."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    buffer = stdio.BytesIO()
    np.save(buffer, value)
    members[name] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)


def test_array_replaced_with_a_valid_zip_crc_is_caught_by_its_sha256(tmp_path, capsys):
    """The zip's CRC-32 catches a flipped byte; a member rewritten whole (a stale copy) only the sha256."""
    shard = tmp_path / "shard0.npz"
    arr = write_shard(shard)
    arr[0, 0, 0, 0] ^= 1
    rewrite_member(shard, "arr_0.npy", arr)
    with np.load(shard) as data:  # numpy reads it without complaint
        assert np.array_equal(data["arr_0"], arr)
    with pytest.raises(ValueError, match=r"shard0.npz: sha256 mismatch of 'arr_0' \(expected [0-9a-f]{64}, got "
                                         r"[0-9a-f]{64}\): the file is corrupt; delete it and rerun the rule 'sample'"):
        io.verify_npz(shard)


@pytest.mark.parametrize("which, rule", [("features", "features"), ("reference", "reference_features")])
def test_flipped_byte_in_a_feature_file_stops_the_metrics_job(tmp_path, capsys, which, rule):
    rng = np.random.default_rng(1)
    files = {}
    for name, made_by in (("features", "features"), ("reference", "reference_features")):
        files[name] = tmp_path / f"{name}.npz"
        io.atomic_savez(files[name], made_by, pool=rng.normal(size=(20, 4)), spatial=rng.normal(size=(20, 5)),
                        logits=rng.normal(size=(20, 3)))
    flip_byte(files[which], member_data_offset(files[which], "pool.npy"))
    err = refusal(["metrics", "--features", str(files["features"]), "--reference", str(files["reference"]),
                   "--device", "cpu", "--output", str(tmp_path / "m.json")], capsys)
    assert err.startswith(f"vq4dit metrics: error: {files[which]}: ") and RULE_HINT.format(rule) in err
    assert not (tmp_path / "m.json").exists()


def test_file_without_a_checksum_record_is_read_unchecked(tmp_path):
    """Downloaded files (ADM's reference batches) carry none; their download rule checks them."""
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    io.verify_npz(tmp_path / "ref.npz")


# ---------------------------------------------------------------------------------------------
# disk full


def fill_then_fail(written: bytes = b"half a file"):
    """A writer that writes part of its file, then finds the disk full."""
    def write(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, Path)) or hasattr(a, "write"))
        with open(target, "ab") if isinstance(target, (str, Path)) else target as f:
            f.write(written)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def write_npz(path: Path) -> None:
    io.atomic_savez(path, "sample", arr_0=np.ones(4))


def write_json(path: Path) -> None:
    io.atomic_write_json(path, {"fid": 1.0})


def write_packed(path: Path) -> None:
    packed.save_packed({"w": torch.ones(4)}, {}, "vq", {"id": "fp"}, path)


def write_checkpoint(path: Path, floats: int = 1) -> None:
    """As the calibration writes its checkpoint (torch.save reports a full disk as RuntimeError)."""
    with io.atomic_output(path, (RuntimeError,)) as tmp:
        torch.save({"x": torch.ones(floats)}, tmp)


@pytest.mark.parametrize("writer, target, name", [
    (write_npz, (io.np, "savez"), "shard0.npz"),
    (write_json, (Path, "write_text"), "metrics.json"),
    (write_packed, (packed, "save_file"), "vq4dit-w2.safetensors"),
    (write_checkpoint, (torch, "save"), "vq4dit-w2.resume.pt"),
])
def test_disk_full_during_a_write_keeps_no_partial_file(tmp_path, monkeypatch, writer, target, name):
    output = tmp_path / name
    writer(output)
    before = output.read_bytes()  # the complete file of an earlier run
    monkeypatch.setattr(*target, fill_then_fail())
    with pytest.raises(OSError) as raised:
        writer(output)
    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    assert f"{output}: cannot write it (No space left on device; " in message and "\n" not in message
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the temporary file is gone


def test_disk_full_ends_the_stage_with_one_line_naming_the_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(io.np, "savez", fill_then_fail())
    output = tmp_path / "digits.npz"
    err = refusal(["prepare", "digits-reference", "--output", str(output)], capsys)
    assert f"{output}: cannot write it (No space left on device;" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB file system (tmpfs); skipped where mounting is not permitted."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("write, name", [
    (lambda path: io.atomic_savez(path, "sample", arr_0=np.ones(1 << 18)), "shard0.npz"),  # 2 MiB
    (lambda path: packed.save_packed({"w": torch.ones(1 << 19)}, {}, "vq", {"id": "fp"}, path), "model.safetensors"),
    (lambda path: write_checkpoint(path, 1 << 19), "model.resume.pt"),
])
def test_real_full_disk_keeps_no_partial_file(small_tmpfs, write, name):
    output = small_tmpfs / name
    with pytest.raises(OSError, match=rf"{output}: cannot write it \(.*; [\d.]+ MiB free there\); no partial file"):
        write(output)
    assert list(small_tmpfs.iterdir()) == []
