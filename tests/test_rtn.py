"""Scalar quantizers (RTN, RepQ-ViT, GPTQ, Q-DiT) on degenerate rows and groups: finite grids and weights.

The published GPTQ / Q-DiT grid (``quant.py`` ``find_params``) gives an all-zero row the range [-1, 1],
which reconstructs 0; a stored fp16 step must not underflow to 0 (NaN zero point)."""

import pytest
import torch

from vq4dit.methods import rtn
from vq4dit.methods.gptq import gptq_quantize
from vq4dit.methods.hessians import BaselineConfig


def degenerate_weight(columns: int = 128) -> torch.Tensor:
    """Rows: all zero, constant (positive, negative), below fp16's step, one tiny spike, and a normal row."""
    w = torch.zeros(6, columns)
    w[1], w[2], w[3] = 0.3, -0.02, 1e-9
    w[4, 5] = 3e-8
    w[5] = torch.randn(columns, generator=torch.Generator().manual_seed(0))
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip_search", [False, True])
def test_rtn_and_repq_vit_are_finite_on_zero_constant_and_tiny_rows(bits, clip_search):
    w = degenerate_weight()
    packed = rtn.quantize_weight(w, bits, clip_search=clip_search)
    for key in ("scale", "zero"):
        assert torch.isfinite(packed[key]).all() and (packed["scale"] > 0).all(), key
    q = rtn.dequantize(packed)
    assert torch.isfinite(q).all()
    assert torch.equal(q[0], torch.zeros(w.shape[1]))  # an all-zero row stays 0
    assert torch.allclose(q[1:3], w[1:3], rtol=1e-3)  # a constant row is on its grid (0 in range)
    assert torch.allclose(q[3:5], w[3:5], atol=1e-7)


def test_all_zero_row_gets_the_published_grid_minus_one_to_one():
    scale, zero = rtn.minmax_grid(torch.zeros(1, 4), 2)
    assert torch.equal(scale, torch.tensor([[2 / 3]]).half().float())
    assert torch.equal(zero, torch.tensor([[2.0]]))  # round(1 / (2 / 3)): code 2 stands for 0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [0] + BaselineConfig().qdit_group_sizes)  # GPTQ, then Q-DiT's candidates
@pytest.mark.parametrize("group_grid", ["published", "updated"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_and_qdit_are_finite_on_zero_rows_and_dead_column_groups(bits, group_size, group_grid, act_order):
    """Dead inputs (H_jj = 0) get weight 0: a group of only dead columns is an all-zero group."""
    columns = 128
    x = torch.randn(512, columns, generator=torch.Generator().manual_seed(1))
    x[:, 32:64] = 0  # dead inputs: whole groups of 32 (and half of the groups of 64)
    w = degenerate_weight(columns)
    packed = gptq_quantize(w, 2 / len(x) * x.T @ x, bits, group_size=group_size, act_order=act_order,
                           blocksize=48, group_grid=group_grid)
    assert torch.isfinite(packed["scale"].float()).all() and torch.isfinite(packed["zero"].float()).all()
    assert (packed["scale"] > 0).all()
    q = rtn.dequantize(packed)
    assert torch.isfinite(q).all()
    assert torch.equal(q[:, 32:64], torch.zeros(6, 32)) and torch.equal(q[0], torch.zeros(columns))
