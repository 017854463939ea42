"""Quantize stage: one model, one setting of ``config/settings.tsv``, written as a packed checkpoint
(layout: ``vq4dit.packed``); the setting's method is looked up in ``vq4dit.methods.REGISTRY``."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import torch

from vq4dit.io import atomic_write_json, environment, file_sha256, log_peak_gpu_memory, resolve_device
from vq4dit.methods import method as registered
from vq4dit.methods.calibration import CalibrationConfig, block_mse, collect_calibration_inputs, held_out
from vq4dit.methods.hessians import BaselineConfig
from vq4dit.models import block_linear_names, load_transformer
from vq4dit.packed import load_quantized_transformer, nonblock_bytes, save_packed

log = logging.getLogger(__name__)


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
    try:
        spec = registered(setting.get("method"))
    except ValueError as err:
        raise ValueError(f"setting {setting.get('id')!r}: {err}") from None
    device = resolve_device(args.device)
    model = load_transformer(args.transformer, device)
    names = block_linear_names(model)
    log.info("setting %s (%s) on %d block linears, device %s", setting.get("id"), spec.name, len(names), device)
    cfg = CalibrationConfig.from_dict(calibration)
    baselines = BaselineConfig.from_dict(json.loads(args.baselines))
    fp_model = copy.deepcopy(model)  # one FP copy: calibration teacher, packed file's FP tensors, block-MSE reference
    start = time.perf_counter()
    extra = {"checkpoint": args.checkpoint} if spec.calibrated else {}
    if spec.hessians:
        extra["baselines"] = baselines
    packed, info = spec.quantizer()(model, names, setting, cfg, device, fp_model, **extra)
    info["quantize_seconds"] = time.perf_counter() - start
    del model  # the student and its calibration state: the block-MSE check loads the packed file instead
    output = Path(args.output)
    save_packed(fp_model.state_dict(), packed, spec.format, setting, output)
    info["packed_sha256"] = file_sha256(output)  # checked by the sample jobs before they load it
    info["block_mse"] = evaluate_block_mse(fp_model, args.transformer, output, cfg, device) if cfg.block_mse else None
    info.update(setting=setting, file_mb=output.stat().st_size / 2**20, n_layers=len(names),
                nonblock_mb=nonblock_bytes(fp_model.state_dict(), names) / 2**20,
                environment=environment(device, seed=cfg.seed))  # device and numerics, for the manifest
    atomic_write_json(Path(args.info), info)
    if args.checkpoint is not None:
        args.checkpoint.unlink(missing_ok=True)  # done: a rerun starts over
    log.info("wrote %s (%.2f MB on disk) in %.1f s", output, info["file_mb"], info["quantize_seconds"])
    log_peak_gpu_memory(log, device)
