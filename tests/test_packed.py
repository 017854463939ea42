"""Packed checkpoints: bit-packed codes, embedders stored once, file size within the paper's accounting."""

import math

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors import safe_open

from conftest import small_dit
from vq4dit.methods import REGISTRY
from vq4dit.methods.calibration import CalibrationConfig
from vq4dit.models import block_linear_names
from vq4dit.packed import (
    load_quantized_transformer, nonblock_bytes, pack_bits, read_packed, save_packed, unpack_bits,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
def test_unpacking_gives_back_the_codes_in_bits_per_code(bits):
    codes = torch.randint(1 << bits, (1001,), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    stream = pack_bits(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(stream, bits, 1001), codes)


def test_two_bit_layout_is_four_codes_per_byte_lowest_bits_first():
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 0, 1])
    expected = [1 | 2 << 2 | 3 << 4 | 0 << 6, 3 | 3 << 2 | 0 << 4 | 1 << 6]  # written out by hand
    assert pack_bits(codes, 2).tolist() == expected


@pytest.mark.parametrize("bits, stream, codes", [
    (2, [0b01_00_11_10, 0b11], [2, 3, 0, 1, 3]),      # four codes per byte, lowest bits first (written out by hand)
    (4, [0x5A, 0x0F], [0xA, 0x5, 0xF]),
    (3, [0b10_001_101, 0b0000_011_1], [0b101, 0b001, 0b110, 0b011]),  # codes cross byte boundaries
])
def test_unpacking_reads_the_documented_bit_layout(bits, stream, codes):
    assert unpack_bits(torch.tensor(stream, dtype=torch.uint8), bits, len(codes)).tolist() == codes


def test_codes_that_do_not_fit_are_rejected():
    with pytest.raises(ValueError, match="3 bits"):
        pack_bits(torch.tensor([8]), 3)


@pytest.fixture(scope="module")
def shared_dit():
    """A 2-block DiT, hidden 384, whose blocks hold equal embedder copies (as converted DiT checkpoints do)."""
    return small_dit()


def quantized_file(model, setting, path):
    names = block_linear_names(model)
    work = DiTTransformer2DModel.from_config(model.config)
    work.load_state_dict(model.state_dict())
    cfg = CalibrationConfig.from_dict({"kmeans_iters": 2})
    spec = REGISTRY[setting["method"]]
    packed, info = spec.quantizer()(work, names, setting, cfg, "cpu", model)
    save_packed(model.state_dict(), packed, spec.format, setting, path)
    return info, names


@pytest.mark.parametrize("setting", [
    {"id": "fp", "method": "fp"},
    {"id": "rtn-w2", "method": "rtn", "bits": 2},
    {"id": "rtn-w3", "method": "rtn", "bits": 3},
    {"id": "vq-w2", "method": "vq-kmeans", "k": 256, "d": 4},
    {"id": "vq-w3", "method": "vq-kmeans", "k": 64, "d": 2},
])
def test_file_is_at_most_the_accounted_size_plus_nonblock_tensors_once(shared_dit, tmp_path, setting):
    path = tmp_path / "packed.safetensors"
    info, names = quantized_file(shared_dit, setting, path)
    nonblock = nonblock_bytes(shared_dit.state_dict(), names)
    embedder = sum(t.numel() * 4 for k, t in shared_dit.state_dict().items() if k.startswith("transformer_blocks.0.norm1.emb."))
    assert nonblock > embedder > 0
    limit = (info["size"]["total_mb"] * 2**20 + nonblock) * 1.02
    assert path.stat().st_size <= limit, (path.stat().st_size, limit)


def test_embedders_are_stored_once_and_retied_on_load(shared_dit, tmp_path):
    path = tmp_path / "packed.safetensors"
    quantized_file(shared_dit, {"id": "rtn-w3", "method": "rtn", "bits": 3}, path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("transformer_blocks.0.norm1.emb.") for k in keys)
    assert not any(k.startswith("transformer_blocks.1.norm1.emb.") for k in keys)
    model = load_quantized_transformer_from(shared_dit, path, tmp_path)
    blocks = model.transformer_blocks
    assert blocks[1].norm1.emb is blocks[0].norm1.emb
    embedder = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    assert torch.equal(model.state_dict()[embedder], shared_dit.state_dict()[embedder])


def test_rtn_codes_unpack_to_the_codes_quantize_wrote(shared_dit, tmp_path):
    from vq4dit.methods import rtn

    path = tmp_path / "packed.safetensors"
    quantized_file(shared_dit, {"id": "rtn-w3", "method": "rtn", "bits": 3}, path)
    state, layers, _ = read_packed(path)
    name = "transformer_blocks.1.ff.net.2"
    assert layers[name]["bits"] == 3
    expected = rtn.dequantize(rtn.quantize_weight(shared_dit.get_submodule(name).weight, 3))
    assert torch.equal(state[f"{name}.weight"], expected)


def test_distinct_embedders_are_kept_per_block(tmp_path):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=2, patch_size=2, in_channels=1,
                                  out_channels=2, sample_size=4, num_embeds_ada_norm=3, norm_num_groups=1).eval()
    path = tmp_path / "packed.safetensors"
    quantized_file(model, {"id": "fp", "method": "fp"}, path)
    reloaded = load_quantized_transformer_from(model, path, tmp_path)
    assert reloaded.transformer_blocks[1].norm1.emb is not reloaded.transformer_blocks[0].norm1.emb
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def load_quantized_transformer_from(model, path, tmp_path):
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    return load_quantized_transformer(folder, path)


def test_writer_refuses_a_non_finite_weight_and_names_the_layer(tmp_path):
    good = {"codes": torch.zeros(2, 4, dtype=torch.uint8), "scale": torch.ones(2, 1).half(),
            "zero": torch.zeros(2, 1).half()}
    bad = {**good, "scale": torch.tensor([[1.0], [float("nan")]]).half()}
    state = {"a.weight": torch.zeros(2, 4), "b.weight": torch.zeros(2, 4)}
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="'b'.*non-finite"):
        save_packed(state, {"a": good, "b": bad}, "rtn", {"id": "x", "method": "rtn", "bits": 2}, path)
    assert not path.exists()
    vq = {"assignments": torch.zeros(4, dtype=torch.uint8), "codebook": torch.tensor([[float("inf"), 0.0]]).half(),
          "shape": torch.tensor([2, 4])}
    with pytest.raises(ValueError, match="'a'.*non-finite"):
        save_packed(state, {"a": vq}, "vq", {"id": "y", "method": "vq-kmeans", "k": 1, "d": 2}, path)
