"""Sampling throughput of a DiT (random weights) and the cost of VQ weight decoding, per batch size.

Part 1, transformer: images/s of guided sampling (one forward on the doubled batch per step; the
forward dominates the sampler) and the fraction of the device's measured matmul peak it reaches,
for the FP model; a VQ4DiT model sampled from dequantized-once weights runs the very same dense
forward (that is this project's design), so its row is the FP row.
FLOPs per forward are counted by torch's FlopCounterMode; the peak is the best of a few square
matmuls at the same precision.

Part 2, one quantized layer of each DiT-block shape (k=256, d=4 VQ), time per call at the token
count of each batch size: ``dense`` (weights dequantized once: what the sampler runs),
``dequantize+matmul`` (rebuild the weight from codebook and assignments at every call) and
``lut-gather`` (a fused gather-matmul written with torch ops: x·codebookᵀ per sub-vector position,
then the assignments gather-sum those partial products with ``embedding_bag``; never materialises
the weight). The paper reports its CUDA kernel at ≈ 1/3 less time than dequantize+matmul at small
batch.

    python benchmarks/sampling_bench.py --arch DiT-XL/2 --image-size 256 --precision bf16 \\
        --batch-sizes 1 2 4 8 16 32 64 128 256      # on a GPU
    python benchmarks/sampling_bench.py --batch-sizes 1 2 --repeats 2                # CPU check
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vq4dit.io import device_name, resolve_device
from vq4dit.models import block_linear_names, build_transformer
from vq4dit.sample import set_precision

from timing import timed

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
#: lut-gather vs an fp64 product, as a fraction of the largest output (bf16 keeps 8 significant bits)
TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 2e-2}


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Best FLOP/s of square matmuls (n = 2048 on CPU, 8192 on GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, repeats)


def transformer_rows(args, device: torch.device, peak: float) -> list[str]:
    latent = args.image_size // 8
    model = build_transformer(args.arch, latent, 4, 1000).to(device).eval()
    autocast = set_precision(args.precision, device.type)  # also set in main, before the peak is measured
    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(2 * batch, 4, latent, latent, device=device)
        t = torch.full((2 * batch,), 500, device=device)
        y = torch.randint(0, 1001, (2 * batch,), device=device)

        def forward():
            with torch.inference_mode(), autocast:
                model(x, timestep=t, class_labels=y)

        with FlopCounterMode(display=False) as counter:
            forward()
        seconds = timed(forward, device, args.repeats)
        flops = counter.get_total_flops()
        rows.append(f"| {batch} | {seconds * 1e3:.1f} | {batch / (seconds * args.steps):.3f} | "
                    f"{flops / seconds / 1e12:.2f} | {100 * flops / seconds / peak:.0f}% |")
    return rows


def lut_linear(x: torch.Tensor, codebook: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """x @ W.T with W = codebook[assignments] (out x in/d sub-vectors), without building W."""
    tokens, in_features = x.shape
    k, d = codebook.shape
    out_features, positions = assignments.shape
    partial = torch.einsum("tjd,kd->jkt", x.view(tokens, positions, d), codebook)  # (J, k, T)
    offsets = torch.arange(positions, device=x.device).unsqueeze(0) * k
    return F.embedding_bag(assignments + offsets, partial.reshape(positions * k, tokens), mode="sum").T


def layer_rows(args, device: torch.device) -> list[str]:
    """Per DiT-block linear shape: time per call of dense, dequantize+matmul and lut-gather."""
    model = build_transformer(args.arch, args.image_size // 8, 4, 1000)
    shapes = sorted({tuple(model.get_submodule(n).weight.shape) for n in block_linear_names(model)})
    dtype = DTYPES[args.precision]
    tokens_per_image = 2 * (args.image_size // 8 // 2) ** 2  # doubled batch (guidance) x patches
    rows = []
    for out_features, in_features in shapes:
        codebook = torch.randn(256, 4, device=device, dtype=dtype)
        assignments = torch.randint(0, 256, (out_features, in_features // 4), device=device)
        weight = codebook[assignments].reshape(out_features, in_features)
        for batch in args.layer_batch_sizes:
            x = torch.randn(batch * tokens_per_image, in_features, device=device, dtype=dtype)
            reference = F.linear(x.double(), weight.double())  # both paths round in dtype: compare to fp64
            scale = reference.abs().max().item()
            torch.testing.assert_close(lut_linear(x, codebook, assignments).double(), reference, rtol=0,
                                       atol=TOLERANCE[args.precision] * scale)
            dense = timed(lambda: F.linear(x, weight), device, args.repeats)
            dequant = timed(lambda: F.linear(x, codebook[assignments].reshape(out_features, in_features)), device,
                            args.repeats)
            lut = timed(lambda: lut_linear(x, codebook, assignments), device, args.repeats)
            rows.append(f"| {out_features}x{in_features} | {batch} | {dense * 1e6:.0f} | {dequant * 1e6:.0f} | "
                        f"{lut * 1e6:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--layer-batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=250, help="sampling steps for images/s")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = device_name(device)
    set_precision(args.precision, device.type)  # TF32 matmuls for the peak too
    peak = matmul_peak(device, DTYPES[args.precision], args.repeats)
    print(f"device: {name}, torch {torch.__version__}, precision {args.precision}, "
          f"measured matmul peak {peak / 1e12:.1f} TFLOP/s\n")
    print(f"{args.arch} at {args.image_size}x{args.image_size}, guided (doubled batch), random weights; "
          f"FP and VQ4DiT (dequantized once) run the same forward\n")
    print(f"| batch | ms / forward | images/s ({args.steps} steps) | TFLOP/s | of peak |\n|---:|---:|---:|---:|---:|")
    print("\n".join(transformer_rows(args, device, peak)))
    print("\nVQ k=256, d=4 layer, µs per call\n")
    print("| layer (out x in) | batch | dense (dequantized once) | dequantize+matmul | lut-gather |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(layer_rows(args, device)))


if __name__ == "__main__":
    main()
