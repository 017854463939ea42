"""Packed checkpoints: the file a quantized model ships as (safetensors), written by ``quantize``, read by ``sample``.

Layout: every tensor of the FP transformer except the quantized block weights, plus each quantized
layer's packed tensors under ``<layer>.<key>``. Two things keep the file at the size the paper
counts:

- Shared tensors once. diffusers' DiT keeps a copy of the timestep/class embedder in every block
  (``transformer_blocks.<i>.norm1.emb``; DiT has one, ~75M parameters in DiT-XL/2's 28 copies).
  Copies equal to block 0's are left out and the loader re-ties every block to block 0's embedder.
- Codes below 8 bits bit-packed: RTN codes (b bits) and VQ assignments (ceil(log2 k) bits) are
  stored as a dense little-endian bit stream of uint8 (numpy's packbits; safetensors has no
  sub-byte dtypes). The metadata records each layer's format, bit width and code shape.

``load_quantized_transformer`` dequantizes once at load time, so sampling costs the same as FP.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vq4dit.io import atomic_output
from vq4dit.methods import assignments, rtn
from vq4dit.models import load_transformer, tie_embedders

Packed = dict[str, dict[str, torch.Tensor]]

#: layer format -> (its integer code tensor, dequantizer of its packed tensors); the bias stays the plain ``bias``
FORMATS: dict[str, tuple[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]]] = {
    "rtn": ("codes", rtn.dequantize),
    "vq": ("assignments", lambda packed: assignments.dequantize(packed)[0]),
}
EMBEDDER = "norm1.emb."
TIED_PREFIX = "transformer_blocks.0." + EMBEDDER


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integer codes < 2**bits as a dense stream of ``bits`` bits each (uint8, little-endian bit order)."""
    values = codes.reshape(-1).to(torch.int64).numpy()
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"codes outside 0..{(1 << bits) - 1} cannot be packed in {bits} bits")
    planes = ((values[:, None] >> np.arange(bits)) & 1).astype(np.uint8)  # (n, bits), least significant bit first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(stream: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes (int64).

    Widths that divide 8 (1, 2, 4) are read a byte at a time (code ``i`` of a byte is its bits from
    ``i * bits`` up); others from the stream's bits, assembled in uint8 (DiT-XL/2's 196 2-bit layers:
    16.6 s with int64 bit planes, the sample stage's largest start-up cost).
    """
    data = stream.numpy()
    if 8 % bits == 0:
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        codes = ((data[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    else:
        planes = np.unpackbits(data, count=count * bits, bitorder="little").reshape(count, bits)
        codes = np.zeros(count, dtype=np.uint8)
        for bit in range(bits):
            codes |= planes[:, bit] << bit
    return torch.from_numpy(codes.astype(np.int64))


def code_bits(fmt: str, tensors: dict[str, torch.Tensor], setting: dict) -> int:
    """Bits per code: the RTN bit width, or ceil(log2 k) of the layer's codebook (at least 1)."""
    if fmt == "rtn":
        return int(setting["bits"])
    return max(1, math.ceil(math.log2(len(tensors["codebook"]))))


def shared_copies(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of per-block embedder copies equal to block 0's (stored once, re-tied on load)."""
    copies = []
    for key, tensor in state.items():
        block, _, rest = key.partition(f".{EMBEDDER}")
        if rest and block != "transformer_blocks.0":
            first = state.get(TIED_PREFIX + rest)
            if first is not None and torch.equal(first, tensor):
                copies.append(key)
    return copies


def nonblock_bytes(fp_state: dict[str, torch.Tensor], names: list[str]) -> int:
    """Bytes of the tensors the paper's size does not count (embedders, patch embedding, final layer), shared ones once."""
    counted = {f"{name}.{key}" for name in names for key in ("weight", "bias")} | set(shared_copies(fp_state))
    return sum(t.numel() * t.element_size() for k, t in fp_state.items() if k not in counted)


def check_finite(packed: Packed, fmt: str, path: Path) -> None:
    """Raise ValueError naming the first layer whose dequantized weight has a NaN or Inf."""
    for name, tensors in packed.items():
        if not torch.isfinite(FORMATS[fmt][1](dict(tensors))).all():
            raise ValueError(f"{path}: layer {name!r} dequantizes to a non-finite weight (NaN or Inf); not written")


def save_packed(fp_state: dict[str, torch.Tensor], packed: Packed, fmt: str, setting: dict, path: Path) -> None:
    """Write the packed checkpoint: FP tensors (shared ones once), each quantized weight replaced by its packed tensors.

    Refuses (ValueError naming the layer) a layer whose weight would not be finite.
    """
    check_finite(packed, fmt, path)
    state = dict(fp_state)
    tied = shared_copies(state)
    for key in tied:
        del state[key]
    layers = {}
    for name, tensors in packed.items():
        del state[f"{name}.weight"]
        tensors = dict(tensors)
        key = FORMATS[fmt][0]
        bits = code_bits(fmt, tensors, setting)
        codes = tensors[key]
        layers[name] = {"format": fmt, "bits": bits, "code_shape": list(codes.shape), "code_dtype": str(codes.dtype)}
        if bits < 8:
            tensors[key] = pack_bits(codes, bits)
        state.update({f"{name}.{k}": t for k, t in tensors.items()})
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"setting": json.dumps(setting), "layers": json.dumps(layers), "tied": json.dumps(tied)}
    with atomic_output(path, (SafetensorError,)) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def unpack_layer(tensors: dict[str, torch.Tensor], layer: dict) -> torch.Tensor:
    """The fp32 weight of one packed layer."""
    key, dequantize = FORMATS[layer["format"]]
    shape, dtype = layer["code_shape"], getattr(torch, layer["code_dtype"].removeprefix("torch."))
    if layer["bits"] < 8:
        tensors[key] = unpack_bits(tensors[key], layer["bits"], math.prod(shape)).reshape(shape).to(dtype)
    return dequantize(tensors)


def read_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[str]]:
    """The dequantized state dict of a packed checkpoint (tied copies absent), its layers and the tied keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: packed model not found (run the quantize stage)")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "tied" not in metadata:
        raise ValueError(f"{path}: not a packed checkpoint of this version (no 'tied' metadata); rerun the quantize stage")
    layers, tied = json.loads(metadata["layers"]), json.loads(metadata["tied"])
    state = load_file(str(path))
    for name, layer in layers.items():
        prefix = f"{name}."
        keys = [k for k in state if k.startswith(prefix) and "." not in k[len(prefix):] and k != f"{name}.bias"]
        state[f"{name}.weight"] = unpack_layer({k[len(prefix):]: state.pop(k) for k in keys}, layer)
    return state, layers, tied


def load_quantized_transformer(transformer_dir: str | Path, packed_path: str | Path,
                               device: str | torch.device = "cpu") -> torch.nn.Module:
    """The FP architecture with the packed checkpoint's (dequantized-once) weights; stored-once embedders re-tied."""
    model = load_transformer(transformer_dir)
    state, _, tied = read_packed(packed_path)
    copies = [k for k in model.state_dict() if f".{EMBEDDER}" in k and not k.startswith(TIED_PREFIX)]
    if tied and sorted(tied) == sorted(copies):  # every block shares block 0's embedder, as in DiT
        tie_embedders(model)
    for key in tied:
        state[key] = state[TIED_PREFIX + key.partition(f".{EMBEDDER}")[2]]
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
