"""Layer Hessians from the teacher's trajectories, GPTQ / Q-DiT on a tiny DiT, their packed files and sizes."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from vq4dit.methods import rtn
from vq4dit.methods.hessians import BaselineConfig, HessianHooks, choose_group_sizes, input_owner, layer_hessians
from vq4dit.methods.calibration import CalibrationConfig, Trajectories, collect_calibration_inputs, held_out
from vq4dit.methods.gptq import gptq_quantize
from vq4dit.models import block_linear_names
from vq4dit.packed import load_quantized_transformer, read_packed

CALIBRATION = CalibrationConfig(labels_per_trajectory=4, steps=10, cfg_scale=4.0)
BASELINES = {"trajectories": 4, "labels_per_trajectory": 4, "steps": 10, "blocksize": 32}


def layer_inputs(model, names, spec):
    """Every input row each named layer sees while the model samples ``spec``'s trajectories."""
    rows = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: rows[n].append(args[0].detach().reshape(-1, args[0].shape[-1]))) for n in names]
    with torch.no_grad():
        collect_calibration_inputs(model, spec, "cpu")
    for h in handles:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def test_hessians_are_the_input_second_moments_and_qkv_share_one(tiny_dit):
    names = block_linear_names(tiny_dit)
    hessians, counts = layer_hessians(tiny_dit, names, CALIBRATION, BaselineConfig(trajectories=1, steps=3), "cpu")
    spec = Trajectories(1, 4, 3, 4.0, None, CALIBRATION.seed)
    x = layer_inputs(tiny_dit, names, spec)
    q = next(n for n in names if n.endswith("attn1.to_q"))
    assert torch.equal(x[q], x[q.replace("to_q", "to_k")]) and torch.equal(x[q], x[q.replace("to_q", "to_v")])
    assert input_owner(q.replace("to_q", "to_v")) == q and len(hessians) == len(names) - 2 * len(tiny_dit.transformer_blocks)
    for name, h in hessians.items():
        assert counts[name] == len(x[name])
        expected = 2 / len(x[name]) * x[name].double().T @ x[name].double()
        assert torch.linalg.norm(h.double() - expected) <= 1e-5 * torch.linalg.norm(expected), name


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_gptq_layer_beats_rtn_on_held_out_inputs(tiny_dit, bits):
    names = block_linear_names(tiny_dit)
    hessians, _ = layer_hessians(tiny_dit, names, CALIBRATION, BaselineConfig(**BASELINES), "cpu")
    inputs = layer_inputs(tiny_dit, names, held_out(CALIBRATION))  # seed + 1: never seen by the Hessians
    for name in names:
        w, x = tiny_dit.get_submodule(name).weight.detach(), inputs[name]
        gptq = rtn.dequantize(gptq_quantize(w, hessians[input_owner(name)], bits, blocksize=32))
        plain = rtn.dequantize(rtn.quantize_weight(w, bits))
        assert (x @ (gptq - w).T).pow(2).mean() <= (x @ (plain - w).T).pow(2).mean(), name


def run_quantize(tiny_dit_dir, tmp_path, setting, baselines=BASELINES):
    packed, info = tmp_path / f"{setting['id']}.safetensors", tmp_path / f"{setting['id']}.json"
    result = subprocess.run(
        [sys.executable, "-m", "vq4dit", "quantize", "--transformer", str(tiny_dit_dir / "config.json"),
         "--setting", json.dumps(setting), "--calibration", json.dumps({"labels_per_trajectory": 2, "steps": 4}),
         "--baselines", json.dumps(baselines), "--device", "cpu", "--output", str(packed), "--info", str(info)],
        capture_output=True, text=True,
    )
    return result, packed, info


def expected_mb(shapes, bits, groups):
    """Paper convention: b-bit codes, fp16 scale + zero per row and group, int32 group size of a grouped layer, fp32 bias."""
    total = sum(o * i * bits + 32 * o * g + (32 if g > 1 else 0) + 32 * o for (o, i), g in zip(shapes, groups))
    return total / 8 / 2**20


@pytest.mark.parametrize("setting", [
    {"id": "gptq-w2", "method": "gptq", "bits": 2},
    {"id": "qdit-w3-g64", "method": "qdit", "bits": 3, "group_size": 64},
    {"id": "qdit-w2", "method": "qdit", "bits": 2},
])
def test_packed_file_reloads_and_counts_every_scale_and_zero(tiny_dit, tiny_dit_dir, tmp_path, setting):
    result, packed, info_path = run_quantize(tiny_dit_dir, tmp_path, setting)
    assert result.returncode == 0, result.stderr
    info = json.loads(info_path.read_text())
    state, layers, _ = read_packed(packed)
    model = load_quantized_transformer(tiny_dit_dir, packed)
    names = block_linear_names(tiny_dit)
    shapes = [tuple(tiny_dit.get_submodule(n).weight.shape) for n in names]
    chosen = info.get("group_sizes", {n: setting.get("group_size", 0) for n in names})
    groups = [math.ceil(i / chosen[n]) if 0 < chosen[n] < i else 1 for n, (o, i) in zip(names, shapes)]
    assert info["size"]["total_mb"] == pytest.approx(expected_mb(shapes, setting["bits"], groups), rel=1e-12)
    for name, g in zip(names, groups):
        assert layers[name]["format"] == "rtn" and layers[name]["bits"] == setting["bits"]
        assert torch.equal(model.get_submodule(name).weight, state[f"{name}.weight"])
    if setting["id"] == "qdit-w2":  # the search stays within group size 128's scale/zero budget
        budget = [math.ceil(i / 128) if 128 < i else 1 for o, i in shapes]
        assert info["size"]["total_mb"] <= expected_mb(shapes, 2, budget) + 1e-12
        assert info["output_error"] <= info["output_error_budget_group_size"] * (1 + 1e-6)


