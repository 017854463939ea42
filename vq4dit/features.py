"""Features stage: one network pass per sample set gives the features of every metric.

Feature sets (keys of the output .npz): ``pool`` (FID, Precision, Recall), ``spatial`` (sFID) and
``logits`` (IS). Extractors are torch-fidelity feature extractors:

- ``inception-v3-compat`` (paper preset): torch-fidelity's port of ADM's TF Inception graph;
  ``pool`` = its ``2048`` output, ``logits`` = ``logits_unbiased`` (ADM's softmax has no bias), and
  ``spatial`` = ADM's ``mixed_6/conv`` (first 7 channels, 7*17*17 = 2023-d), taken with a forward
  hook on ``Mixed_6d.branch1x1``: the TF graph's blocks ``mixed, mixed_1 … mixed_10`` are the port's
  ``Mixed_5b … Mixed_7c`` in order, so ``mixed_6`` is ``Mixed_6d`` and its first conv the 1x1 branch.
- ``digits-cnn`` (smoke preset): a small CNN trained on scikit-learn's digits by the prepare stage,
  registered with torch-fidelity under that name; same three feature sets.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.utils import create_feature_extractor

from vq4dit.io import (
    META_KEY, atomic_savez, environment, halved_batch_size, log_peak_gpu_memory, meta_array, progress, read_meta,
    resolve_device, verify_npz,
)

log = logging.getLogger(__name__)

SPATIAL_CHANNELS = 7
#: precomputed statistics that ADM's reference batches carry and the metrics stage reuses
REFERENCE_STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")


class DigitsFeatureNet(nn.Module):
    """Digits classifier whose layers play Inception's roles: spatial map, pooled features, logits."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] (N, 1, 8, 8) -> (pool, spatial, logits)."""
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(self.conv3(F.max_pool2d(x, 2)))
        spatial = x[:, :SPATIAL_CHANNELS].flatten(1)
        pool = x.mean(dim=(2, 3))
        return pool, spatial, self.fc(pool)


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of :class:`DigitsFeatureNet`: uint8 images in, requested features out."""

    FEATURES = ("pool", "spatial", "logits_unbiased")

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("digits-cnn needs feature_extractor_weights_path (written by the prepare stage)")
        self.net = DigitsFeatureNet()
        self.net.load_state_dict(torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True))
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return DigitsFeatureExtractor.FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor):
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 NCHW images, got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] == 3:
            x = x.float().mean(dim=1, keepdim=True)
        found = dict(zip(self.FEATURES, self.net(x.float() / 127.5 - 1.0)))
        return tuple(found[name] for name in self.features_list)


torch_fidelity.register_feature_extractor("digits-cnn", DigitsFeatureExtractor)

#: per extractor: torch-fidelity feature names for (pool, logits)
FEATURE_NAMES = {"inception-v3-compat": ("2048", "logits_unbiased"), "digits-cnn": ("pool", "logits_unbiased")}


class FeatureModel(nn.Module):
    """One pass -> pool, spatial, logits, for either extractor."""

    def __init__(self, extractor: str, weights: str | None):
        super().__init__()
        if extractor not in FEATURE_NAMES:
            raise ValueError(f"unknown feature extractor {extractor!r}; expected one of {sorted(FEATURE_NAMES)}")
        if weights and not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: feature extractor weights not found (run the prepare stage)")
        names = list(FEATURE_NAMES[extractor])
        if extractor == "digits-cnn":
            names.insert(1, "spatial")
        self.net = create_feature_extractor(
            extractor, names, cuda=False, feature_extractor_weights_path=weights or None, verbose=False
        )
        self._spatial: torch.Tensor | None = None
        if extractor == "inception-v3-compat":
            self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(images)
        if len(out) == 3:
            return out
        return out[0], self._spatial, out[1]


def save_random_weights(extractor: str, path: Path) -> Path:
    """A weights file of the extractor's architecture with random values (tests and benchmarks only).

    torch-fidelity's Inception only builds from a weights file; it is built once with its loader
    bypassed, and its random state dict saved in the release file's format.
    """
    if extractor == "digits-cnn":
        torch.save(DigitsFeatureNet().state_dict(), path)
        return path
    empty = path.with_name(path.name + ".empty")
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
        empty.unlink()
    torch.save(net.state_dict(), path)
    return path


#: bytes of an .npz member read at once by :class:`ImageStream` (a few hundred images at 256 px)
CHUNK_BYTES = 64 * 2**20
FEATURE_KEYS = ("pool", "spatial", "logits")


class ImageStream:
    """Consecutive uint8 NHWC images of .npz files (``arr_0``) or arrays, handed out ``take(n)`` at a time.

    Memory holds one chunk and one batch, not the set: numpy reads an .npz member only whole, so the
    member's rows are read here from the zip stream after numpy's own header reader.
    """

    def __init__(self, sources: list[str | Path | np.ndarray]):
        self.length = sum(len(s) if isinstance(s, np.ndarray) else npz_images_shape(s)[0] for s in sources)
        self._chunks = chain.from_iterable(map(_chunks, sources))
        self._pending: list[np.ndarray] = []  # a stack: the next images are at its end

    def __len__(self) -> int:
        return self.length

    def take(self, count: int) -> np.ndarray:
        """The next ``count`` images (fewer at the end), across file boundaries."""
        parts = []
        while count > 0 and (part := self._pending.pop() if self._pending else next(self._chunks, None)) is not None:
            if len(part) > count:
                part, rest = part[:count], part[count:]
                self._pending.append(rest)
            parts.append(part)
            count -= len(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def put_back(self, images: np.ndarray) -> None:
        """Hand ``images`` out again first (a batch that did not fit the device)."""
        self._pending.append(images)


@contextmanager
def _npz_images(path: str | Path) -> Iterator[tuple[IO[bytes], tuple[int, ...]]]:
    """The open ``arr_0.npy`` member of an .npz, past its header, and its shape (checked: uint8 NHWC)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not an .npz file ({err})") from None
    with archive:
        if "arr_0.npy" not in archive.namelist():
            found = [name.removesuffix(".npy") for name in archive.namelist()]
            raise ValueError(f"{path}: missing key(s) ['arr_0']; found {found}")
        with archive.open("arr_0.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"{path}: arr_0 has .npy format version {version}; expected 1.0 or 2.0")
            shape, fortran_order, dtype = read_header[version](member)
            if dtype != np.uint8 or len(shape) != 4 or fortran_order:
                order = " in Fortran order" if fortran_order else ""
                raise ValueError(f"{path}: expected uint8 NHWC images in arr_0, got {dtype} {shape}{order}")
            yield member, shape


def npz_images_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of an .npz's ``arr_0`` images, from its header."""
    with _npz_images(path) as (_, shape):
        return shape


def _chunks(source: str | Path | np.ndarray) -> Iterator[np.ndarray]:
    """An array whole, or an .npz's images in chunks of about CHUNK_BYTES."""
    if isinstance(source, np.ndarray):
        yield source
        return
    with _npz_images(source) as (member, shape):
        rows = max(1, CHUNK_BYTES // math.prod(shape[1:]))
        for begin in range(0, shape[0], rows):
            chunk = np.empty((min(rows, shape[0] - begin), *shape[1:]), np.uint8)
            if member.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                raise ValueError(f"{source}: arr_0 ends before its {shape[0]} images (truncated file)")
            yield chunk


@torch.inference_mode()
def extract(images: np.ndarray | ImageStream, model: FeatureModel, batch_size: int,
            device: torch.device | str) -> dict[str, np.ndarray]:
    """Features of uint8 NHWC images, batched. A batch that runs out of device memory is run again at half
    the size, and so is the rest of the set."""
    stream = images if isinstance(images, ImageStream) else ImageStream([images])
    device = torch.device(device)
    features: dict[str, np.ndarray] = {}
    done = 0
    model.to(device)
    with progress(total=len(stream), desc="features", unit="image") as bar:
        while done < len(stream):
            batch = stream.take(batch_size)
            try:
                outputs = model(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(device))
            except torch.OutOfMemoryError:
                batch_size = halved_batch_size(batch_size, device, log)
                stream.put_back(batch)
                continue
            for key, value in zip(FEATURE_KEYS, outputs):
                value = value.float().cpu().numpy()
                features.setdefault(key, np.empty((len(stream), *value.shape[1:]), np.float32))[done:done + len(batch)] = value
            done += len(batch)
            bar.update(len(batch))
    return features


def reference_statistics(paths: list[str]) -> dict[str, np.ndarray]:
    """The precomputed statistics of ADM's reference batches found in the given .npz files."""
    stats = {}
    for path in paths:
        with np.load(path) as data:
            stats.update({k: data[k] for k in REFERENCE_STATISTICS if k in data.files})
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inputs", nargs="+", required=True, help=".npz files with arr_0 (uint8 NHWC)")
    parser.add_argument("--extractor", required=True, choices=sorted(FEATURE_NAMES))
    parser.add_argument("--weights", default="", help="local weights file of the extractor")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", required=True)
    parser.add_argument("--made-by", default="features", help="the rule of this job, named by the output's checksum record")


def run(args: argparse.Namespace) -> None:
    for path in args.inputs:
        verify_npz(path)
    images, stats = ImageStream(args.inputs), reference_statistics(args.inputs)
    if not len(images):
        raise ValueError(f"{args.inputs[0]}: no images in arr_0 of the {len(args.inputs)} input file(s)")
    model = FeatureModel(args.extractor, args.weights)
    log.info("extracting %s features of %d images from %d file(s)", args.extractor, len(images), len(args.inputs))
    device = resolve_device(args.device)
    features = extract(images, model, args.batch_size, device)
    meta = {**environment(device), "inputs": input_environments(args.inputs)}  # for the manifest (vq4dit.manifest)
    atomic_savez(Path(args.output), args.made_by, **features, **stats, **{META_KEY: meta_array(meta)})
    log.info("wrote %s: %s", args.output, {k: v.shape for k, v in features.items()})
    log_peak_gpu_memory(log, device)


def input_environments(paths: list[str]) -> list[dict]:
    """The distinct environments recorded in the input shards (none for reference images)."""
    found = {json.dumps(meta, sort_keys=True) for meta in map(read_meta, paths) if meta is not None}
    return [json.loads(meta) for meta in sorted(found)]
