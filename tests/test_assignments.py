"""VQLinear: reconstruction, logit init, freezing, hardening, packing and model surgery."""

from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from vq4dit.assignments import VQLinear, dequantize, index_dtype, init_logits, quantize_model_linears
from vq4dit.models import block_linear_names


def _linear(out_features: int = 16, in_features: int = 32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def _hard_decode(layer: VQLinear) -> torch.Tensor:
    return layer.codebook.detach()[layer.assignments()].reshape(layer.out_features, layer.in_features)


def _fp16_codeword_linear(k: int = 8, d: int = 4) -> tuple[nn.Linear, torch.Tensor]:
    """A 16x32 linear whose sub-vectors are all drawn from k distinct fp16-representable codewords."""
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(-64, 64, (k, d), generator=generator).float() / 64
    words[:, 0] = torch.arange(k) / 8  # distinct
    linear = _linear()
    index = torch.arange(16 * 32 // d) % k
    with torch.no_grad():
        linear.weight.copy_(words[index[torch.randperm(index.numel(), generator=generator)]].reshape(16, 32))
    return linear, words


def _step(layer: VQLinear, seed: int) -> None:
    """A fake optimiser step: push the logits around at random, then freeze."""
    with torch.no_grad():
        layer.logits.add_(torch.randn(layer.logits.shape, generator=torch.Generator().manual_seed(seed)) * 3)
    layer.freeze_()


def test_from_linear_shapes_and_clamped_k() -> None:
    layer = VQLinear.from_linear(_linear(), k=256, d=4)
    assert layer.k == 32  # 128 sub-vectors -> clamped to 128 / 4
    assert layer.codebook.shape == (32, 4) and isinstance(layer.codebook, nn.Parameter)
    assert layer.candidates.shape == (128, 2) and layer.candidates.dtype == torch.int64
    assert layer.logits.shape == (128, 2) and isinstance(layer.logits, nn.Parameter)
    assert layer.frozen.shape == (128,) and not layer.frozen.any() and not layer.is_hard
    assert torch.equal(layer.bias.detach(), _linear().bias.detach())
    assert layer(torch.randn(3, 32)).shape == (3, 16)


def test_logit_init_prefers_nearer_codeword() -> None:
    logits = init_logits(torch.tensor([[0.5, 2.0], [0.0, 1.0], [1.0, 2.0]]))
    assert torch.allclose(logits[:, 1], torch.zeros(3))
    assert torch.allclose(logits[0, 0], torch.log(torch.tensor(4.0)))
    assert torch.isfinite(logits).all()
    layer = VQLinear.from_linear(_linear(), k=16, d=4, n_candidates=3)
    ratios = layer.ratios()
    assert torch.all(ratios[:, 0] >= ratios[:, 1]) and torch.all(ratios[:, 1] >= ratios[:, 2])
    assert torch.allclose(ratios.sum(1), torch.ones(len(ratios)))


def test_one_hot_ratios_reconstruct_hard_decoding_exactly() -> None:
    layer = VQLinear.from_linear(_linear(), k=16, d=4)
    layer.layer_threshold = 1.0  # stay soft with every sub-vector frozen
    _step(layer, 0)
    layer.freeze_(threshold=0.0)
    assert layer.frozen.all() and not layer.is_hard
    soft = layer.weight()
    assert torch.equal(soft, _hard_decode(layer))
    layer.layer_threshold = 0.99
    layer.freeze_()
    assert layer.is_hard and torch.equal(layer.weight(), soft)


def test_codeword_weight_quantizes_without_error() -> None:
    linear, _ = _fp16_codeword_linear()
    layer = VQLinear.from_linear(linear, k=8, d=4, n_candidates=1)
    assert layer.is_hard
    assert torch.equal(layer.weight(), linear.weight.detach())
    x = torch.randn(5, 32)
    assert torch.allclose(layer(x), linear(x), atol=1e-6)


def test_n1_is_hard_nearest_assignment() -> None:
    layer = VQLinear.from_linear(_linear(), k=16, d=4, n_candidates=1)
    assert layer.is_hard and layer.frozen.all() and layer.frozen_fraction() == 1.0
    assert layer.ratio_regularizer().item() == 0.0
    nearest = torch.cdist(_linear().weight.detach().reshape(-1, 4), layer.codebook.detach()).argmin(1)
    assert torch.equal(layer.assignments(), nearest)


def test_freezing_never_unfreezes() -> None:
    layer = VQLinear.from_linear(_linear(out_features=64), k=16, d=4, n_candidates=3)
    layer.layer_threshold = 1.0
    frozen = layer.frozen.clone()
    decoded = layer.weight().detach().reshape(-1, 4).clone()
    for seed in range(15):
        _step(layer, seed)  # moves frozen logits too, as momentum would
        vectors = layer.weight().detach().reshape(-1, 4)
        assert torch.all(layer.frozen >= frozen)
        assert torch.equal(vectors[frozen], decoded[frozen])
        decoded[layer.frozen & ~frozen] = vectors[layer.frozen & ~frozen]
        frozen = layer.frozen.clone()
    assert 0.5 < layer.frozen_fraction() <= 1.0


def test_frozen_logits_get_no_gradient() -> None:
    layer = VQLinear.from_linear(_linear(), k=16, d=4)
    layer.layer_threshold = 1.0
    with torch.no_grad():
        layer.logits[:10, 1] = 10.0  # sub-vectors 0..9 prefer candidate 1
    layer.freeze_()
    assert layer.frozen[:10].all() and not layer.frozen[10:].all()
    (layer(torch.randn(4, 32)).pow(2).sum() + layer.ratio_regularizer()).backward()
    assert torch.all(layer.logits.grad[layer.frozen] == 0)
    assert torch.any(layer.logits.grad[~layer.frozen] != 0)


def test_layer_turns_hard_past_99_percent_frozen() -> None:
    layer = VQLinear.from_linear(_linear(out_features=64, in_features=64), k=16, d=4)  # 1024 sub-vectors
    with torch.no_grad():
        layer.logits[:, 0] = 20.0
        layer.logits[:11, 0] = 0.0  # 11 undecided sub-vectors: 1013 / 1024 = 98.9 % frozen
    layer.freeze_()
    assert not layer.is_hard and layer.frozen.sum() == 1013
    assert layer.ratio_regularizer().item() > 0
    with torch.no_grad():
        layer.logits[0, 1] = 30.0  # 1014 / 1024 = 99.02 %
    layer.freeze_()
    assert layer.is_hard and layer.frozen.all() and bool(layer.hard)
    assert not layer.logits.requires_grad and layer.ratio_regularizer().item() == 0.0
    assert torch.equal(layer.weight(), _hard_decode(layer))
    params = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert params == ["codebook", "bias"]
    weight = layer.weight().detach().clone()
    with torch.no_grad():
        layer.logits.mul_(-1)
    layer.freeze_()
    assert torch.equal(layer.weight(), weight)  # hard for good


def test_ratio_regularizer_counts_active_subvectors_only() -> None:
    layer = VQLinear.from_linear(_linear(), k=16, d=4)
    with torch.no_grad():
        layer.logits.zero_()  # r = 1/2 everywhere: n * mean(r (1 - r)) = 2 * 1/4
    assert torch.isclose(layer.ratio_regularizer(), torch.tensor(0.5))
    layer.layer_threshold = 1.0
    with torch.no_grad():
        layer.logits[:64, 0] = 20.0
    layer.freeze_()
    assert torch.isclose(layer.ratio_regularizer(), torch.tensor(0.5))


def test_packed_dequantize_equals_hard_weight(tmp_path: Path) -> None:
    linear, words = _fp16_codeword_linear()
    layer = VQLinear.from_linear(linear, k=8, d=4)
    _step(layer, 1)
    packed = layer.packed()
    assert packed["assignments"].dtype == torch.uint8 and packed["codebook"].dtype == torch.float16
    assert packed["bias"].dtype == torch.float32 and packed["shape"].tolist() == [16, 32]
    weight, bias = dequantize(packed)
    assert torch.equal(weight, _hard_decode(layer)) and torch.equal(bias, linear.bias.detach())
    save_file(packed, tmp_path / "layer.safetensors")
    loaded = load_file(tmp_path / "layer.safetensors")
    assert loaded.keys() == packed.keys()
    assert all(torch.equal(loaded[name], packed[name]) and loaded[name].dtype == packed[name].dtype for name in packed)
    assert torch.equal(dequantize(loaded)[0], weight)


def test_packed_without_bias() -> None:
    layer = VQLinear.from_linear(nn.Linear(32, 16, bias=False), k=8, d=4)
    assert layer.bias is None and "bias" not in layer.packed()
    weight, bias = dequantize(layer.packed())
    assert bias is None and weight.shape == (16, 32)


def test_index_dtype() -> None:
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16 and index_dtype(1 << 15) == torch.int16
    assert index_dtype((1 << 15) + 1) == torch.int32


def test_state_dict_round_trip_keeps_hard_flag() -> None:
    layer = VQLinear.from_linear(_linear(), k=16, d=4)
    layer.freeze_(threshold=0.0)
    assert layer.is_hard
    fresh = VQLinear.from_linear(_linear(), k=16, d=4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.is_hard and torch.equal(fresh.weight(), layer.weight())


def _tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    )


def test_block_linear_names_of_tiny_dit() -> None:
    names = block_linear_names(_tiny_dit())
    assert len(names) == 14
    assert not any(".norm1.emb." in name for name in names)
    suffixes = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear"}
    for block in range(2):
        assert {name.removeprefix(f"transformer_blocks.{block}.") for name in names if name.startswith(f"transformer_blocks.{block}.")} == suffixes


def test_quantize_model_linears_swaps_in_place() -> None:
    model = _tiny_dit()
    names = block_linear_names(model)
    layers = quantize_model_linears(model, names, k=8, d=4, n_candidates=2, kmeans_iters=10)
    assert set(layers) == set(names)
    for name in names:
        assert model.get_submodule(name) is layers[name]
    assert block_linear_names(model) == []
    out = model(torch.randn(1, 1, 8, 8), timestep=torch.tensor([3]), class_labels=torch.tensor([1])).sample
    assert out.shape == (1, 2, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(TypeError):
        quantize_model_linears(model, names[:1], k=8, d=4)
