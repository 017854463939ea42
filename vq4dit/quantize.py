"""Quantize stage: one model, one setting of ``config/settings.tsv``, written as a packed checkpoint
(layout: ``vq4dit.packed``)."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch

from vq4dit import assignments, rtn, size
from vq4dit.baselines import HESSIAN_METHODS, BaselineConfig
from vq4dit.calibration import (
    CalibrationConfig, block_mse, calibrate, collect_calibration_inputs, held_out, load_checkpoint, restore_layers,
)
from vq4dit.io import atomic_write_json, environment, log_peak_gpu_memory, release_free_heap, resolve_device
from vq4dit.models import block_linear_names, load_transformer
from vq4dit.packed import Packed, load_quantized_transformer, nonblock_bytes, save_packed

log = logging.getLogger(__name__)

#: method name -> function(model, layer names, setting, calibration config, device, teacher) -> (packed layers, info);
#: ``model`` may be modified in place, ``teacher`` is the unmodified FP model (calibration target); the
#: Hessian methods (GPTQ, Q-DiT, GPTVQ: ``vq4dit.baselines``) also take ``baselines`` (config key baselines)
Quantizer = Callable[..., tuple[Packed, dict]]


def quantize_fp(model, names, setting, cfg, device, teacher) -> tuple[Packed, dict]:
    """The full-precision reference: nothing is quantized."""
    return {}, {"size": size.fp_size(size.linear_shapes(model, names))}


def quantize_rtn(model, names, setting, cfg, device, teacher) -> tuple[Packed, dict]:
    """Per-output-channel RTN of every block linear; ``repq-vit``: with RepQ-ViT's percentile clipping search."""
    bits, search = int(setting["bits"]), setting["method"] == "repq-vit"
    packed = {name: rtn.quantize_weight(model.get_submodule(name).weight, bits, search) for name in names}
    return packed, {"size": size.scalar_size(size.linear_shapes(model, names), bits)}


#: methods whose quantize job runs the zero-data calibration (and can resume it)
CALIBRATED = ("vq-codebook", "vq4dit")


def fingerprint(setting: dict, cfg: CalibrationConfig, names: list[str]) -> str:
    """What a calibration checkpoint must match to be resumed: setting, calibration config (but the
    checkpoint interval) and layer names."""
    calibration = {k: v for k, v in vars(cfg).items() if k != "checkpoint_minutes"}
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
    shapes = size.linear_shapes(model, names)
    n = int(setting.get("n_candidates", 2)) if method == "vq4dit" else 1
    key = fingerprint(setting, cfg, names)
    resume = load_checkpoint(checkpoint, key, device) if method in CALIBRATED else None
    if resume is None:
        vq, layers = assignments.quantize_model_linears(model, names, k=k, d=d, n_candidates=n,
                                                        kmeans_iters=cfg.kmeans_iters, seed=cfg.seed,
                                                        ratio_init=cfg.ratio_init)
    else:
        vq, layers = restore_layers(model, names, resume)
    release_free_heap()
    info: dict = {"size": size.vq_size(shapes, k, d)}
    if method in CALIBRATED:
        history = calibrate(teacher, model, vq, layers, cfg, checkpoint, resume, key)
        info.update(calibration_seconds=history.pop("calibration_seconds"),
                    optimizer_steps=history.pop("optimizer_steps"), precision=cfg.precision,
                    objective=cfg.objective, calibration_history=history)
    vq.harden_()  # every sub-vector takes its largest-ratio candidate, as packed() stores it
    return {name: layer.packed() for name, layer in layers.items()}, info


METHODS: dict[str, Quantizer] = {
    "fp": quantize_fp, "rtn": quantize_rtn, "repq-vit": quantize_rtn, "vq-kmeans": quantize_vq, "vq-codebook": quantize_vq,
    "vq4dit": quantize_vq, **HESSIAN_METHODS,
}
FORMATS: dict[str, str] = {"rtn": "rtn", "repq-vit": "rtn", "gptq": "rtn", "qdit": "rtn", "vq-kmeans": "vq",
                           "vq-codebook": "vq", "vq4dit": "vq", "gptvq": "vq"}


def evaluate_block_mse(fp_model: torch.nn.Module, transformer: str, packed: Path, cfg: CalibrationConfig,
                       device) -> float:
    """Mean block-output MSE of the packed model (as reloaded from disk) against the FP model on held-out
    teacher inputs."""
    calib = collect_calibration_inputs(fp_model, held_out(cfg), device)
    return block_mse(fp_model, load_quantized_transformer(transformer, packed, device), calib)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transformer", required=True, help="diffusers transformer folder of the FP model")
    parser.add_argument("--setting", required=True, help="the settings.tsv row as JSON")
    parser.add_argument("--calibration", default="{}", help="calibration config as JSON")
    parser.add_argument("--baselines", default="{}", help="config key baselines as JSON (GPTQ, Q-DiT, GPTVQ)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", required=True, help="packed model (.safetensors)")
    parser.add_argument("--info", required=True, help="JSON with size accounting and timings")
    parser.add_argument("--checkpoint", type=Path, help="resumable calibration state (kept only while the job runs)")


def run(args: argparse.Namespace) -> None:
    # Bit-reproducible calibration: with 2+ CPU threads the backward's accumulation order varied between
    # runs (37 of 138 tensors differed); deterministic kernels cost no measurable time on the smoke model.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' condition for determinism
    torch.use_deterministic_algorithms(True, warn_only=True)  # ops without a deterministic kernel only warn
    setting, calibration = json.loads(args.setting), json.loads(args.calibration)
    method = setting.get("method")
    if method not in METHODS:
        raise ValueError(f"setting {setting.get('id')!r}: unknown method {method!r}; expected one of {sorted(METHODS)}")
    device = resolve_device(args.device)
    model = load_transformer(args.transformer, device)
    names = block_linear_names(model)
    log.info("setting %s (%s) on %d block linears, device %s", setting.get("id"), method, len(names), device)
    cfg = CalibrationConfig.from_dict(calibration)
    baselines = BaselineConfig.from_dict(json.loads(args.baselines))
    fp_model = copy.deepcopy(model)  # one FP copy: calibration teacher, packed file's FP tensors, block-MSE reference
    start = time.perf_counter()
    extra = {"checkpoint": args.checkpoint} if method in CALIBRATED else {}
    if method in HESSIAN_METHODS:
        extra["baselines"] = baselines
    packed, info = METHODS[method](model, names, setting, cfg, device, fp_model, **extra)
    info["quantize_seconds"] = time.perf_counter() - start
    del model  # the student and its calibration state: the block-MSE check loads the packed file instead
    output = Path(args.output)
    save_packed(fp_model.state_dict(), packed, FORMATS.get(method, method), setting, output)
    info["block_mse"] = evaluate_block_mse(fp_model, args.transformer, output, cfg, device)
    info.update(setting=setting, file_mb=output.stat().st_size / 2**20, n_layers=len(names),
                nonblock_mb=nonblock_bytes(fp_model.state_dict(), names) / 2**20,
                environment=environment(device, seed=cfg.seed))  # device and numerics, for the manifest
    atomic_write_json(Path(args.info), info)
    if args.checkpoint is not None:
        args.checkpoint.unlink(missing_ok=True)  # done: a rerun starts over
    log.info("wrote %s (%.2f MB on disk) in %.1f s", output, info["file_mb"], info["quantize_seconds"])
    log_peak_gpu_memory(log, device)
