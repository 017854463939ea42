"""VQ4DiT's quantize entry (and its ablations vq-kmeans, vq-codebook): k-means codebooks, candidate
assignments (:mod:`vq4dit.methods.assignments`), zero-data calibration (:mod:`vq4dit.methods.calibration`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vq4dit import size
from vq4dit.io import release_free_heap
from vq4dit.methods import REGISTRY, assignments
from vq4dit.methods.calibration import CalibrationConfig, NonFiniteLoss, calibrate, load_checkpoint, restore_layers
from vq4dit.packed import Packed


#: calibration keys that do not change the calibrated state: a checkpoint resumes across them
NOT_FINGERPRINTED = ("checkpoint_minutes", "block_mse")


def fingerprint(setting: dict, cfg: CalibrationConfig, names: list[str]) -> str:
    """What a calibration checkpoint must match to be resumed: setting, calibration config (but
    :data:`NOT_FINGERPRINTED`) and layer names."""
    calibration = {k: v for k, v in vars(cfg).items() if k not in NOT_FINGERPRINTED}
    text = json.dumps({"setting": setting, "calibration": calibration, "layers": names}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def quantize_vq(model, names, setting, cfg: CalibrationConfig, device, teacher,
                checkpoint: Path | None = None) -> tuple[Packed, dict]:
    """VQ of every block linear: k-means codebooks, then (unless ``vq-kmeans``) zero-data calibration.

    ``vq-kmeans``: nearest assignments, no calibration. ``vq-codebook``: one candidate (hard
    assignments), codebooks and biases calibrated. ``vq4dit``: ``n_candidates`` soft candidates.
    ``checkpoint``: where the calibration keeps its resumable state (a killed job resumes from it).
    """
    method, k, d = setting["method"], int(setting["k"]), int(setting["d"])
    calibrated = REGISTRY[method].calibrated
    shapes = size.linear_shapes(model, names)
    n = int(setting.get("n_candidates", 2)) if method == "vq4dit" else 1
    key = fingerprint(setting, cfg, names)
    resume = load_checkpoint(checkpoint, key, device) if calibrated else None
    if resume is None:
        vq, layers = assignments.quantize_model_linears(model, names, k=k, d=d, n_candidates=n,
                                                        kmeans_iters=cfg.kmeans_iters, seed=cfg.seed,
                                                        ratio_init=cfg.ratio_init)
    else:
        vq, layers = restore_layers(model, names, resume)
    release_free_heap()
    info: dict = {"size": size.vq_size(shapes, k, d)}
    if calibrated:
        try:
            history = calibrate(teacher, model, vq, layers, cfg, checkpoint, resume, key)
        except NonFiniteLoss as err:
            raise NonFiniteLoss(f"setting {setting.get('id')!r}: {err}") from err
        info.update(calibration_seconds=history.pop("calibration_seconds"),
                    optimizer_steps=history.pop("optimizer_steps"), precision=cfg.precision,
                    objective=cfg.objective, calibration_history=history)
    vq.harden_()  # every sub-vector takes its largest-ratio candidate, as packed() stores it
    return {name: layer.packed() for name, layer in layers.items()}, info
