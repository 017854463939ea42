"""Shared fixtures: single-threaded torch (tiny tensors are faster without OpenMP), a tiny DiT, a small one."""

from __future__ import annotations

import os
import signal

import torch
import pytest

from diffusers import DiTTransformer2DModel

from vq4dit.models import build_transformer, tie_embedders, untie_embedders

torch.set_num_threads(1)


@pytest.fixture
def tiny_dit():
    """A random 2-block, 10-class pixel DiT (8x8x1, learned sigma) in eval mode."""
    torch.manual_seed(0)
    model = build_transformer("DiT-digits", sample_size=8, in_channels=1, num_classes=10)
    return model.eval()


@pytest.fixture
def tiny_dit_dir(tiny_dit, tmp_path):
    """The tiny DiT saved in diffusers' layout."""
    folder = tmp_path / "transformer"
    tiny_dit.save_pretrained(folder)
    return folder


def small_dit() -> DiTTransformer2DModel:
    """A random 2-block DiT, hidden 384 (large enough that the safetensors header is within the size rule's 2 %),
    its blocks holding equal embedder copies as converted DiT checkpoints do."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, num_layers=2, patch_size=2,
                                  in_channels=4, out_channels=8, sample_size=8, num_embeds_ada_norm=10,
                                  norm_num_groups=1)
    tie_embedders(model)
    untie_embedders(model)
    return model.eval()


@pytest.fixture
def sigterm_at_call(monkeypatch):
    """``(model, call)``: send this process SIGTERM at the model's ``call``-th forward pass (counted from 1)."""
    def patch(model: torch.nn.Module, call: int) -> None:
        forward, calls = model.forward, []

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signal.SIGTERM)
            return forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", counted)
    return patch
