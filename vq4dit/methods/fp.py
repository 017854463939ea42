"""The full-precision reference: nothing is quantized."""

from __future__ import annotations

from vq4dit import size
from vq4dit.packed import Packed


def quantize_fp(model, names, setting, cfg, device, teacher) -> tuple[Packed, dict]:
    """No packed layers; the size of the FP block linears."""
    return {}, {"size": size.fp_size(size.linear_shapes(model, names))}