def test_group_size_choice_respects_the_budget():
    errors = {"a": {0: 10.0, 64: 4.0, 32: 1.0}, "b": {0: 3.0, 64: 2.9, 32: 2.8}}
    costs = {"a": {0: 10, 64: 20, 32: 40}, "b": {0: 10, 64: 20, 32: 40}}
    assert choose_group_sizes(errors, costs, 20) == {"a": 0, "b": 0}
    assert choose_group_sizes(errors, costs, 50) == {"a": 32, "b": 0}  # the budget goes where the error falls most
    assert choose_group_sizes(errors, costs, 80) == {"a": 32, "b": 32}
    with pytest.raises(ValueError, match="budget"):
        choose_group_sizes(errors, costs, 19)


def test_unknown_baselines_key_is_named(tiny_dit_dir, tmp_path):
    with pytest.raises(ValueError, match="percdmp"):
        BaselineConfig.from_dict({"percdmp": 0.01})
    result, _, _ = run_quantize(tiny_dit_dir, tmp_path, {"id": "gptq-w2", "method": "gptq", "bits": 2}, {"blocksiz": 8})
    assert result.returncode != 0 and "blocksiz" in result.stderr


def test_gptvq_setting_packs_vq_layers_counted_as_vq_sizes(tiny_dit, tiny_dit_dir, tmp_path):
    setting = {"id": "gptvq-w2", "method": "gptvq", "k": 256, "d": 4}
    result, packed, info_path = run_quantize(tiny_dit_dir, tmp_path, setting,
                                             {**BASELINES, "kmeans_iters": 2, "codebook_update_iters": 2})
    assert result.returncode == 0, result.stderr
    info, (state, layers, _) = json.loads(info_path.read_text()), read_packed(packed)
    names = block_linear_names(tiny_dit)
    shapes = [tuple(tiny_dit.get_submodule(n).weight.shape) for n in names]
    bits = sum(o * i / 4 * 8 + 256 * 4 * 16 + 32 * o for o, i in shapes)  # 8-bit indices of 4 weights, fp16 codebooks
    assert info["size"]["total_mb"] == pytest.approx(bits / 8 / 2**20, rel=1e-12)
    model = load_quantized_transformer(tiny_dit_dir, packed)
    for name in names:
        assert layers[name]["format"] == "vq" and layers[name]["bits"] == 8
        assert torch.equal(model.get_submodule(name).weight, state[f"{name}.weight"])


def repq_vit_row(w, bits):
    """RepQ-ViT's channel-wise weight quantizer as its code states it, one row: percentile clipping ranges
    [p(1 - q), p(q)], q in 0.999, 0.9999, 0.99999, the first with the least squared error (scale and zero
    rounded to fp16 as our files store them)."""
    best = None
    for q in (0.999, 0.9999, 0.99999):
        hi, lo = np.percentile(w, 100 * q), np.percentile(w, 100 * (1 - q))
        delta = np.float64(np.float16((hi - lo) / (2**bits - 1)))
        zero = np.float64(np.float16(np.round(-lo / delta)))
        deq = (np.clip(np.round(w / delta) + zero, 0, 2**bits - 1) - zero) * delta
        score = np.sum((deq - w) ** 2)
        if best is None or score < best[0]:
            best = (score, deq)
    return best[1]


@pytest.mark.parametrize("bits", [2, 4])
def test_repq_vit_weight_quantizer_follows_its_code(bits):
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(3)) + torch.linspace(-0.5, 2.0, 8)[:, None]
    ours = rtn.dequantize(rtn.quantize_weight(w, bits, clip_search=True)).double().numpy()
    expected = np.stack([repq_vit_row(row, bits) for row in w.double().numpy()])
    assert np.allclose(ours, expected, atol=1e-5)
    assert not torch.equal(rtn.quantize_weight(w, bits)["scale"], rtn.quantize_weight(w, bits, clip_search=True)["scale"])


def test_published_variants_are_the_defaults_and_bad_values_are_named():
    cfg = BaselineConfig()
    assert (cfg.gptq_group_grid, cfg.gptvq_variant) == ("published", "published")
    for key in ("gptq_group_grid", "gptvq_variant"):
        with pytest.raises(ValueError, match=key):
            BaselineConfig.from_dict({key: "ours"})
