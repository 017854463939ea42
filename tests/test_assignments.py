"""VQLayers / VQLinear: reconstruction and its gradient, logit init, L_r, freezing, hardening, packing, model surgery."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from vq4dit.methods import assignments
from vq4dit.methods.assignments import (
    VQLayers, attach, codebook_gradient, dequantize, index_dtype, init_logits, quantize_model_linears,
)
from vq4dit.models import block_linear_names


def _linear(out_features: int = 16, in_features: int = 32, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _vq(*linears: nn.Linear, k: int = 16, n: int = 2, **kwargs) -> VQLayers:
    return VQLayers.from_linears(list(linears) or [_linear()], k=k, d=4, n_candidates=n, kmeans_iters=10, **kwargs)


def _hard_decode(vq: VQLayers, index: int = 0) -> torch.Tensor:
    return vq.layer_codebook(index)[vq.assignments(index)].reshape(vq.layer_shapes[index])


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


def _step(vq: VQLayers, seed: int) -> None:
    """A fake optimiser step: push the logits around at random, then freeze."""
    with torch.no_grad():
        vq.logits.add_(torch.randn(vq.logits.shape, generator=torch.Generator().manual_seed(seed)) * 3)
    vq.freeze_()


def test_from_linears_shapes_clamped_k_and_global_candidates() -> None:
    vq = _vq(_linear(), _linear(32, 64, seed=1), k=256)
    assert vq.layer_shapes == [(16, 32), (32, 64)]
    assert vq.codeword_offsets == [0, 32, 160]  # 128 sub-vectors -> k clamped to 32; 512 -> 128
    assert vq.codebook.shape == (160, 4) and isinstance(vq.codebook, nn.Parameter)
    assert vq.candidates.shape == (2, 640) and vq.logits.shape == (2, 640) and isinstance(vq.logits, nn.Parameter)
    assert vq.candidates[:, :128].max() < 32 and vq.candidates[:, 128:].min() >= 32
    assert not vq.frozen.any() and not vq.hard.any()
    assert vq.weight(0).shape == (16, 32) and vq.weight(1).shape == (32, 64)


def test_logit_init_is_the_authors_formula() -> None:
    """dengjuncan/VQ4DiT CompressedLinear.prepare_sim: logit_i = log(d_last / (d_i + 1e-5)) for i < n - 1, the
    last 0; "both-eps" is log((d_last + 1e-8) / (d_i + 1e-8))."""
    distances = torch.tensor([[0.5, 2.0, 3.0], [0.0, 1.0, 1.5], [1e-4, 1e-4, 2e-4]])
    authors = [[math.log(row[-1] / (v + 1e-5)) for v in row[:-1]] + [0.0] for row in distances.double().tolist()]
    assert torch.allclose(init_logits(distances).double(), torch.tensor(authors, dtype=torch.float64), rtol=1e-6)
    both = [[math.log((row[-1] + 1e-8) / (v + 1e-8)) for v in row] for row in distances.double().tolist()]
    assert torch.allclose(init_logits(distances, "both-eps").double(), torch.tensor(both, dtype=torch.float64),
                          rtol=1e-6)
    assert not torch.allclose(init_logits(distances), init_logits(distances, "both-eps"), rtol=1e-4)
    with pytest.raises(ValueError, match="ratio_init"):
        init_logits(distances, "nearest")


def test_logit_init_prefers_nearer_codeword() -> None:
    logits = init_logits(torch.tensor([[0.5, 2.0], [0.0, 1.0], [1.0, 2.0]]))
    assert torch.equal(logits[:, 1], torch.zeros(3))
    assert torch.allclose(logits[0, 0], torch.log(torch.tensor(4.0)), rtol=0, atol=3e-5)
    assert torch.isfinite(logits).all()
    ratios = _vq(n=3).ratios()
    assert torch.all(ratios[0] >= ratios[1]) and torch.all(ratios[1] >= ratios[2])
    assert torch.allclose(ratios.sum(0), torch.ones(ratios.shape[1]))


def test_weights_and_their_gradients_equal_the_ratio_weighted_codewords() -> None:
    """VQ4DiT's reconstruction w_i = sum_j r_ij c[cand_ij], differentiated by autograd on that formula."""
    vq = _vq(_linear(), _linear(24, 32, seed=1), n=3)
    _step(vq, 0)
    codebook = vq.codebook.detach().clone().requires_grad_()
    logits = vq.logits.detach().clone().requires_grad_()
    ratios = logits.t().softmax(1)  # (N, n): r_ij of sub-vector i's candidate j
    expected = torch.einsum("ij,ijd->id", ratios, codebook[vq.candidates.t()])
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    (expected * grad).sum().backward()
    ours = torch.cat([vq.weight(0), vq.weight(1)]).reshape(-1, 4)
    (ours * grad).sum().backward()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(vq.codebook.grad, codebook.grad)
    torch.testing.assert_close(vq.logits.grad, logits.grad)
    assert vq.frozen.any() and torch.all(vq.logits.grad[:, vq.frozen] == 0)
    assert torch.equal(vq.ratios()[:, vq.frozen].max(0).values, torch.ones(int(vq.frozen.sum())))  # exactly one-hot


