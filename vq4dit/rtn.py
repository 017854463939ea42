"""Round-to-nearest scalar baseline: per-output-channel asymmetric uniform quantization (W4/W3/W2).

The usual RTN baseline of the DiT-quantization papers: for each output row, scale = (max - min) /
(2^b - 1) and an integer zero point; fp16 scale and zero are stored per row.
"""

from __future__ import annotations

import torch


def quantize_weight(weight: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Packed codes (uint8), fp16 scale and zero point per output row."""
    if not 1 <= bits <= 8:
        raise ValueError(f"RTN bits must be in 1..8, got {bits}")
    levels = 2**bits - 1
    w = weight.detach().float()
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=1e-8).half()
    zero = torch.round(-lo / scale.float()).clamp(0, levels).half()
    codes = torch.clamp(torch.round(w / scale.float()) + zero.float(), 0, levels).to(torch.uint8)
    return {"codes": codes, "scale": scale, "zero": zero}


def dequantize(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight the packed codes stand for."""
    return (packed["codes"].float() - packed["zero"].float()) * packed["scale"].float()
