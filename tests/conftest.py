"""Shared fixtures: single-threaded torch (tiny tensors are faster without OpenMP) and a tiny DiT."""

from __future__ import annotations

import torch
import pytest

from vq4dit.models import build_transformer

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
