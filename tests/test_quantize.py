import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vq4dit.methods import rtn
from vq4dit.models import block_linear_names
from vq4dit.packed import load_quantized_transformer, read_packed, unpack_bits


def run_quantize(tiny_dit_dir, tmp_path, setting):
    packed, info = tmp_path / f"{setting['id']}.safetensors", tmp_path / f"{setting['id']}.json"
    subprocess.run(
        [sys.executable, "-m", "vq4dit", "quantize", "--transformer", str(tiny_dit_dir / "config.json"),
         "--setting", json.dumps(setting), "--device", "cpu", "--output", str(packed), "--info", str(info)],
        check=True, capture_output=True,
    )
    return packed, json.loads(info.read_text())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_codes_and_error(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    packed = rtn.quantize_weight(w, bits)
    assert packed["codes"].dtype == torch.uint8 and int(packed["codes"].max()) <= 2**bits - 1
    error = (rtn.dequantize(packed) - w).abs()
    step = packed["scale"].float()
    assert torch.all(error <= step / 2 + 1e-3)  # round-to-nearest inside the clipping range


def test_rtn_error_shrinks_with_bits():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    errors = [(rtn.dequantize(rtn.quantize_weight(w, b)) - w).pow(2).mean() for b in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2]


def test_rtn_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        rtn.quantize_weight(torch.zeros(2, 2), 9)


def test_fp_setting_reloads_the_same_model(tiny_dit, tiny_dit_dir, tmp_path):
    packed, info = run_quantize(tiny_dit_dir, tmp_path, {"id": "fp", "method": "fp"})
    model = load_quantized_transformer(tiny_dit_dir, packed)
    for name, tensor in tiny_dit.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert info["size"]["bits_per_weight"] == 32 and info["file_mb"] > 0
    assert info["packed_sha256"] == hashlib.sha256(packed.read_bytes()).hexdigest()  # what the sample jobs check


def test_block_mse_check_off_records_null_and_the_same_packed_model(tiny_dit_dir, tmp_path):
    setting = {"id": "rtn-w2", "method": "rtn", "bits": 2}
    (tmp_path / "on").mkdir()
    packed_on, info_on = run_quantize(tiny_dit_dir, tmp_path / "on", setting)
    packed_off, info_off = tmp_path / "off.safetensors", tmp_path / "off.json"
    subprocess.run(
        [sys.executable, "-m", "vq4dit", "quantize", "--transformer", str(tiny_dit_dir / "config.json"),
         "--setting", json.dumps(setting), "--calibration", json.dumps({"block_mse": False}), "--device", "cpu",
         "--output", str(packed_off), "--info", str(info_off)],
        check=True, capture_output=True,
    )
    assert info_on["block_mse"] > 0 and json.loads(info_off.read_text())["block_mse"] is None
    on, off = load_file(str(packed_on)), load_file(str(packed_off))
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)


def test_rtn_setting_packs_and_dequantizes_every_block_linear(tiny_dit, tiny_dit_dir, tmp_path):
    packed, info = run_quantize(tiny_dit_dir, tmp_path, {"id": "rtn-w2", "method": "rtn", "bits": 2})
    state, layers, _ = read_packed(packed)
    names = block_linear_names(tiny_dit)
    assert sorted(layers) == sorted(names) and {v["format"] for v in layers.values()} == {"rtn"}
    modules = dict(tiny_dit.named_modules())
    for name in names:
        expected = rtn.dequantize(rtn.quantize_weight(modules[name].weight, 2))
        assert torch.equal(state[f"{name}.weight"], expected), name
    embedder = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    assert torch.equal(state[embedder], tiny_dit.state_dict()[embedder])  # embedders stay full precision
    assert info["size"]["bits_per_weight"] == 2
    fp_bytes = sum(modules[n].weight.numel() for n in names) * 4
    assert info["file_mb"] * 2**20 < sum(t.numel() * 4 for t in tiny_dit.state_dict().values()) - fp_bytes / 2


