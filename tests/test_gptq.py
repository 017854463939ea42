"""GPTQ against the algorithm written afresh here (float64, no lazy batches), and the OBS statement it rests on."""

import numpy as np
import pytest
import torch

from vq4dit.methods import rtn
from vq4dit.methods.gptq import gptq_quantize, output_error


def spd_hessian(columns: int, seed: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """2/N X^T X of N = 3 * columns random inputs with a few strong directions; ``dead`` inputs always 0."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(3 * columns, columns)) * g.uniform(0.1, 3.0, size=columns)
    x[:, list(dead)] = 0
    return torch.from_numpy(2 / len(x) * x.T @ x)


def layer(rows=16, columns=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed + 100).normal(size=(rows, columns)))


def fresh_grid(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row asymmetric min-max grid with 0 in range, [-1, 1] for an all-zero row (GPTQ's quant.py);
    scale and zero as stored (fp16)."""
    maxq = 2**bits - 1
    lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
    scale = np.maximum((hi - lo) / maxq, 1e-8).astype(np.float16).astype(np.float64)
    zero = np.clip(np.round(-lo / scale), 0, maxq).astype(np.float16).astype(np.float64)
    return scale, zero


def fresh_gptq(weight, hessian, bits, group_size=0, act_order=False, percdamp=0.01, obs=False, grid_batch=None):
    """Published GPTQ, one column at a time with immediate error feedback; returns the dequantized weight.

    A group's grid: ``grid_batch=None`` from the group's fully updated columns; else (the published
    code's lazy batches of ``grid_batch`` columns) from the copy of W taken at the start of the batch
    holding the group's first column.

    ``obs=False``: U = upper Cholesky factor of the damped H^-1, update -err_j / U_jj * U_j,j:.
    ``obs=True``: Optimal Brain Surgeon with the inverse of the remaining columns' Hessian recomputed
    every step (the statement GPTQ's Cholesky form is equivalent to).
    """
    w, h = weight.numpy().copy(), hessian.numpy().copy()
    maxq, n = 2**bits - 1, w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h = w[:, order], h[np.ix_(order, order)]
    h = h + percdamp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    scale, zero = fresh_grid(w, bits)
    for j in range(n):
        if grid_batch and j % grid_batch == 0:
            batch_start = w.copy()
        if group_size and j % group_size == 0:
            scale, zero = fresh_grid((w if grid_batch is None else batch_start)[:, j:j + group_size], bits)
        q[:, j] = (np.clip(np.round(w[:, j] / scale) + zero, 0, maxq) - zero) * scale
        if obs:
            inv = np.linalg.inv(h[j:, j:])
            w[:, j:] -= np.outer((w[:, j] - q[:, j]) / inv[0, 0], inv[0])
        else:
            w[:, j:] -= np.outer((w[:, j] - q[:, j]) / u[j, j], u[j, j:])
    return torch.from_numpy(q[:, np.argsort(order)])


CASES = [dict(bits=2), dict(bits=3, group_size=16), dict(bits=4, act_order=True),
         dict(bits=2, group_size=16, act_order=True), dict(bits=3, group_size=24)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("blocksize", [64, 8, 20, 32])
def test_gptq_equals_the_published_algorithm(case, blocksize):
    """Default group grid: the published code's batch-start copy, whatever the blocksize."""
    w, h = layer(), spd_hessian(64, seed=1, dead=(5, 40))
    ours = rtn.dequantize(gptq_quantize(w, h, blocksize=blocksize, **case))
    assert torch.equal(ours.double(), fresh_gptq(w, h, grid_batch=blocksize, **case))


def test_published_group_grid_differs_from_the_updated_one_when_groups_start_inside_a_batch():
    w, h = layer(seed=4), spd_hessian(64, seed=5)
    published = gptq_quantize(w, h, 2, group_size=16, blocksize=64)
    updated = gptq_quantize(w, h, 2, group_size=16, blocksize=64, group_grid="updated")
    assert torch.equal(published["scale"][:, 0], updated["scale"][:, 0])  # the first group starts the batch
    assert not torch.equal(published["codes"], updated["codes"])
    assert torch.equal(rtn.dequantize(updated).double(), fresh_gptq(w, h, 2, group_size=16))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("blocksize", [8, 20])
def test_updated_group_grid_does_not_depend_on_lazy_batches(case, blocksize):
    w, h = layer(seed=2), spd_hessian(64, seed=3)
    whole = gptq_quantize(w, h, blocksize=64, group_grid="updated", **case)
    lazy = gptq_quantize(w, h, blocksize=blocksize, group_grid="updated", **case)
    assert torch.equal(whole["codes"], lazy["codes"]) and torch.equal(whole["scale"], lazy["scale"])


def test_cholesky_form_equals_optimal_brain_surgeon():
    w, h = layer(seed=4), spd_hessian(64, seed=5)
    assert torch.allclose(fresh_gptq(w, h, 3), fresh_gptq(w, h, 3, obs=True), atol=1e-9)


def test_dead_inputs_get_zero_weight_and_act_order_stores_the_group_order():
    w, h = layer(seed=6), spd_hessian(64, seed=7, dead=(3,))
    packed = gptq_quantize(w, h, 2, group_size=16, act_order=True)
    assert rtn.dequantize(packed)[:, 3].abs().max() == 0
    assert packed["scale"].shape == (16, 4) and sorted(packed["perm"].tolist()) == list(range(64))
    assert int(packed["group_size"]) == 16


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_output_error_beats_rtn(bits):
    w, h = layer(32, 64, seed=8).float(), spd_hessian(64, seed=9).float()
    assert output_error(w, gptq_quantize(w, h, bits), h) < output_error(w, rtn.quantize_weight(w, bits), h)


def test_hessian_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq_quantize(torch.zeros(4, 8), torch.eye(6), 2)
