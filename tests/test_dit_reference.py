"""A converted checkpoint against DiT's forward pass, written here from the DiT paper (Peebles & Xie 2023) and
facebookresearch/DiT ``models.py``: patchify conv + fixed 2-D sin-cos position embedding, sinusoidal timestep
embedding (frequencies exp(-ln(10^4) i / half)) through an MLP, class embedding with a null label, adaLN-Zero
blocks (LayerNorm eps 1e-6 without affine, modulate x * (1 + scale) + shift, gated attention and GELU-tanh MLP),
adaLN final layer, unpatchify; learned sigma doubles the output channels."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vq4dit.models import ARCHITECTURES
from vq4dit.prepare import convert_dit

DEPTH, HIDDEN, HEADS, PATCH, LATENT, CHANNELS, CLASSES, FREQ_DIM = 2, 64, 4, 2, 8, 4, 10, 256
EPS = 1e-6


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim): first half embeds the width coordinate, second half the height (DiT's meshgrid order)."""
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1)


def original_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in facebookresearch/DiT's key layout (adaLN-Zero's zero init replaced so every path counts)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.1: torch.randn(*shape, generator=gen) * scale  # noqa: E731
    out_channels, tokens = 2 * CHANNELS, (LATENT // PATCH) ** 2
    state = {
        "x_embedder.proj.weight": rand(HIDDEN, CHANNELS, PATCH, PATCH), "x_embedder.proj.bias": rand(HIDDEN),
        "pos_embed": torch.from_numpy(sincos_2d(HIDDEN, LATENT // PATCH)).float().reshape(1, tokens, HIDDEN),
        "t_embedder.mlp.0.weight": rand(HIDDEN, FREQ_DIM), "t_embedder.mlp.0.bias": rand(HIDDEN),
        "t_embedder.mlp.2.weight": rand(HIDDEN, HIDDEN), "t_embedder.mlp.2.bias": rand(HIDDEN),
        "y_embedder.embedding_table.weight": rand(CLASSES + 1, HIDDEN, scale=1.0),
        "final_layer.adaLN_modulation.1.weight": rand(2 * HIDDEN, HIDDEN),
        "final_layer.adaLN_modulation.1.bias": rand(2 * HIDDEN),
        "final_layer.linear.weight": rand(PATCH * PATCH * out_channels, HIDDEN),
        "final_layer.linear.bias": rand(PATCH * PATCH * out_channels),
    }
    for i in range(DEPTH):
        for name, (rows, cols) in {"attn.qkv": (3 * HIDDEN, HIDDEN), "attn.proj": (HIDDEN, HIDDEN),
                                   "mlp.fc1": (4 * HIDDEN, HIDDEN), "mlp.fc2": (HIDDEN, 4 * HIDDEN),
                                   "adaLN_modulation.1": (6 * HIDDEN, HIDDEN)}.items():
            state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = rand(rows, cols), rand(rows)
    return state


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """DiT's TimestepEmbedder.timestep_embedding (float32, cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def linear(s, name, x):
    return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def dit_forward(s: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DiT.forward in float64 (the timestep frequencies in float32, as DiT computes them)."""
    s = {k: v.double() for k, v in s.items()}
    n = x.shape[0]
    h = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + s["pos_embed"]
    t_emb = linear(s, "t_embedder.mlp.2", F.silu(linear(s, "t_embedder.mlp.0", timestep_embedding(t).double())))
    c = t_emb + s["y_embedder.embedding_table.weight"][y]
    head_dim = HIDDEN // HEADS
    for i in range(DEPTH):
        b = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(
            s, f"{b}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        a = modulate(layer_norm(h), shift_msa, scale_msa)
        q, k, v = linear(s, f"{b}.attn.qkv", a).reshape(n, -1, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * head_dim ** -0.5, dim=-1)
        a = linear(s, f"{b}.attn.proj", (attn @ v).transpose(1, 2).reshape(n, -1, HIDDEN))
        h = h + gate_msa.unsqueeze(1) * a
        m = modulate(layer_norm(h), shift_mlp, scale_mlp)
        m = linear(s, f"{b}.mlp.fc2", F.gelu(linear(s, f"{b}.mlp.fc1", m), approximate="tanh"))
        h = h + gate_mlp.unsqueeze(1) * m
    shift, scale = linear(s, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    h = linear(s, "final_layer.linear", modulate(layer_norm(h), shift, scale))
    grid, out_channels = LATENT // PATCH, 2 * CHANNELS
    h = h.reshape(n, grid, grid, PATCH, PATCH, out_channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, out_channels, grid * PATCH, grid * PATCH)


@pytest.fixture
def converted(tmp_path, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "DiT-test", dict(num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS,
                                                        num_layers=DEPTH, patch_size=PATCH))
    state = original_checkpoint()
    path = tmp_path / "DiT-test.pt"
    torch.save(state, path)
    return state, convert_dit(path, "DiT-test", image_size=8 * LATENT, sha256=None)


def test_converted_checkpoint_computes_dits_forward_pass(converted):
    state, model = converted
    t = torch.tensor([0, 1, 250, 500, 750, 999, 999])
    y = torch.tensor([0, 3, CLASSES, 9, CLASSES, 5, CLASSES])  # CLASSES = the null label
    x = torch.randn(len(t), CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = dit_forward(state, x, t, y)
    with torch.no_grad():
        ours = model.double()(x, timestep=t, class_labels=y).sample
    assert ours.shape == (len(t), 2 * CHANNELS, LATENT, LATENT)  # epsilon and the learned-sigma channels
    assert expected.abs().mean() > 0.1  # a non-trivial output, so the comparison below can fail
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_float32_model_agrees_with_the_reference(converted):
    state, model = converted
    t, y = torch.tensor([0, 999]), torch.tensor([CLASSES, 2])
    x = torch.randn(2, CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(ours.double(), dit_forward(state, x.double(), t, y), rtol=1e-4, atol=1e-5)
