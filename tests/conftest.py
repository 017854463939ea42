"""Shared fixtures: single-threaded torch (tiny tensors are faster without OpenMP) and a tiny DiT."""

from __future__ import annotations

import os
import signal

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