@pytest.mark.parametrize("sorted_sum, chunk_rows", [(False, 7), (False, 1 << 22), (True, None)])
def test_both_codebook_gradient_forms_equal_a_float64_scatter(sorted_sum, chunk_rows, monkeypatch) -> None:
    """The CPU form (index_add_, in row chunks or whole) and the GPU form (fixed codeword order, segment
    sums), against a direct sum."""
    if chunk_rows is not None:
        monkeypatch.setattr(assignments, "INDEX_ADD_ROWS", chunk_rows)
    vq = _vq(_linear(), _linear(24, 32, seed=1), n=3)
    grad = torch.randn(vq.frozen.shape[0], 4, generator=torch.Generator().manual_seed(2))
    ratios = vq.ratios().detach()
    expected = torch.zeros(vq.codebook.shape, dtype=torch.float64)
    for j in range(vq.n_candidates):
        for i, c in enumerate(vq.candidates[j].tolist()):
            expected[c] += ratios[j, i].double() * grad[i].double()
    got = codebook_gradient(grad, ratios, vq.candidates, vq.codeword_order(), vq.codeword_bounds, vq.codebook.shape, sorted_sum)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_codebook_trains_only_after_hard_under_after_hard_training() -> None:
    vq = _vq(_linear(), _linear(seed=1), codebook_training="after-hard")
    vq.hard[1] = True
    vq.weight(0).sum().add(vq.weight(1).sum()).backward()
    grad = vq.codebook.grad
    assert torch.all(grad[: vq.codeword_offsets[1]] == 0) and torch.any(grad[vq.codeword_offsets[1]:] != 0)


def test_one_hot_ratios_reconstruct_hard_decoding_exactly() -> None:
    vq = _vq()
    vq.layer_threshold = 1.0  # stay soft with every sub-vector frozen
    _step(vq, 0)
    vq.freeze_(threshold=-1.0)
    assert vq.frozen.all() and not vq.hard.any()
    soft = vq.weight(0).detach().clone()
    assert torch.equal(soft, _hard_decode(vq))
    vq.layer_threshold = 0.99
    vq.freeze_()
    assert vq.hard.all() and torch.equal(vq.weight(0), soft)


def test_codeword_weight_quantizes_without_error() -> None:
    linear, _ = _fp16_codeword_linear()
    vq = VQLayers.from_linears([linear], k=8, d=4, n_candidates=1)
    assert vq.hard.all()
    assert torch.equal(vq.weight(0), linear.weight.detach())


def test_n1_is_hard_nearest_assignment() -> None:
    vq = _vq(n=1)
    assert vq.hard.all() and vq.frozen.all()
    l_r, frozen = vq.layer_stats()
    assert l_r.tolist() == [0.0] and frozen.tolist() == [1.0] and vq.ratio_loss().item() == 0.0
    nearest = torch.cdist(_linear().weight.detach().reshape(-1, 4), vq.layer_codebook(0)).argmin(1)
    assert torch.equal(vq.assignments(0), nearest)


def test_freezing_never_unfreezes() -> None:
    vq = _vq(_linear(out_features=64), n=3)
    vq.layer_threshold = 1.0
    frozen = vq.frozen.clone()
    decoded = vq.weight(0).detach().reshape(-1, 4).clone()
    for seed in range(15):
        _step(vq, seed)  # moves frozen logits too, as momentum would
        vectors = vq.weight(0).detach().reshape(-1, 4)
        assert torch.all(vq.frozen >= frozen)
        assert torch.equal(vectors[frozen], decoded[frozen])
        decoded[vq.frozen & ~frozen] = vectors[vq.frozen & ~frozen]
        frozen = vq.frozen.clone()
    assert 0.5 < vq.layer_stats()[1].item() <= 1.0


def test_layer_turns_hard_past_99_percent_frozen_on_its_own() -> None:
    vq = _vq(_linear(out_features=64, in_features=64), _linear(seed=1))  # 1024 and 128 sub-vectors
    with torch.no_grad():
        vq.logits.zero_()
        vq.logits[0] = 20.0
        vq.logits[0, :11] = 0.0  # layer 0: 11 undecided sub-vectors, 1013 / 1024 = 98.9 % frozen
        vq.logits[0, 1024:] = 0.0  # layer 1: nothing decided
    vq.freeze_()
    assert vq.hard.tolist() == [False, False] and int(vq.frozen[:1024].sum()) == 1013
    with torch.no_grad():
        vq.logits[1, 0] = 30.0  # 1014 / 1024 = 99.02 %
    vq.freeze_()
    assert vq.hard.tolist() == [True, False] and vq.frozen[:1024].all() and not vq.frozen[1024:].any()
    l_r, _ = vq.layer_stats()
    assert l_r[0] == 0 and l_r[1] > 0
    assert torch.equal(vq.weight(0), _hard_decode(vq, 0))
    weight = vq.weight(0).detach().clone()
    _step(vq, 5)  # logits pushed around (frozen ones sit at 10000)
    assert torch.equal(vq.weight(0), weight)  # hard for good


