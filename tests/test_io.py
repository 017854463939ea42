import numpy as np
import pytest
import torch

from vq4dit import io


def test_each_job_claims_a_different_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(io, "_GPU_LOCKS", {})
    assert io.claim_gpu(str(tmp_path)) == 0
    assert io.claim_gpu(str(tmp_path)) == 0  # the same process keeps its GPU
    monkeypatch.setattr(io, "_GPU_LOCKS", {})  # as if another process: GPU 0's lock is still held
    assert io.claim_gpu(str(tmp_path)) == 1
    monkeypatch.setattr(io, "_GPU_LOCKS", {})
    with pytest.raises(RuntimeError, match="all 2 GPUs are held"):
        io.claim_gpu(str(tmp_path))


def test_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert io.resolve_device("auto") == torch.device("cpu")
    assert io.resolve_device("cpu") == torch.device("cpu")


def test_atomic_savez_and_load_npz_name_missing_keys(tmp_path):
    path = tmp_path / "a.npz"
    io.atomic_savez(path, arr_0=np.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # no temporary file or folder left
    assert io.load_npz(path, ("arr_0",))["arr_0"].shape == (3,)
    with pytest.raises(ValueError, match="a.npz.*labels"):
        io.load_npz(path, ("labels",))
    with pytest.raises(FileNotFoundError, match="b.npz"):
        io.load_npz(tmp_path / "b.npz", ("arr_0",))


def test_atomic_torch_save_writes_the_bytes_of_a_direct_save(tmp_path):
    """torch.save names its zip records after the file: the temporary file must carry the output's name."""
    state = {"w": torch.arange(6.0)}
    torch.save(state, tmp_path / "direct.pt")
    (tmp_path / "atomic").mkdir()
    with io.atomic_output(tmp_path / "atomic" / "direct.pt") as tmp:
        torch.save(state, tmp)
    assert (tmp_path / "atomic" / "direct.pt").read_bytes() == (tmp_path / "direct.pt").read_bytes()
    assert [p.name for p in (tmp_path / "atomic").iterdir()] == ["direct.pt"]

