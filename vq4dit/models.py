"""Diffusion transformers as this project uses them: diffusers' ``DiTTransformer2DModel``.

Both presets store a transformer in diffusers' on-disk layout (``config.json`` +
``diffusion_pytorch_model.safetensors``), so every later stage loads models the same way.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

log = logging.getLogger(__name__)

#: diffusers constructor arguments of the architectures this project knows.
ARCHITECTURES: dict[str, dict] = {
    "DiT-XL/2": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, patch_size=2),
    "DiT-L/2": dict(num_attention_heads=16, attention_head_dim=64, num_layers=24, patch_size=2),
    "DiT-B/2": dict(num_attention_heads=12, attention_head_dim=64, num_layers=12, patch_size=2),
    "DiT-S/2": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, patch_size=2),
    # The smoke preset's proxy: class-conditional, pixel space on 8x8 grayscale digits.
    "DiT-digits": dict(num_attention_heads=4, attention_head_dim=24, num_layers=4, patch_size=2),
}


#: eps of every LayerNorm in DiT (diffusers' default for the pre-MLP norm is 1e-5)
DIT_NORM_EPS = 1e-6


def build_transformer(
    arch: str, sample_size: int, in_channels: int, num_classes: int, learn_sigma: bool = True
) -> DiTTransformer2DModel:
    """A randomly initialised DiT of a named architecture (``learn_sigma`` doubles the output channels), with
    DiT's LayerNorm eps 1e-6 everywhere (diffusers' ``norm_eps`` is the pre-MLP norm's; the others are 1e-6)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return DiTTransformer2DModel(
        **ARCHITECTURES[arch],
        in_channels=in_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        sample_size=sample_size,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=1,
        norm_eps=DIT_NORM_EPS,
    )


#: written next to a converted DiT checkpoint: settings diffusers' config.json cannot hold
ORIGINAL_DIT_MARKER = "original_dit.json"


def use_original_timestep_embedding(model: DiTTransformer2DModel) -> None:
    """Embed timesteps as facebookresearch/DiT does: frequencies exp(-ln(10^4) i / half).

    diffusers' DiT uses ``downscale_freq_shift=1`` (``/ (half - 1)``); official checkpoints were
    trained with ``/ half``, so converted checkpoints get shift 0 on every block's embedder.
    """
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


def load_transformer(directory: str | Path, device: str | torch.device = "cpu") -> DiTTransformer2DModel:
    """Load a transformer saved in diffusers' layout (its folder or its config.json), in eval mode."""
    directory = Path(directory)
    directory = directory.parent if directory.name == "config.json" else directory
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json; expected a diffusers DiTTransformer2DModel folder")
    model = DiTTransformer2DModel.from_pretrained(directory)
    if (directory / ORIGINAL_DIT_MARKER).is_file():
        use_original_timestep_embedding(model)
    return model.to(device).eval()


def save_converted(model: DiTTransformer2DModel, directory: str | Path, source: str) -> None:
    """Save a converted official DiT checkpoint with the marker that restores its timestep embedding."""
    model.save_pretrained(directory)
    marker = {"source": source, "timestep_downscale_freq_shift": 0}
    (Path(directory) / ORIGINAL_DIT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def num_classes(model: DiTTransformer2DModel) -> int:
    """Number of real classes; the id ``num_classes`` is the null (unconditional) label."""
    return int(model.config.num_embeds_ada_norm)


def tie_embedders(model: DiTTransformer2DModel) -> None:
    """Make every block share block 0's timestep/class embedder (DiT has one; diffusers keeps copies)."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared


def untie_embedders(model: DiTTransformer2DModel) -> None:
    """Give every block its own copy of the shared embedder again, as diffusers' checkpoints store it."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(shared)


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the quantized layers: every ``nn.Linear`` in the DiT blocks except the embedder copies."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith("transformer_blocks.")
        and ".norm1.emb." not in name
    ]