def test_unknown_method_is_rejected_with_the_setting_named(tiny_dit_dir, tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_quantize(tiny_dit_dir, tmp_path, {"id": "odd", "method": "magic"})
    assert "odd" in err.value.stderr.decode() and "magic" in err.value.stderr.decode()


TINY_CALIBRATION = {"outer_iterations": 2, "labels_per_trajectory": 2, "steps": 4, "kmeans_iters": 5,
                    "ratio_reg_start": 0}


@pytest.mark.parametrize("method", ["vq-kmeans", "vq-codebook", "vq4dit"])
def test_vq_settings_pack_hard_assignments_that_reload_bit_exactly(tiny_dit, tiny_dit_dir, tmp_path, method):
    setting = {"id": method, "method": method, "k": 16, "d": 4, "n_candidates": 2}
    packed_path = tmp_path / f"{method}.safetensors"
    subprocess.run(
        [sys.executable, "-m", "vq4dit", "quantize", "--transformer", str(tiny_dit_dir), "--setting",
         json.dumps(setting), "--calibration", json.dumps(TINY_CALIBRATION), "--device", "cpu",
         "--output", str(packed_path), "--info", str(tmp_path / "info.json")],
        check=True, capture_output=True,
    )
    info = json.loads((tmp_path / "info.json").read_text())
    state, layers, _ = read_packed(packed_path)
    raw = load_file(str(packed_path))
    assert {v["format"] for v in layers.values()} == {"vq"} and len(layers) == len(block_linear_names(tiny_dit))
    name = "transformer_blocks.0.attn1.to_q"
    n_subvectors = tiny_dit.inner_dim**2 // 4
    assert raw[f"{name}.assignments"].dtype == torch.uint8 and raw[f"{name}.codebook"].dtype == torch.float16
    assert raw[f"{name}.assignments"].numel() == n_subvectors // 2  # k = 16: two 4-bit indices per byte
    codewords = raw[f"{name}.codebook"].float()[unpack_bits(raw[f"{name}.assignments"], 4, n_subvectors)]
    assert torch.equal(state[f"{name}.weight"], codewords.reshape(tiny_dit.inner_dim, tiny_dit.inner_dim))  # hard decoding
    assert len(torch.unique(state[f"{name}.weight"].reshape(-1, 4), dim=0)) <= 16
    model = load_quantized_transformer(tiny_dit_dir, packed_path)
    assert torch.equal(model.state_dict()[f"{name}.weight"], state[f"{name}.weight"])
    assert info["size"]["bits_per_weight"] == 1.0 and info["block_mse"] > 0  # log2(16) / 4
    assert ("calibration_seconds" in info) == (method != "vq-kmeans")
    if method != "vq-kmeans":
        assert info["optimizer_steps"] == 8 and info["precision"] == "tf32" and info["environment"]["device"] == "cpu"


def _quantize_command(tiny_dit_dir, tmp_path, name: str, calibration: dict) -> list[str]:
    setting = {"id": "vq4dit", "method": "vq4dit", "k": 16, "d": 4, "n_candidates": 2}
    return [sys.executable, "-m", "vq4dit", "quantize", "--transformer", str(tiny_dit_dir), "--setting",
            json.dumps(setting), "--calibration", json.dumps(calibration), "--device", "cpu",
            "--output", str(tmp_path / f"{name}.safetensors"), "--info", str(tmp_path / f"{name}.json"),
            "--checkpoint", str(tmp_path / f"{name}.resume.pt")]


def test_calibration_killed_mid_run_resumes_to_the_same_packed_tensors(tiny_dit_dir, tmp_path):
    """SIGKILL after the first checkpoint (mid-trajectory: two staggered streams); the rerun resumes there and
    writes what an uninterrupted run writes."""
    calibration = {**TINY_CALIBRATION, "outer_iterations": 8, "steps": 5, "streams": 2, "checkpoint_minutes": 0}
    subprocess.run(_quantize_command(tiny_dit_dir, tmp_path, "whole", calibration), check=True, capture_output=True)
    assert not (tmp_path / "whole.resume.pt").exists()  # removed once the job is done
    command = _quantize_command(tiny_dit_dir, tmp_path, "cut", calibration)
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut.resume.pt"
    while not checkpoint.exists() and job.poll() is None:
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL and not (tmp_path / "cut.json").exists()  # killed mid-run
    resumed = subprocess.run(command, check=True, capture_output=True, text=True)
    step = int(re.search(r"resuming calibration at optimiser step (\d+)", resumed.stderr).group(1))
    assert 0 < step < 8 * 5
    whole, cut = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "cut.safetensors"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[key], cut[key]) for key in whole)
    info = json.loads((tmp_path / "cut.json").read_text())
    assert info["optimizer_steps"] == 8 * 5 and not checkpoint.exists()


def test_diverging_calibration_stops_in_one_line_and_writes_no_packed_model(tiny_dit_dir, tmp_path):
    """A bias learning rate of 1e38 makes L_d infinite after the first step: the job names setting, step and block."""
    command = _quantize_command(tiny_dit_dir, tmp_path, "nan", {**TINY_CALIBRATION, "lr_bias": 1e38})
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"vq4dit quantize: error: setting 'vq4dit': calibration diverged: L_d (nan|inf), .* at optimiser "
                     r"step 1 in block 0; no packed model written", result.stderr.splitlines()[-1]), result.stderr
    assert not (tmp_path / "nan.safetensors").exists() and not (tmp_path / "nan.json").exists()
