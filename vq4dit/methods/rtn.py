"""Scalar uniform weight quantization: per-output-channel asymmetric grids, round-to-nearest (W4/W3/W2).

The usual RTN baseline of the DiT-quantization papers: for each output row (or each group of columns
of a row), scale = (max - min) / (2^b - 1) with the range widened to include 0, and an integer zero
point; fp16 scale and zero are stored per row (per group). The codes are computed with the fp16
scale and zero as stored, so the packed weight is exactly the one quantized.

``clip_search=True`` is RepQ-ViT's weight quantizer (zkkli/RepQ-ViT, ``UniformQuantizer`` with
``channel_wise=True``): per row, the range [quantile(1 - p), quantile(p)] for p in
:data:`REPQ_PERCENTILES` with the least squared error, not widened to include 0.

Groups (GPTQ, Q-DiT): ``scale`` and ``zero`` of shape (rows, groups) with a ``group_size`` tensor;
column j of a row uses group ``position(j) // group_size``, where ``position`` is the column's place in
the stored ``perm`` (GPTQ's act-order) or j itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vq4dit import size

if TYPE_CHECKING:  # vq4dit.packed imports this module
    from vq4dit.packed import Packed

#: RepQ-ViT's clipping percentiles (``quantizer.py``, ``init_quantization_scale``)
REPQ_PERCENTILES = (0.999, 0.9999, 0.99999)
#: the smallest positive fp16 number (subnormal), the least step a stored fp16 scale can have
FP16_TINY = 2.0**-24


def check_bits(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"scalar quantizer bits must be in 1..8, got {bits}")
    return 2**bits - 1


def grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, clamp_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable (scale, zero) of the asymmetric grid over [lo, hi] (as float32 tensors).

    Degenerate ranges, whose step would be 0 in fp16: the range is widened to include 0, an empty one
    [0, 0] becomes [-1, 1] (as GPTQ's ``quant.py`` and Q-DiT's ``qdit/quant.py`` ``find_params``), and
    the step is at least fp16's smallest subnormal, so every grid is finite.
    """
    levels = check_bits(bits)
    degenerate = ((hi - lo) / levels).half() == 0
    lo = torch.where(degenerate, lo.clamp(max=0), lo)
    hi = torch.where(degenerate, hi.clamp(min=0), hi)
    empty = hi == lo
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / levels).clamp(min=FP16_TINY).half().float()
    zero = torch.round(-lo / scale)
    return scale, (zero.clamp(0, levels) if clamp_zero else zero).half().float()


def minmax_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max grid of ``w`` (rows, columns), the range widened to include 0: (rows, 1) each."""
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    return grid(lo, hi, bits)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float) of ``w`` on the grid (scale, zero broadcast against ``w``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def percentile_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's per-row grid: the percentile clipping range with the least squared error."""
    best = None
    for p in REPQ_PERCENTILES:
        hi, lo = (torch.quantile(w, q, dim=1, keepdim=True) for q in (p, 1.0 - p))
        scale, zero = grid(lo, hi, bits, clamp_zero=False)
        error = ((encode(w, scale, zero, bits) - zero) * scale - w).pow(2).sum(dim=1, keepdim=True)
        if best is None:
            best = (error, scale, zero)
            continue
        better = error < best[0]  # strict, as RepQ-ViT: the first percentile wins ties
        best = tuple(torch.where(better, new, old) for new, old in zip((error, scale, zero), best))
    return best[1], best[2]


def quantize_weight(weight: torch.Tensor, bits: int, clip_search: bool = False) -> dict[str, torch.Tensor]:
    """Packed codes (uint8), fp16 scale and zero point per output row."""
    w = weight.detach().float()
    scale, zero = (percentile_grid if clip_search else minmax_grid)(w, bits)
    codes = encode(w, scale, zero, bits).to(torch.uint8)
    return {"codes": codes, "scale": scale.half(), "zero": zero.half()}


def group_index(packed: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Group of every column (None: one group per row)."""
    if packed["scale"].shape[1] == 1:
        return None
    columns = packed["codes"].shape[1]
    position = torch.argsort(packed["perm"].long()) if "perm" in packed else torch.arange(columns)
    return position // int(packed["group_size"])


def dequantize(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight the packed codes stand for."""
    scale, zero = packed["scale"].float(), packed["zero"].float()
    index = group_index(packed)
    if index is not None:
        scale, zero = scale[:, index], zero[:, index]
    return (packed["codes"].float() - zero) * scale


def quantize_rtn(model, names, setting, cfg, device, teacher) -> tuple[Packed, dict]:
    """Per-output-channel RTN of every block linear; ``repq-vit``: with RepQ-ViT's percentile clipping search."""
    bits, search = int(setting["bits"]), setting["method"] == "repq-vit"
    packed = {name: quantize_weight(model.get_submodule(name).weight, bits, search) for name in names}
    return packed, {"size": size.scalar_size(size.linear_shapes(model, names), bits)}
