import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from vq4dit.models import load_transformer, save_converted, use_original_timestep_embedding
from vq4dit.io import file_sha256
from vq4dit.prepare import HybridLoss, convert_dit, digits_uint8, download


def original_layout(model) -> dict[str, torch.Tensor]:
    """The diffusers tiny DiT's weights written in facebookresearch/DiT's key layout."""
    s = model.state_dict()
    emb = "transformer_blocks.0.norm1.emb"
    out = {"pos_embed": torch.zeros(1, 16, model.inner_dim)}
    for suffix in ("weight", "bias"):
        out[f"x_embedder.proj.{suffix}"] = s[f"pos_embed.proj.{suffix}"]
        out[f"t_embedder.mlp.0.{suffix}"] = s[f"{emb}.timestep_embedder.linear_1.{suffix}"]
        out[f"t_embedder.mlp.2.{suffix}"] = s[f"{emb}.timestep_embedder.linear_2.{suffix}"]
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = s[f"proj_out_1.{suffix}"]
        out[f"final_layer.linear.{suffix}"] = s[f"proj_out_2.{suffix}"]
        for i in range(len(model.transformer_blocks)):
            b = f"transformer_blocks.{i}"
            out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat([s[f"{b}.attn1.to_{x}.{suffix}"] for x in "qkv"])
            out[f"blocks.{i}.attn.proj.{suffix}"] = s[f"{b}.attn1.to_out.0.{suffix}"]
            out[f"blocks.{i}.mlp.fc1.{suffix}"] = s[f"{b}.ff.net.0.proj.{suffix}"]
            out[f"blocks.{i}.mlp.fc2.{suffix}"] = s[f"{b}.ff.net.2.{suffix}"]
            out[f"blocks.{i}.adaLN_modulation.1.{suffix}"] = s[f"{b}.norm1.linear.{suffix}"]
    out["y_embedder.embedding_table.weight"] = s[f"{emb}.class_embedder.embedding_table.weight"]
    return out


def test_original_checkpoint_converts_to_the_same_model(tiny_dit, tmp_path):
    for block in tiny_dit.transformer_blocks[1:]:  # an original checkpoint has one embedder
        block.norm1.emb.load_state_dict(tiny_dit.transformer_blocks[0].norm1.emb.state_dict())
    path = tmp_path / "DiT-tiny.pt"
    torch.save(original_layout(tiny_dit), path)
    converted = convert_dit(path, "DiT-digits", image_size=64, sha256=file_sha256(path))
    use_original_timestep_embedding(tiny_dit)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 10])
    with torch.no_grad():
        torch.testing.assert_close(converted(x, t, y).sample, tiny_dit(x, t, y).sample, rtol=0, atol=0)
    save_converted(converted, tmp_path / "transformer", str(path))
    reloaded = load_transformer(tmp_path / "transformer")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, y).sample, tiny_dit(x, t, y).sample, rtol=0, atol=0)


def test_converted_checkpoints_embed_timesteps_like_dit(tiny_dit):
    """facebookresearch/DiT: cat(cos, sin) of t * exp(-ln(10^4) * i / half), i < half."""
    t = torch.tensor([0.0, 17.0, 999.0])
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    time_proj = tiny_dit.transformer_blocks[0].norm1.emb.time_proj
    assert not torch.allclose(time_proj(t), expected, atol=1e-4)  # diffusers' default: / (half - 1)
    use_original_timestep_embedding(tiny_dit)
    torch.testing.assert_close(time_proj(t), expected, rtol=1e-5, atol=1e-5)


