"""Model size by the paper's convention: DiT block linears only, MB = 2^20 bytes.

Counted: the weights of every block linear and their biases (kept in fp32). Not counted: patch,
timestep and class embedders (including diffusers' per-block ``norm1.emb`` copies) and the final
layer. Every block linear is assumed to carry a bias (true for DiT); a layer's codebook has
``clamp_k(k, N)`` codewords.

The paper's codebook figure. DiT-XL/2 at 2 bits (k=256, d=4) is reported as 162.08 MB in all,
with 159.47 MB of assignments and 0.77 MB of codebooks. In diffusers' layout a block has 7
linears (to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, norm1.linear), 28 * 7 = 196
layers, each with its own codebook: 196 * 256 * 4 fp32 values = 802,816 B = 0.77 MB. With the
biases (483,840 fp32 = 1.85 MB) this gives 159.47 + 0.77 + 1.85 = 162.08 MB exactly
(169,953,280 B). So the paper counts fp32 codebooks with q, k and v quantized separately, not
140 timm-layout layers (140 fp32 codebooks would be 0.55 MB). Our packed files store fp16
codebooks (``codebook_bits=16``, 0.38 MB, total 161.70 MB); ``--codebook-bits 32`` reproduces
the paper's 162.08 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

MB = float(1 << 20)

ARCHS = {"S": (384, 12), "B": (768, 12), "L": (1024, 24), "XL": (1152, 28)}
"""DiT size name -> (hidden size, depth), from the DiT paper; MLP ratio 4, adaLN 6 * hidden."""


def clamp_k(k: int, n_subvectors: int) -> int:
    """Clamp ``k`` to the largest power of two <= n_subvectors / 4 (at least 1), as the authors' code does."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    quarter = n_subvectors // 4
    cap = 1 << (quarter.bit_length() - 1) if quarter > 0 else 1
    return min(k, cap)


def dit_block_linear_shapes(arch: str) -> list[tuple[int, int]]:
    """(out, in) of every quantized block linear of ``arch`` (e.g. "DiT-XL/2"), diffusers order."""
    match = re.fullmatch(r"DiT-(S|B|L|XL)/(2|4|8)", arch)
    if match is None:
        raise ValueError(f"unknown architecture {arch!r}; expected DiT-{{S,B,L,XL}}/{{2,4,8}}")
    hidden, depth = ARCHS[match.group(1)]
    block = [
        (6 * hidden, hidden),  # norm1.linear (adaLN modulation)
        (hidden, hidden),  # attn1.to_q
        (hidden, hidden),  # attn1.to_k
        (hidden, hidden),  # attn1.to_v
        (hidden, hidden),  # attn1.to_out.0
        (4 * hidden, hidden),  # ff.net.0.proj (fc1)
        (hidden, 4 * hidden),  # ff.net.2 (fc2)
    ]
    return block * depth


def linear_shapes(model: nn.Module, names: list[str]) -> list[tuple[int, int]]:
    """(out, in) of the named linear (or VQLinear) modules of ``model``."""
    modules = [model.get_submodule(name) for name in names]
    return [(int(m.out_features), int(m.in_features)) for m in modules]


