"""Rehearsal stage: stand-ins for the paper preset's downloads, at full size, with random weights.

``config/rehearsal.yaml`` points every download of the paper preset at a ``file:`` URL of a file
written here, so download -> verify -> convert -> quantize -> sample -> features -> metrics ->
tables run on DiT-XL/2's real shapes and file formats without the internet. Each asset is a pure
function of the seed, byte for byte, so its sha256 is pinned in the config and verified like a
real download. Metrics computed from these assets mean nothing about quality.

Assets (``--asset``):
  ``dit``: a facebookresearch/DiT EMA state dict (``.pt``, its keys and shapes, incl. the fixed
  ``pos_embed``) for ``--image-size`` 256 or 512.
  ``vae-config`` / ``vae-weights``: stabilityai/sd-vae-ft-ema's ``config.json`` values and random
  weights of that architecture in diffusers' layout (safetensors).
  ``inception``: torch-fidelity's ``inception-v3-compat`` architecture and state-dict keys.
  ``reference``: an ADM reference batch: uint8 NHWC ``arr_0`` plus ``mu``/``sigma`` (2048) and
  ``mu_s``/``sigma_s`` (2023), the real dimensions.
"""

from __future__ import annotations

import argparse
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from vq4dit.features import SPATIAL_CHANNELS, save_random_weights
from vq4dit.io import atomic_output

log = logging.getLogger(__name__)

#: notice written next to every rehearsal number (tables, plots, report)
NOTICE = "REHEARSAL: random weights; these numbers mean nothing about quality"

#: DiT-XL/2 (facebookresearch/DiT models.py): hidden size, depth, patch size, latent channels, classes
HIDDEN, DEPTH, PATCH, LATENT_CHANNELS, CLASSES, FREQUENCY_SIZE = 1152, 28, 2, 4, 1000, 256

#: stabilityai/sd-vae-ft-ema config.json (huggingface.co/stabilityai/sd-vae-ft-ema)
SD_VAE_FT_EMA_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

POOL_DIM, SPATIAL_DIM = 2048, SPATIAL_CHANNELS * 17 * 17  # Inception pool3 and ADM's mixed_6/conv (2023)


def dit_shapes(image_size: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of DiT-XL/2's released EMA state dict, in its order (learned sigma: 8 output channels)."""
    tokens = (image_size // 8 // PATCH) ** 2
    out = PATCH * PATCH * 2 * LATENT_CHANNELS
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, tokens, HIDDEN),
        "x_embedder.proj.weight": (HIDDEN, LATENT_CHANNELS, PATCH, PATCH), "x_embedder.proj.bias": (HIDDEN,),
        "t_embedder.mlp.0.weight": (HIDDEN, FREQUENCY_SIZE), "t_embedder.mlp.0.bias": (HIDDEN,),
        "t_embedder.mlp.2.weight": (HIDDEN, HIDDEN), "t_embedder.mlp.2.bias": (HIDDEN,),
        "y_embedder.embedding_table.weight": (CLASSES + 1, HIDDEN),
    }
    block = {"attn.qkv": (3 * HIDDEN, HIDDEN), "attn.proj": (HIDDEN, HIDDEN), "mlp.fc1": (4 * HIDDEN, HIDDEN),
             "mlp.fc2": (HIDDEN, 4 * HIDDEN), "adaLN_modulation.1": (6 * HIDDEN, HIDDEN)}
    for i in range(DEPTH):
        for name, shape in block.items():
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = shape, shape[:1]
    shapes.update({"final_layer.linear.weight": (out, HIDDEN), "final_layer.linear.bias": (out,),
                   "final_layer.adaLN_modulation.1.weight": (2 * HIDDEN, HIDDEN),
                   "final_layer.adaLN_modulation.1.bias": (2 * HIDDEN,)})
    return shapes