def test_rmsprop_leaves_frozen_subvectors_exactly_in_place() -> None:
    vq = _vq(_linear(out_features=64), n=3)
    vq.layer_threshold = 1.0
    _step(vq, 0)
    frozen, logits = vq.frozen.clone(), vq.logits.detach().clone()
    optimizer = torch.optim.RMSprop([vq.logits], lr=0.05, alpha=0.9)
    for seed in range(5):
        target = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        (vq.weight(0) - target).pow(2).sum().add(vq.ratio_loss()).backward()
        optimizer.step()
    assert frozen.any() and torch.equal(vq.logits[:, frozen], logits[:, frozen])
    assert not torch.equal(vq.logits[:, ~frozen], logits[:, ~frozen])


def _layer_regularizer(r: torch.Tensor, active: torch.Tensor) -> float:
    """VQ4DiT's L_r of one layer, as the authors write it: n * mean over active rows of mean_j r_j (1 - r_j)."""
    n = r.shape[1]
    rows = [float(sum(p * (1 - p) for p in row) / n) for row, keep in zip(r.tolist(), active.tolist()) if keep]
    return n * sum(rows) / len(rows) if rows else 0.0


def test_ratio_loss_is_the_mean_over_soft_layers_of_the_per_layer_regulariser() -> None:
    vq = _vq(_linear(), _linear(24, 32, seed=1), _linear(seed=2))
    vq.layer_threshold = 1.0
    _step(vq, 3)
    vq.hard[2] = True  # a hard layer takes no part
    vq.freeze_()
    soft = vq.logits.detach().t().softmax(1)
    per_layer = [_layer_regularizer(soft[start:end], ~vq.frozen[start:end])
                 for start, end in zip(vq.row_offsets, vq.row_offsets[1:])]
    assert vq.frozen.any() and not vq.frozen.all()
    assert vq.ratio_loss().item() == pytest.approx((per_layer[0] + per_layer[1]) / 2, rel=1e-5)
    assert vq.layer_stats()[0].tolist() == pytest.approx([per_layer[0], per_layer[1], 0.0], rel=1e-5)


def test_packed_dequantize_equals_hard_weight(tmp_path: Path) -> None:
    linear, words = _fp16_codeword_linear()
    vq = VQLayers.from_linears([linear], k=8, d=4, n_candidates=2)
    _step(vq, 1)
    layer = attach(nn.Sequential(linear), ["0"], vq)["0"]
    packed = layer.packed()
    assert packed["assignments"].dtype == torch.uint8 and packed["codebook"].dtype == torch.float16
    assert packed["bias"].dtype == torch.float32 and packed["shape"].tolist() == [16, 32]
    weight, bias = dequantize(packed)
    assert torch.equal(weight, _hard_decode(vq)) and torch.equal(bias, linear.bias.detach())
    save_file(packed, tmp_path / "layer.safetensors")
    loaded = load_file(tmp_path / "layer.safetensors")
    assert loaded.keys() == packed.keys()
    assert all(torch.equal(loaded[name], packed[name]) and loaded[name].dtype == packed[name].dtype for name in packed)
    assert torch.equal(dequantize(loaded)[0], weight)


def test_packed_without_bias() -> None:
    linear = _linear(bias=False)
    layer = attach(nn.Sequential(linear), ["0"], _vq(linear, k=8))["0"]
    assert layer.bias is None and "bias" not in layer.packed()
    weight, bias = dequantize(layer.packed())
    assert bias is None and weight.shape == (16, 32)


def test_index_dtype() -> None:
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16 and index_dtype(1 << 15) == torch.int16
    assert index_dtype((1 << 15) + 1) == torch.int32


def test_state_dict_rebuilds_the_container() -> None:
    vq = _vq(_linear(), _linear(24, 32, seed=1))
    _step(vq, 2)
    vq.hard[1] = True
    again = VQLayers.from_state_dict(vq.state_dict())
    assert torch.equal(again.hard, vq.hard) and torch.equal(again.frozen, vq.frozen)
    assert all(torch.equal(again.weight(i), vq.weight(i)) for i in range(2))
    assert torch.equal(again.assignments(1), vq.assignments(1))


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
    biases = {name: model.get_submodule(name).bias.detach().clone() for name in names}
    vq, layers = quantize_model_linears(model, names, k=8, d=4, n_candidates=2, kmeans_iters=10)
    assert list(layers) == names and len(vq) == len(names)
    for index, name in enumerate(names):
        assert model.get_submodule(name) is layers[name] and layers[name].index == index
        assert torch.equal(layers[name].bias, biases[name])
    assert block_linear_names(model) == []
    assert not any(p is vq.codebook for p in model.parameters())  # the container is not a submodule
    out = model(torch.randn(1, 1, 8, 8), timestep=torch.tensor([3]), class_labels=torch.tensor([1])).sample
    assert out.shape == (1, 2, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(TypeError):
        quantize_model_linears(model, names[:1], k=8, d=4)
