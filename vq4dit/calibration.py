"""Zero-data calibration of VQ4DiT's codebooks and candidate-assignment ratios.

No dataset: the calibration inputs are the model inputs of the full-precision (teacher) sampler
started from Gaussian noise with random labels and classifier-free guidance. The loss of one
optimiser step is ``lambda_d * L_d + lambda_r * L_r`` with ``L_d`` the MSE between teacher and
student DiT-block outputs and ``L_r`` the mean of ``VQLinear.ratio_regularizer()`` over the
still-soft layers. RMSprop (three parameter groups: codebooks, biases, logits), and after every
step each layer freezes the sub-vectors whose max ratio exceeds ``freeze_threshold``.

Two drivers:

- :func:`calibrate_blockwise` (this project's fast design): the teacher's block inputs of the
  whole calibration set are cached once; every student block is trained against its FP block
  output with the FP block input (blocks are independent), on seeded random minibatches of the
  cache. ``joint_blocks`` consecutive blocks share each optimiser step (one backward of the sum of
  their losses: since block b's parameters only reach block b's loss, this equals training them
  one by one on the same minibatches); 0 = all blocks at once, which needs the cache of every
  block in memory, 1 = one block at a time (one block's cache: what fits DiT-XL/2 on one GPU).
- :func:`calibrate_sequential` (the authors' loop, for comparison): every outer iteration runs one
  guided teacher trajectory; at every sampling step the student sees the same model input, ``L_d``
  is the mean over blocks of the block-output MSE (student blocks fed the student's own
  activations), and one optimiser step is taken.

Switching ``L_r`` on (``ratio_reg_start``): the authors add ``L_r`` once ``L_d`` stops
decreasing. Here: an exponential moving average of ``L_d`` (decay :data:`LD_EMA_DECAY`) is
tracked from the first step; once it has gone ``ratio_reg_start`` consecutive steps without a
new minimum, ``L_r`` is on for good (per block for block-wise calibration, for the whole model
in the sequential loop). ``ratio_reg_start = 0`` uses ``L_r`` from the first step.

Iteration budget: the authors take 1000 outer iterations x 50 sampling steps = 50,000 optimiser
steps, each on a batch of 8 model inputs (4 labels + their 4 null-label copies), i.e. 400,000
block inputs per block. Block-wise calibration gives each block ``iterations`` steps of
``batch_size`` inputs; the defaults (50,000 x 8) match the authors' steps and inputs per block,
and any ``iterations * batch_size = 400,000`` matches the inputs seen.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq4dit.assignments import VQLinear
from vq4dit.io import progress
from vq4dit.models import num_classes
from vq4dit.sample import labels_for, sample_batch

log = logging.getLogger(__name__)

LD_EMA_DECAY = 0.98
"""Decay of the L_d moving average that decides when L_r is switched on (~50 steps: one trajectory)."""

FORWARD_BATCH = 128
"""Batch size of no-grad forward passes (teacher caches, block MSE)."""

HISTORY_POINTS = 100
"""History entries recorded per block (plus the last step)."""


@dataclass
class CalibrationConfig:
    """Calibration settings; defaults are the authors' values where they have one.

    ``lambda_r = 1.0``: the method gives no value for it; ``L_r`` already carries the authors'
    factor ``n`` (see ``VQLinear.ratio_regularizer``), and 1.0 weighs it like ``lambda_d``.
    ``trajectories = 16`` (the authors draw 1000, one per outer iteration) keeps the block-wise
    cache of ``trajectories * labels_per_trajectory * 2 * steps`` block inputs in GPU memory for
    DiT-XL/2 (6400 inputs: 7.5 GB per cache at 256x256, 30 GB at 512x512).
    """

    trajectories: int = 16
    labels_per_trajectory: int = 4
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_channels: int | None = None
    """Guided noise channels of the calibration sampler (None: all; DiT's own sampler guides 3)."""
    iterations: int = 50_000
    batch_size: int = 8
    lr_codebook: float = 1e-4
    lr_bias: float = 1e-4
    lr_logits: float = 5e-2
    rmsprop_alpha: float = 0.9
    lambda_d: float = 1.0
    lambda_r: float = 1.0
    ratio_reg_start: int = 100
    """Patience (optimiser steps without a new minimum of the L_d moving average) before L_r is on."""
    ratio_reg_deadline: float = 1.0
    """Fraction of the steps after which L_r is on even if L_d still improves (1.0: patience only).

    The authors' patience rule alone assumes a budget long enough for L_d to level off; with a short
    budget L_r may never switch on, and the final hardening then jumps from soft ratios."""
    freeze_threshold: float = 0.99
    layer_threshold: float = 0.99
    kmeans_iters: int = 100
    seed: int = 0
    joint_blocks: int = 1
    """Blocks calibrated together in one optimiser step (0: all); memory grows with it."""

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationConfig:
        """Build from a (possibly partial) dict; an unknown key raises ValueError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown calibration key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)


@dataclass
class CalibrationSet:
    """Recorded teacher model inputs: every sampling step of every guided trajectory (doubled batch)."""

    latents: Tensor
    """x_t, (S, C, H, W)."""
    timesteps: Tensor
    """t, (S,) int64."""
    labels: Tensor
    """class labels, (S,) int64; the null label ``num_classes`` marks the unconditional half."""

    def __len__(self) -> int:
        return self.latents.shape[0]

    def subset(self, max_samples: int) -> CalibrationSet:
        """At most ``max_samples`` evenly spaced entries (covering all timesteps and trajectories)."""
        if len(self) <= max_samples:
            return self
        index = torch.linspace(0, len(self) - 1, max_samples).round().long().to(self.latents.device)
        return CalibrationSet(self.latents[index], self.timesteps[index], self.labels[index])


class RatioRegSwitch:
    """Switches L_r on for good once the L_d moving average made no new minimum for ``patience`` steps,
    or at step ``deadline`` at the latest (None: no deadline)."""

    def __init__(self, patience: int, deadline: int | None = None) -> None:
        self.patience = patience
        self.deadline = deadline
        self.ema: float | None = None
        self.best = math.inf
        self.stale = 0
        self.steps = 0
        self.on = patience <= 0

    def update(self, l_d: float) -> bool:
        """Feed this step's L_d; returns whether L_r is on for this step."""
        self.steps += 1
        if not self.on and self.deadline is not None and self.steps > self.deadline:
            self.on = True
        if not self.on:
            self.ema = l_d if self.ema is None else LD_EMA_DECAY * self.ema + (1 - LD_EMA_DECAY) * l_d
            if self.ema < self.best:
                self.best, self.stale = self.ema, 0
            else:
                self.stale += 1
            self.on = self.stale >= self.patience
        return self.on


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def collect_calibration_inputs(model: nn.Module, cfg: CalibrationConfig, device: torch.device | str) -> CalibrationSet:
    """Zero-data calibration inputs: guided FP trajectories from seeded noise and random labels.

    Trajectory ``j`` draws its labels and noise with ``labels_for(cfg.seed, j * L, L, classes)``;
    every one of its ``cfg.steps`` model inputs (conditional and null halves) is recorded.
    """

    model = model.to(device)
    records: list[tuple[Tensor, Tensor, Tensor]] = []
    per = cfg.labels_per_trajectory
    for j in progress(range(cfg.trajectories), desc="calibration trajectories", unit="traj"):
        labels, generators = labels_for(cfg.seed, j * per, per, num_classes(model))
        sample_batch(model, labels, generators, cfg.steps, cfg.cfg_scale, cfg.cfg_channels,
                     hook=lambda t, x, y: records.append((x.clone(), t.clone(), y.clone())))
    latents, timesteps, labels = (torch.cat(parts) for parts in zip(*records))
    log.info("calibration set: %d model inputs (%d trajectories x %d steps)", len(latents), cfg.trajectories, cfg.steps)
    return CalibrationSet(latents, timesteps, labels)


def _block_index(name: str) -> int:
    """Block number of a layer named ``transformer_blocks.<i>.…``."""
    return int(name.split(".")[1])


def _layers_by_block(layers: dict[str, VQLinear], n_blocks: int) -> list[list[VQLinear]]:
    grouped: list[list[VQLinear]] = [[] for _ in range(n_blocks)]
    for name, layer in layers.items():
        grouped[_block_index(name)].append(layer)
    return grouped


def _prepare_student(q_model: nn.Module, layers: dict[str, VQLinear], cfg: CalibrationConfig) -> None:
    """Train only the VQ layers' parameters; set each layer's hardening threshold."""
    vq_params = {id(p) for layer in layers.values() for p in layer.parameters()}
    for p in q_model.parameters():
        if id(p) not in vq_params:
            p.requires_grad_(False)
    for layer in layers.values():
        layer.layer_threshold = cfg.layer_threshold


def make_optimizer(layers: list[VQLinear], cfg: CalibrationConfig) -> torch.optim.RMSprop:
    """RMSprop with the groups codebooks / biases / logits (trainable parameters only)."""
    groups = [
        ([layer.codebook for layer in layers], cfg.lr_codebook),
        ([layer.bias for layer in layers if layer.bias is not None], cfg.lr_bias),
        ([layer.logits for layer in layers], cfg.lr_logits),
    ]
    param_groups = [
        {"params": trainable, "lr": lr}
        for params, lr in groups
        if (trainable := [p for p in params if p.requires_grad])
    ]
    return torch.optim.RMSprop(param_groups, alpha=cfg.rmsprop_alpha)


def ratio_loss(layers: list[VQLinear]) -> Tensor | None:
    """Mean ``ratio_regularizer()`` over the still-soft layers (None if every layer is hard)."""
    soft = [layer.ratio_regularizer() for layer in layers if not layer.is_hard]
    return torch.stack(soft).mean() if soft else None


def frozen_fraction(layers: list[VQLinear]) -> float:
    """Fraction of the sub-vectors of ``layers`` frozen (hard layers count as fully frozen)."""
    total = sum(layer.frozen.numel() for layer in layers)
    return sum(int(layer.frozen.sum()) for layer in layers) / max(total, 1)


def _freeze(layers: list[VQLinear], cfg: CalibrationConfig) -> None:
    for layer in layers:
        layer.freeze_(cfg.freeze_threshold)


def _optimizer_step(
    optimizer: torch.optim.Optimizer, terms: list[tuple[list[VQLinear], Tensor, RatioRegSwitch]],
    cfg: CalibrationConfig,
) -> list[Tensor | None]:
    """One step on the sum over ``terms`` (layers, L_d, switch) of ``lambda_d L_d (+ lambda_r L_r once
    that term's switch is on)``, then freeze every term's layers; returns each term's L_r (None if off)."""
    loss, l_rs = 0.0, []
    for layers, l_d, switch in terms:
        l_r = ratio_loss(layers) if switch.update(float(l_d.detach())) else None
        loss = loss + cfg.lambda_d * l_d + (cfg.lambda_r * l_r if l_r is not None else 0.0)
        l_rs.append(l_r)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    for layers, _, _ in terms:
        _freeze(layers, cfg)
    return l_rs


def _deadline(cfg: CalibrationConfig, total_steps: int) -> int | None:
    """The step by which L_r is on at the latest (None: the patience rule alone)."""
    return None if cfg.ratio_reg_deadline >= 1.0 else int(cfg.ratio_reg_deadline * total_steps)


def _record_every(total_steps: int) -> int:
    return max(1, total_steps // HISTORY_POINTS)


def _run_block(block: nn.Module, hidden: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
    return block(hidden, timestep=timesteps, class_labels=labels)


@torch.no_grad()
def _embed(model: nn.Module, calib: CalibrationSet) -> Tensor:
    """Hidden states entering the first block: ``pos_embed(x)`` of every calibration input."""
    return torch.cat([model.pos_embed(x) for x in calib.latents.split(FORWARD_BATCH)])


@torch.no_grad()
def _block_forward(block: nn.Module, hidden: Tensor, calib: CalibrationSet) -> Tensor:
    """A block's output on the whole cache, in batches."""
    return torch.cat([
        _run_block(block, h, t, y)
        for h, t, y in zip(hidden.split(FORWARD_BATCH), calib.timesteps.split(FORWARD_BATCH),
                           calib.labels.split(FORWARD_BATCH))
    ])


def _to(calib: CalibrationSet, device: torch.device) -> CalibrationSet:
    return CalibrationSet(calib.latents.to(device), calib.timesteps.to(device), calib.labels.to(device))


def _block_groups(n_blocks: int, joint_blocks: int) -> list[range]:
    size = joint_blocks if joint_blocks > 0 else n_blocks
    return [range(g, min(g + size, n_blocks)) for g in range(0, n_blocks, size)]


def _calibrate_group(
    group: range, q_blocks: nn.ModuleList, layers: list[list[VQLinear]], cache: list[Tensor],
    calib: CalibrationSet, cfg: CalibrationConfig, bar,
) -> tuple[list[list[tuple[int, float, float, float]]], list[int | None]]:
    """Train the student blocks of ``group`` on cached FP inputs ``cache[i]`` and outputs ``cache[i + 1]``.

    Returns, per block, its history and the step L_r was switched on.
    """
    group_layers = [layer for b in group for layer in layers[b]]
    optimizer = make_optimizer(group_layers, cfg)
    switches = {b: RatioRegSwitch(cfg.ratio_reg_start, _deadline(cfg, cfg.iterations)) for b in group}
    generator = torch.Generator().manual_seed(cfg.seed)  # every group draws the same minibatch sequence
    every = _record_every(cfg.iterations)
    history: dict[int, list] = {b: [] for b in group}
    l_r_start: dict[int, int | None] = dict.fromkeys(group)
    offset = group.start
    for it in range(cfg.iterations):
        index = torch.randint(len(calib), (cfg.batch_size,), generator=generator).to(cache[0].device)
        t, y = calib.timesteps[index], calib.labels[index]
        l_ds = {b: F.mse_loss(_run_block(q_blocks[b], cache[b - offset][index], t, y), cache[b - offset + 1][index])
                for b in group}
        l_rs = dict(zip(group, _optimizer_step(optimizer, [(layers[b], l_ds[b], switches[b]) for b in group], cfg)))
        for b in group:
            if switches[b].on and l_r_start[b] is None:
                l_r_start[b] = it
            if it % every == 0 or it == cfg.iterations - 1:
                l_r = float(l_rs[b].detach()) if l_rs[b] is not None else 0.0
                history[b].append((it, float(l_ds[b].detach()), l_r, frozen_fraction(layers[b])))
                bar.set_postfix(block=b, L_d=f"{history[b][-1][1]:.3g}", L_r=f"{l_r:.3g}",
                                frozen=f"{history[b][-1][3]:.3f}")
        bar.update(len(group))
    return [history[b] for b in group], [l_r_start[b] for b in group]


def calibrate_blockwise(
    fp_model: nn.Module, q_model: nn.Module, layers: dict[str, VQLinear], calib: CalibrationSet,
    cfg: CalibrationConfig,
) -> dict:
    """Block-wise calibration on cached teacher block inputs (see the module docstring).

    Returns ``{"blocks": per block [(iteration, L_d, L_r, frozen fraction), ...],
    "ratio_reg_on": per block the step L_r was switched on (None: never),
    "block_seconds": per block training time (a group's time split evenly over its blocks),
    "calibration_seconds": total incl. the caches}``.
    """
    start = time.perf_counter()
    device = _device(q_model)
    calib = _to(calib, device)
    _prepare_student(q_model, layers, cfg)
    n_blocks = len(q_model.transformer_blocks)
    blocks = _layers_by_block(layers, n_blocks)
    hidden = _embed(fp_model, calib)
    result: dict = {"blocks": [], "ratio_reg_on": [], "block_seconds": []}
    with progress(total=cfg.iterations * n_blocks, desc="block-wise calibration", unit="step") as bar:
        for group in _block_groups(n_blocks, cfg.joint_blocks):
            group_start = time.perf_counter()
            cache = [hidden]
            for b in group:
                cache.append(_block_forward(fp_model.transformer_blocks[b], cache[-1], calib))
            histories, l_r_starts = _calibrate_group(group, q_model.transformer_blocks, blocks, cache, calib, cfg, bar)
            seconds = (time.perf_counter() - group_start) / len(group)
            for b, history, l_r_start in zip(group, histories, l_r_starts):
                result["blocks"].append(history)
                result["ratio_reg_on"].append(l_r_start)
                result["block_seconds"].append(seconds)
                log.info("block %d: L_d %.4g -> %.4g, L_r on at step %s, frozen %.4f", b, history[0][1],
                         history[-1][1], l_r_start, history[-1][3])
            hidden = cache[-1]
    result["calibration_seconds"] = time.perf_counter() - start
    return result


class _BlockOutputs:
    """Forward hooks keeping the latest output of every block of a model."""

    def __init__(self, model: nn.Module, clone: bool) -> None:
        blocks = model.transformer_blocks
        self.outputs: list[Tensor | None] = [None] * len(blocks)
        self.clone = clone
        self.handles = [block.register_forward_hook(self._keeper(i)) for i, block in enumerate(blocks)]

    def _keeper(self, i: int):
        def keep(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self.clone:  # teacher outputs come from inference mode: copy them to normal tensors
                with torch.inference_mode(False):
                    output = output.clone()
            self.outputs[i] = output
        return keep

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _SequentialStep:
    """Called after every teacher forward of the sampler: one student optimiser step on the same input."""

    def __init__(self, q_model: nn.Module, blocks: list[list[VQLinear]], cfg: CalibrationConfig,
                 total_steps: int) -> None:
        self.q_model, self.blocks, self.cfg = q_model, blocks, cfg
        self.layers = [layer for block in blocks for layer in block]
        self.optimizer = make_optimizer(self.layers, cfg)
        self.switch = RatioRegSwitch(cfg.ratio_reg_start, _deadline(cfg, total_steps))
        self.inputs: tuple[Tensor, Tensor, Tensor] | None = None
        self.step = 0
        self.l_r_start: int | None = None
        self.history: list[list[tuple[int, float, float, float]]] = [[] for _ in blocks]

    def record_input(self, t: Tensor, x: Tensor, y: Tensor) -> None:
        """``sample_batch`` hook: keep the model input of this sampling step."""
        self.inputs = (x, t, y)

    def train(self, teacher: _BlockOutputs, student: _BlockOutputs, record: bool) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            x, t, y = (v.clone() for v in self.inputs)
            self.q_model(x, timestep=t, class_labels=y)
            per_block = [F.mse_loss(s, f) for s, f in zip(student.outputs, teacher.outputs)]
            l_d = torch.stack(per_block).mean()
            _optimizer_step(self.optimizer, [(self.layers, l_d, self.switch)], self.cfg)
        if self.switch.on and self.l_r_start is None:
            self.l_r_start = self.step
        if record:
            for b, layers in enumerate(self.blocks):
                block_l_r = ratio_loss(layers)
                self.history[b].append((self.step, float(per_block[b].detach()),
                                        float(block_l_r.detach()) if block_l_r is not None else 0.0,
                                        frozen_fraction(layers)))
        self.step += 1


def calibrate_sequential(
    fp_model: nn.Module, q_model: nn.Module, layers: dict[str, VQLinear], cfg: CalibrationConfig,
    device: torch.device | str, outer_iterations: int,
) -> dict:
    """The authors' loop: ``outer_iterations`` guided teacher trajectories, one student step per sampling step.

    Trajectory ``i`` uses the labels and noise of ``labels_for(cfg.seed, i * L, L, classes)`` (its first
    ``cfg.trajectories`` trajectories are those of :func:`collect_calibration_inputs`). Same return format
    as :func:`calibrate_blockwise`; the history records each block's own MSE and L_r.
    """

    start = time.perf_counter()
    fp_model, q_model = fp_model.to(device), q_model.to(device)
    _prepare_student(q_model, layers, cfg)
    total = outer_iterations * cfg.steps
    stepper = _SequentialStep(q_model, _layers_by_block(layers, len(q_model.transformer_blocks)), cfg, total)
    teacher, student = _BlockOutputs(fp_model, clone=True), _BlockOutputs(q_model, clone=False)
    every = _record_every(total)
    bar = progress(total=total, desc="sequential calibration", unit="step")

    def after_teacher(module: nn.Module, args: tuple, output: object) -> None:
        stepper.train(teacher, student, record=stepper.step % every == 0 or stepper.step == total - 1)
        bar.update(1)

    handle = fp_model.register_forward_hook(after_teacher)
    try:
        per = cfg.labels_per_trajectory
        for i in range(outer_iterations):
            labels, generators = labels_for(cfg.seed, i * per, per, num_classes(fp_model))
            sample_batch(fp_model, labels, generators, cfg.steps, cfg.cfg_scale, cfg.cfg_channels,
                         hook=stepper.record_input)
            last = [history[-1] for history in stepper.history]
            bar.set_postfix(L_d=f"{sum(h[1] for h in last) / len(last):.3g}",
                            frozen=f"{frozen_fraction(stepper.layers):.3f}")
    finally:
        handle.remove()
        teacher.remove()
        student.remove()
        bar.close()
    seconds = time.perf_counter() - start
    log.info("sequential calibration: %d steps in %.1f s, L_r on at step %s, frozen %.4f", stepper.step, seconds,
             stepper.l_r_start, frozen_fraction(stepper.layers))
    return {"blocks": stepper.history, "ratio_reg_on": [stepper.l_r_start] * len(stepper.blocks),
            "block_seconds": [], "calibration_seconds": seconds}


@torch.no_grad()
def block_mse(fp_model: nn.Module, q_model: nn.Module, calib: CalibrationSet, max_samples: int = 512) -> float:
    """Mean over blocks of MSE(FP block(X_b), quantized block(X_b)), X_b the FP (teacher) block inputs.

    Uses at most ``max_samples`` evenly spaced calibration entries.
    """
    calib = _to(calib.subset(max_samples), _device(q_model))
    hidden = _embed(fp_model, calib)
    errors = []
    for fp_block, q_block in zip(fp_model.transformer_blocks, q_model.transformer_blocks):
        target = _block_forward(fp_block, hidden, calib)
        errors.append(F.mse_loss(_block_forward(q_block, hidden, calib), target).item())
        hidden = target
    return sum(errors) / len(errors)
