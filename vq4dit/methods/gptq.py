"""GPTQ (Frantar et al., ICLR 2023), weight-only, on the asymmetric min-max grid of :mod:`vq4dit.methods.rtn`.

One layer at a time, from its weight W (out, in) and the Hessian H = 2/N sum x x^T of its inputs:

- dead inputs (H_jj = 0): H_jj = 1 and column j of W set to 0;
- act-order (optional): columns in order of decreasing H_jj;
- damping: H + percdamp * mean(diag H) * I;
- U = upper Cholesky factor of H^-1; column j is quantized, its error (w_j - q_j) / U_jj is fed
  back to the later columns through row j of U; lazy batches of ``blocksize`` columns defer the
  update of the columns after the batch to one matrix product (same result, fewer memory passes);
- groups (optional): a fresh grid (scale, zero) at every ``group_size``-th column (in quantization
  order). ``group_grid="published"`` (default; IST-DASLab/gptq ``gptq.py`` and Juanerx/Q-DiT
  ``qdit/gptq.py`` ``fasterquant``): from the copy of W as it stood at the start of the lazy batch,
  i.e. without the updates of the batch's earlier columns. ``group_grid="updated"``: from the
  fully error-updated columns (pending updates applied first), which does not depend on
  ``blocksize``. The two agree when every group starts a lazy batch (group size a multiple of
  ``blocksize``), not otherwise.

Arithmetic in float32 (float64 if the weight is float64). Output: the packed "rtn" layout (codes in
the original column order; with groups, (rows, groups) scales and zeros, ``group_size`` and, with
act-order, the column order ``perm`` that places each column in its group).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from vq4dit.methods import rtn

#: where a group's grid comes from: the batch-start copy of W (the published code) or the error-updated columns
GROUP_GRIDS = ("published", "updated")


@contextlib.contextmanager
def one_thread():
    """Run the column loop's small operations on one thread: with two threads on two busy cores each
    one waits for a descheduled thread (a 1152 x 4608 layer took 57 s instead of 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_hessian_factor(hessian: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (dead inputs already handled)."""
    h = hessian.clone()
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def group_values(w: Tensor, block: Tensor, errors: Tensor, u: Tensor, start: int, i1: int, i2: int,
                 group_size: int) -> Tensor:
    """The fully error-updated columns start .. start + group_size - 1: inside the batch from ``block``,
    after it from ``w`` minus the batch's pending updates."""
    end = min(start + group_size, w.shape[1])
    inside = block[:, start - i1:min(end, i2) - i1]
    if end <= i2:
        return inside
    done = start - i1  # columns of the batch already quantized
    after = w[:, i2:end] - errors[:, :done] @ u[i1:start, i2:end]
    return torch.cat([inside, after], dim=1)


def gptq_quantize(weight: Tensor, hessian: Tensor, bits: int, *, group_size: int = 0, act_order: bool = False,
                  percdamp: float = 0.01, blocksize: int = 128, group_grid: str = "published") -> dict[str, Tensor]:
    """GPTQ of one layer: packed "rtn" tensors (see module docstring). ``group_size`` 0: one grid per row;
    ``group_grid``: one of :data:`GROUP_GRIDS`."""
    if group_grid not in GROUP_GRIDS:
        raise ValueError(f"group_grid {group_grid!r}: expected one of {GROUP_GRIDS}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(device=w.device, dtype=dtype).clone()
    rows, columns = w.shape
    if h.shape != (columns, columns):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not fit a weight of shape {tuple(w.shape)}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    grouped = 0 < group_size < columns
    scale, zero = rtn.minmax_grid(w, bits)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, percdamp)
    codes = torch.zeros_like(w)
    scales, zeros = [], []
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        block, errors = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=dtype, device=w.device)
        with one_thread():
            for i in range(i2 - i1):
                column = i1 + i
                if grouped and column % group_size == 0:
                    values = (w[:, column:column + group_size] if group_grid == "published"
                              else group_values(w, block, errors, u, column, i1, i2, group_size))
                    scale, zero = rtn.minmax_grid(values, bits)
                    scales.append(scale)
                    zeros.append(zero)
                q = rtn.encode(block[:, i:i + 1], scale, zero, bits)
                codes[:, column] = q[:, 0]
                errors[:, i] = (block[:, i] - ((q - zero) * scale)[:, 0]) / u[column, column]
                block[:, i:] -= errors[:, i:i + 1] @ u[column:column + 1, column:i2]
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    packed = {"codes": codes.to(torch.uint8)}
    if not grouped:
        return {**packed, "scale": scale.half(), "zero": zero.half()}
    packed.update(scale=torch.cat(scales, 1).half(), zero=torch.cat(zeros, 1).half(),
                  group_size=torch.tensor([group_size], dtype=torch.int32))
    if perm is not None:
        packed["perm"] = perm.to(torch.int16 if columns <= 2**15 else torch.int32)
    return packed


def output_error(weight: Tensor, packed: dict[str, Tensor], hessian: Tensor) -> float:
    """tr(dW H dW^T) with dW = dequantized - weight: the layer's summed squared output error (x 2/N)."""
    delta = rtn.dequantize(packed).to(hessian) - weight.detach().to(hessian)
    return float(torch.sum((delta @ hessian) * delta))
