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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.utils import create_feature_extractor

from vq4dit.io import (
    META_KEY, atomic_savez, environment, load_npz, log_peak_gpu_memory, meta_array, progress, read_meta,
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


@torch.inference_mode()
def extract(images: np.ndarray, model: FeatureModel, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """Features of uint8 NHWC images, batched."""
    parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    model.to(device)
    for begin in progress(range(0, len(images), batch_size), desc="features", unit="batch"):
        batch = torch.from_numpy(images[begin:begin + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
        for key, value in zip(parts, model(batch)):
            parts[key].append(value.float().cpu().numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def read_images(paths: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Concatenate ``arr_0`` of the given .npz files; also return any precomputed reference statistics."""
    images, stats = [], {}
    for path in paths:
        images.append(load_npz(path, ("arr_0",))["arr_0"])
        with np.load(path) as data:
            stats.update({k: data[k] for k in REFERENCE_STATISTICS if k in data.files})
    images = np.concatenate(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{paths[0]}: expected uint8 NHWC images in arr_0, got {images.dtype} {images.shape}")
    return images, stats


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
    images, stats = read_images(args.inputs)
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