def test_converting_a_wrong_checkpoint_names_the_file(tiny_dit, tmp_path):
    path = tmp_path / "other.pt"
    state = original_layout(tiny_dit)
    del state["blocks.1.mlp.fc1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="other.pt.*missing key .blocks.1.mlp.fc1.weight"):
        convert_dit(path, "DiT-digits", image_size=64, sha256=None)


def test_wrong_sha256_stops_with_file_and_expected_hash(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"truncated")
    expected = "0" * 64
    with pytest.raises(ValueError, match=f"ckpt.pt.*{expected}"):
        convert_dit(path, "DiT-digits", image_size=64, sha256=expected)


def test_download_verifies_and_never_leaves_a_partial_file(tmp_path):
    source = tmp_path / "remote.bin"
    source.write_bytes(b"weights" * 1000)
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "resources" / "weights.bin"
    download(source.as_uri(), target, good)
    assert target.read_bytes() == source.read_bytes()
    bad_target = tmp_path / "resources" / "bad.bin"
    with pytest.raises(ValueError, match="does not match the expected " + "1" * 64):
        download(source.as_uri(), bad_target, "1" * 64)
    assert not bad_target.exists() and not list(bad_target.parent.glob("*.part"))
    with pytest.raises(OSError, match="Place the file at .*missing.bin by hand"):
        download((tmp_path / "nowhere.bin").as_uri(), tmp_path / "missing.bin", good)


def test_digits_reference_is_adm_format():
    images, labels = digits_uint8()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0 and set(labels) == set(range(10))


def test_hybrid_loss_is_finite_and_trains_the_variance(tiny_dit):
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    loss = HybridLoss()(tiny_dit, x0, torch.arange(8), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grad = tiny_dit.proj_out_2.weight.grad.view(2, 2, 2, -1)  # rows (p, q, channel): channel 1 = variance
    assert grad[:, :, 1].abs().sum() > 0


def test_verify_checks_a_hand_placed_file_before_first_use(tmp_path):
    placed = tmp_path / "resources" / "reference" / "ref.npz"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"a reference batch")
    good = hashlib.sha256(placed.read_bytes()).hexdigest()
    marker = tmp_path / "resources" / "verified" / "reference" / "ref.npz.json"

    def verify(sha256: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vq4dit", "prepare", "verify", "--file", str(placed),
                               "--sha256", sha256, "--output", str(marker)], capture_output=True, text=True)

    bad = verify("2" * 64)
    assert bad.returncode != 0 and "ref.npz" in bad.stderr and "2" * 64 in bad.stderr and not marker.exists()
    assert verify(good).returncode == 0 and json.loads(marker.read_text())["sha256"] == good


def test_wrong_size_fails_before_hashing(tmp_path, monkeypatch):
    import vq4dit.prepare as prepare

    path = tmp_path / "ref.npz"
    path.write_bytes(b"x" * 10)
    monkeypatch.setattr(prepare, "file_sha256", lambda p: pytest.fail("hashed a file of the wrong size"))
    with pytest.raises(ValueError, match=r"ref.npz: 10 bytes, expected 11"):
        prepare.verify(path, "0" * 64, size=11)
    with pytest.raises(FileNotFoundError, match="absent.npz: file not found"):
        prepare.verify(tmp_path / "absent.npz", "0" * 64, size=11)


def test_download_checks_the_size_and_removes_the_partial_file(tmp_path):
    source = tmp_path / "remote.bin"
    source.write_bytes(b"weights" * 10)
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    target = tmp_path / "resources" / "weights.bin"
    with pytest.raises(ValueError, match="weights.bin: 70 bytes, expected 71"):
        download(source.as_uri(), target, good, size=71)
    assert not target.exists() and not list(target.parent.glob("*.part"))
    download(source.as_uri(), target, good, size=70)
    assert target.read_bytes() == source.read_bytes()


def vq4dit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vq4dit", *args], capture_output=True, text=True)


def test_unreachable_download_ends_with_one_line_and_no_traceback(tmp_path):
    url, output = "http://127.0.0.1:9/x.pt", tmp_path / "x.pt"
    args = ("prepare", "download", "--url", url, "--sha256", "3" * 64, "--output", str(output))
    result = vq4dit_cli(*args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and url in errors[0] and str(output) in errors[0] and "by hand" in errors[0]
    debug = vq4dit_cli("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and url in debug.stderr
    assert not output.exists()


def test_truncated_checkpoint_is_one_clear_line(tmp_path):
    path = tmp_path / "DiT.pt"
    path.write_bytes(b"PK\x03\x04 not a whole zip")
    result = vq4dit_cli("prepare", "convert-dit", "--checkpoint", str(path), "--arch", "DiT-digits",
                        "--image-size", "64", "--output", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{path}: cannot read the checkpoint" in result.stderr and "download it again" in result.stderr