def _totals(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """(number of weights, number of biases)."""
    return sum(o * i for o, i in shapes), sum(o for o, _ in shapes)


def fp_size(shapes: list[tuple[int, int]], bits: int = 32) -> dict:
    """Unquantized size: weights at ``bits`` bits, biases in fp32."""
    n_weights, n_biases = _totals(shapes)
    weights_mb = n_weights * bits / 8 / MB
    biases_mb = n_biases * 4 / MB
    return {
        "n_layers": len(shapes),
        "n_weights": n_weights,
        "weights_mb": weights_mb,
        "biases_mb": biases_mb,
        "total_mb": weights_mb + biases_mb,
        "bits_per_weight": float(bits),
    }


def vq_size(shapes: list[tuple[int, int]], k: int, d: int, codebook_bits: int = 16) -> dict:
    """VQ size: log2(k)/d-bit assignments, one ``k x d`` codebook per layer, fp32 biases."""
    n_weights, n_biases = _totals(shapes)
    assignment_bits = 0.0
    codebook_bits_total = 0
    for out_features, in_features in shapes:
        if in_features % d:
            raise ValueError(f"in_features of shape {(out_features, in_features)} is not divisible by d={d}")
        n_subvectors = out_features * in_features // d
        k_eff = clamp_k(k, n_subvectors)
        assignment_bits += n_subvectors * math.log2(k_eff)
        codebook_bits_total += k_eff * d * codebook_bits
    fp32_mb = fp_size(shapes)["total_mb"]
    assignments_mb = assignment_bits / 8 / MB
    codebooks_mb = codebook_bits_total / 8 / MB
    biases_mb = n_biases * 4 / MB
    total_mb = assignments_mb + codebooks_mb + biases_mb
    return {
        "k": k,
        "d": d,
        "codebook_bits": codebook_bits,
        "n_codebooks": len(shapes),
        "n_weights": n_weights,
        "fp32_mb": fp32_mb,
        "assignments_mb": assignments_mb,
        "codebooks_mb": codebooks_mb,
        "biases_mb": biases_mb,
        "total_mb": total_mb,
        "compression": fp32_mb / total_mb,
        "bits_per_weight": assignment_bits / n_weights,
        "bits_per_weight_with_codebooks": (assignment_bits + codebook_bits_total) / n_weights,
    }


def scalar_size(shapes: list[tuple[int, int]], bits: int, overhead_bits: list[int] | None = None) -> dict:
    """Scalar (RTN, RepQ-ViT, GPTQ, Q-DiT) size: ``bits``-bit weights, fp32 biases and each layer's
    ``overhead_bits``: by default one fp16 scale and one fp16 zero point per output row (32 bits per row);
    grouped layers pass theirs (:func:`grouped_overhead_bits`)."""
    n_weights, n_biases = _totals(shapes)
    overhead = sum(overhead_bits) if overhead_bits is not None else 32 * n_biases
    weights_mb = n_weights * bits / 8 / MB
    overhead_mb = overhead / 8 / MB
    biases_mb = n_biases * 4 / MB
    fp32_mb = fp_size(shapes)["total_mb"]
    total_mb = weights_mb + overhead_mb + biases_mb
    return {
        "bits": bits,
        "n_weights": n_weights,
        "fp32_mb": fp32_mb,
        "weights_mb": weights_mb,
        "overhead_mb": overhead_mb,
        "biases_mb": biases_mb,
        "total_mb": total_mb,
        "compression": fp32_mb / total_mb,
        "bits_per_weight": float(bits),
        "bits_per_weight_with_overhead": bits + overhead / n_weights,
    }


def grouped_overhead_bits(shape: tuple[int, int], group_size: int, act_order: bool) -> int:
    """Bits a grouped layer stores besides codes and bias: fp16 scale and zero per row and group, the
    int32 group size, and with act-order the column order (int16 per column, int32 above 32,768 columns).
    ``group_size`` 0 or >= in_features: one group per row (32 bits a row)."""
    rows, columns = shape
    if not 0 < group_size < columns:
        return 32 * rows
    groups = -(-columns // group_size)
    order = columns * (16 if columns <= 2**15 else 32) if act_order else 0
    return 32 * rows * groups + 32 + order


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m vq4dit size``."""
    parser.add_argument("--arch", default="DiT-XL/2", help="DiT-{S,B,L,XL}/{2,4,8} (default DiT-XL/2)")
    parser.add_argument("--k", type=int, default=256, help="codewords per codebook (default 256)")
    parser.add_argument("--d", type=int, default=4, help="sub-vector dimension (default 4)")
    parser.add_argument("--codebook-bits", type=int, choices=(16, 32), default=16, help="bits per codebook value")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def format_table(sizes: dict) -> str:
    """Two aligned columns: name and value (floats with 4 decimals)."""
    width = max(len(name) for name in sizes)
    lines = [f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}"
             for name, value in sizes.items()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    """Write the VQ size of ``args.arch`` to stdout."""
    sizes = {"arch": args.arch, **vq_size(dit_block_linear_shapes(args.arch), args.k, args.d, args.codebook_bits)}
    sys.stdout.write(json.dumps(sizes, indent=2) + "\n" if args.json else format_table(sizes))