def sincos_pos_embed(tokens: int) -> torch.Tensor:
    """DiT's fixed 2-D sin-cos position embedding (1, tokens, hidden), as its checkpoints store it."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    grid = int(round(tokens**0.5))
    table = get_2d_sincos_pos_embed(HIDDEN, grid, output_type="pt")
    return table.float().reshape(1, tokens, HIDDEN)


def dit_state(image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A random DiT-XL/2 state dict in the original layout.

    Weights ~ N(0, 0.5^2 / fan_in), biases zero, class embeddings ~ N(0, 1): each layer keeps its
    input's scale, so activations stay finite through the 28 blocks (DiT's own init zeroes adaLN
    and the final layer, which would make every block the identity and the calibration trivial).
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in dit_shapes(image_size).items():
        if key == "pos_embed":
            state[key] = sincos_pos_embed(shape[1])
        elif key.endswith("bias"):
            state[key] = torch.zeros(shape)
        elif key.startswith("y_embedder"):
            state[key] = torch.randn(shape, generator=gen)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=gen) * (0.5 / fan_in**0.5)
    return state


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz (np.load reads it) with fixed zip timestamps: np.savez stamps the current time, so its
    bytes, and the sha256 the config pins, would change with every run."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def random_covariance(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A positive definite dim x dim covariance (FID needs its matrix square root)."""
    a = rng.standard_normal((dim, 2 * dim))
    return a @ a.T / (2 * dim)


def reference_batch(image_size: int, n_images: int, seed: int) -> dict[str, np.ndarray]:
    """ADM reference-batch arrays: random uint8 NHWC images and statistics of the real dimensions."""
    rng = np.random.default_rng(seed)
    return {
        "arr_0": rng.integers(0, 256, (n_images, image_size, image_size, 3), dtype=np.uint8),
        "mu": rng.standard_normal(POOL_DIM), "sigma": random_covariance(POOL_DIM, rng),
        "mu_s": rng.standard_normal(SPATIAL_DIM), "sigma_s": random_covariance(SPATIAL_DIM, rng),
    }


def vae_state(seed: int) -> dict[str, torch.Tensor]:
    """Random weights of sd-vae-ft-ema's architecture (diffusers' default initialisation), diffusers' keys."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = {k: v for k, v in SD_VAE_FT_EMA_CONFIG.items() if not k.startswith("_")}
    return {k: v.contiguous() for k, v in AutoencoderKL(**config).state_dict().items()}


ASSETS = ("dit", "vae-config", "vae-weights", "inception", "reference")


def write_asset(asset: str, output: Path, seed: int, image_size: int, n_images: int) -> None:
    """Write one asset deterministically (same seed and options -> same bytes), atomically."""
    if asset not in ASSETS:
        raise ValueError(f"unknown rehearsal asset {asset!r}; expected one of {ASSETS}")
    with atomic_output(output, (RuntimeError, SafetensorError)) as tmp:
        if asset == "dit":
            torch.save(dit_state(image_size, seed), tmp)  # torch's zip records carry no time stamps
        elif asset == "vae-config":
            tmp.write_text(json.dumps(SD_VAE_FT_EMA_CONFIG, indent=2) + "\n")
        elif asset == "vae-weights":
            save_file(vae_state(seed), str(tmp), metadata={"format": "pt"})
        elif asset == "inception":
            torch.manual_seed(seed)
            save_random_weights("inception-v3-compat", tmp)
        else:
            save_npz(tmp, reference_batch(image_size, n_images, seed))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--asset", required=True, choices=ASSETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256, help="dit and reference: 256 or 512")
    parser.add_argument("--n-images", type=int, default=8, help="reference: images in arr_0")
    parser.add_argument("--output", required=True)


def run(args: argparse.Namespace) -> None:
    write_asset(args.asset, Path(args.output), args.seed, args.image_size, args.n_images)
    log.info("wrote rehearsal asset %s: %s (%s)", args.asset, args.output, NOTICE)
