"""Zero-data calibration of VQ4DiT's codebooks and candidate-assignment ratios, as in the authors' loop.

No dataset: the student trains on the model inputs of the full-precision (teacher) sampler, guided
trajectories from seeded Gaussian noise and random labels, made while calibrating. At every teacher
sampling step **one optimiser step trains every block** (the authors' budget: ``outer_iterations x
steps`` whole-model steps, 1,000 x 50 for DiT-XL/2, each on ``labels_per_trajectory`` labels and their
null-label copies). Nothing is cached: a step's inputs live for that step only, so memory does not
grow with the budget or the resolution. ``streams`` > 1 splits a step's labels over that many
trajectories in flight, staggered along the sampling steps, so each optimiser step sees several
timesteps instead of one (:class:`TeacherStreams`; 1 is the authors' loop).

Loss ``lambda_d * L_d + lambda_r * on * L_r``: ``L_d`` is the mean over blocks of the block-output
MSE, ``L_r`` the ratio regulariser (``VQLayers.ratio_loss``). Two objectives (``objective``):

- ``sequential`` (the authors' code): the student runs its whole forward on x_t, so block b sees
  the student's own activations;
- ``blockwise``: student block b is fed the teacher's input of block b (each block learns to
  reproduce its FP block on FP inputs; blocks do not see each other's errors).

When ``L_r`` is on (``ratio_reg_rule``): ``trajectory-min`` (the authors' code: added whenever
``L_r`` is above its running minimum within the current trajectory, the minimum reset every
``steps`` optimiser steps) or ``patience`` (the paper's "once L_d stops decreasing": an exponential
moving average of ``L_d`` that has gone ``ratio_reg_start`` steps without a new minimum switches it
on for good, or ``ratio_reg_deadline`` of the budget at the latest). ``codebook_training``:
``after-hard`` (the authors' code: a layer's codebook trains only once its assignments are hard) or
``always`` (the paper's text). The dataclass defaults are the authors' code; the presets choose by
measurement (README, "VQ4DiT as implemented here").

No host synchronisation inside the loop: the switch, freezing and hardening are tensor operations;
numbers are read back only at the history points (at most :data:`HISTORY_POINTS` + 1) and when a
checkpoint is written, both inside :func:`host_reads`.

Checkpoints: every ``checkpoint_minutes`` (after an optimiser step) the full state (VQ parameters
and buffers, biases, optimiser, switch, history, every stream's trajectory: its x_t, step and
per-image generator states) is written atomically; a rerun with the same fingerprint resumes from it
and ends bit-identical to an uninterrupted run (test). On SIGTERM (a scheduler's warning before its
time limit) the checkpoint is written at the end of the current optimiser step and the job stops.

Faults: out of GPU memory, the calibration stops (naming the last checkpoint) rather than halving its
batch: a step's ``2 * labels_per_trajectory`` inputs are its gradient and its teacher trajectories, so a
smaller batch is another calibration. A NaN or infinite L_d or L_r stops it at the next history point,
naming the step and block (:class:`NonFiniteLoss`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq4dit.io import TerminationRequest, atomic_output, config_from_dict, progress
from vq4dit.methods.assignments import RATIO_INITS, VQLayers, VQLinear, attach
from vq4dit.models import num_classes
from vq4dit.sample import PRECISIONS, Trajectory, labels_for, sample_batch, set_precision

log = logging.getLogger(__name__)

LD_EMA_DECAY = 0.98
"""Decay of the L_d moving average of the patience rule (~50 steps: one trajectory)."""

FORWARD_BATCH = 128
"""Batch size of no-grad forward passes (block MSE)."""

HISTORY_POINTS = 100
"""History entries recorded per run (plus the last step)."""

OBJECTIVES = ("blockwise", "sequential")
RATIO_REG_RULES = ("patience", "trajectory-min")


class NonFiniteLoss(ValueError):
    """L_d or L_r became NaN or infinite: the calibration diverged."""


@dataclass
class CalibrationConfig:
    """Calibration settings; defaults are the authors' values where they have one.

    Budget: ``outer_iterations`` guided teacher trajectories of ``steps`` sampling steps, one
    whole-model optimiser step per sampling step, each on ``2 * labels_per_trajectory`` model
    inputs (labels and their null-label copies). ``lambda_r = 1.0``: the method gives no value;
    ``L_r`` already carries the authors' factor ``n``.
    """

    outer_iterations: int = 1000
    labels_per_trajectory: int = 4
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_channels: int | None = None
    """Guided noise channels of the calibration sampler (None: all; DiT's own sampler guides 3)."""
    objective: str = "sequential"
    lr_codebook: float = 1e-4
    lr_bias: float = 1e-4
    lr_logits: float = 5e-2
    rmsprop_alpha: float = 0.9
    lambda_d: float = 1.0
    lambda_r: float = 1.0
    ratio_reg_rule: str = "trajectory-min"
    ratio_reg_start: int = 100
    """Patience (optimiser steps without a new minimum of the L_d moving average) before L_r is on."""
    ratio_reg_deadline: float = 1.0
    """Fraction of the steps after which L_r is on even if L_d still improves (1.0: patience only)."""
    codebook_training: str = "after-hard"
    freeze_threshold: float = 0.99
    layer_threshold: float = 0.99
    kmeans_iters: int = 100
    ratio_init: str = "authors"
    """Logit init's distance guard: 1e-5 on the nearer distances (authors) or 1e-8 on all (both-eps)."""
    seed: int = 0
    precision: str = "tf32"
    """Matmul precision: tf32 (the authors' TF32 matmuls; fp32 on a CPU), fp32, or bf16 autocast."""
    streams: int = 1
    """Teacher trajectories in flight, staggered by ``steps / streams`` sampling steps, that share the
    ``labels_per_trajectory`` labels of a step (1: the authors' loop, every step at one timestep)."""
    checkpoint_minutes: float = 5.0
    """Minimum wall time between two resumable checkpoints."""
    block_mse: bool = True
    """Every quantize job's held-out block-MSE check (one more teacher trajectory, the packed model reloaded);
    off, the job records ``block_mse`` as null."""

    def __post_init__(self) -> None:
        if self.streams < 1 or self.labels_per_trajectory % self.streams:
            raise ValueError(f"calibration key 'streams': {self.streams} must be >= 1 and divide "
                             f"labels_per_trajectory = {self.labels_per_trajectory}")
        for key, value, allowed in (("objective", self.objective, OBJECTIVES),
                                    ("ratio_reg_rule", self.ratio_reg_rule, RATIO_REG_RULES),
                                    ("precision", self.precision, PRECISIONS),
                                    ("ratio_init", self.ratio_init, RATIO_INITS)):
            if value not in allowed:
                raise ValueError(f"calibration key {key!r}: {value!r}, expected one of {list(allowed)}")

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationConfig:
        """Build from a (possibly partial) dict; an unknown key raises ValueError naming it."""
        return config_from_dict(cls, d, "calibration")

    @property
    def optimizer_steps(self) -> int:
        return self.outer_iterations * self.steps


@dataclass(frozen=True)
class Trajectories:
    """Which guided teacher trajectories to record: trajectory j draws ``labels_for(seed, j * labels, labels)``."""

    trajectories: int
    labels_per_trajectory: int
    steps: int
    cfg_scale: float
    cfg_channels: int | None
    seed: int


def held_out(cfg: CalibrationConfig) -> Trajectories:
    """One trajectory never used for calibration (seed + 1): the block-MSE check of every quantize job."""
    return Trajectories(1, cfg.labels_per_trajectory, cfg.steps, cfg.cfg_scale, cfg.cfg_channels, cfg.seed + 1)


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


def collect_calibration_inputs(model: nn.Module, spec, device: torch.device | str) -> CalibrationSet:
    """Guided FP trajectories from seeded noise and random labels, every model input recorded.

    ``spec``: any object with the fields of :class:`Trajectories`. Trajectory ``j`` draws its
    labels and noise with ``labels_for(spec.seed, j * L, L, classes)``.
    """
    model = model.to(device)
    records: list[tuple[Tensor, Tensor, Tensor]] = []
    per = spec.labels_per_trajectory
    for j in progress(range(spec.trajectories), desc="teacher trajectories", unit="traj"):
        labels, generators = labels_for(spec.seed, j * per, per, num_classes(model))
        sample_batch(model, labels, generators, spec.steps, spec.cfg_scale, spec.cfg_channels,
                     hook=lambda t, x, y: records.append((x.clone(), t.clone(), y.clone())))
    latents, timesteps, labels = (torch.cat(parts) for parts in zip(*records))
    log.info("%d teacher model inputs (%d trajectories x %d steps)", len(latents), spec.trajectories, spec.steps)
    return CalibrationSet(latents, timesteps, labels)


class _HostReads:
    depth = 0
    entries = 0


@contextlib.contextmanager
def host_reads():
    """Where the calibration loop may read numbers back to the host (history points, checkpoints)."""
    _HostReads.depth += 1
    _HostReads.entries += 1
    try:
        yield
    finally:
        _HostReads.depth -= 1


def inside_host_reads() -> bool:
    return _HostReads.depth > 0


class RatioRegSwitch:
    """Whether L_r is added at a step, decided on the device (no host read); see the module docstring."""

    def __init__(self, rule: str, patience: int, deadline: int | None, device: torch.device) -> None:
        self.rule, self.patience, self.deadline = rule, patience, deadline
        self.steps = 0
        scalar = dict(device=device)
        self.state = {
            "ema": torch.zeros((), **scalar), "best": torch.full((), math.inf, **scalar),
            "stale": torch.zeros((), dtype=torch.long, **scalar), "on": torch.tensor(patience <= 0, **scalar),
            "running_min": torch.full((), math.inf, **scalar),
            "first_on": torch.full((), -1, dtype=torch.long, **scalar), "on_steps": torch.zeros((), dtype=torch.long, **scalar),
        }

    def new_trajectory(self) -> None:
        self.state["running_min"].fill_(math.inf)

    def update(self, l_d: Tensor, l_r: Tensor) -> Tensor:
        """This step's decision (0-dim bool tensor) from its detached L_d and L_r."""
        s, step = self.state, self.steps
        self.steps += 1
        if self.rule == "patience":
            s["ema"] = l_d if step == 0 else LD_EMA_DECAY * s["ema"] + (1 - LD_EMA_DECAY) * l_d
            improved = s["ema"] < s["best"]
            s["best"] = torch.where(improved, s["ema"], s["best"])
            s["stale"] = torch.where(improved, 0, s["stale"] + 1)
            s["on"] = s["on"] | (s["stale"] >= self.patience)
            if self.deadline is not None and self.steps > self.deadline:
                s["on"] = torch.ones_like(s["on"])
            on = s["on"]
        else:
            on = l_r > s["running_min"]
            s["running_min"] = torch.where(on, s["running_min"], l_r)
        s["first_on"] = torch.where((s["first_on"] < 0) & on, step, s["first_on"])
        s["on_steps"] = s["on_steps"] + on
        return on

    def state_dict(self) -> dict:
        return {"steps": self.steps, **self.state}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.state = {key: state[key] for key in self.state}


class _Activations:
    """Forward hooks keeping the latest input of block 0 and the output of every block of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.block_input: Tensor | None = None
        self.outputs: list[Tensor | None] = [None] * len(model.transformer_blocks)
        self.handles = [model.pos_embed.register_forward_hook(self._keep_input)]
        self.handles += [block.register_forward_hook(self._keeper(i)) for i, block in enumerate(model.transformer_blocks)]

    def _keep_input(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.block_input = output

    def _keeper(self, i: int):
        def keep(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.outputs[i] = output
        return keep

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _block_index(name: str) -> int:
    """Block number of a layer named ``transformer_blocks.<i>.…``."""
    return int(name.split(".")[1])


def make_optimizer(vq: VQLayers, linears: list[VQLinear], cfg: CalibrationConfig) -> torch.optim.RMSprop:
    """RMSprop (the authors' alpha 0.9) with the groups codebooks / biases / logits; ``foreach`` (torch's
    default on CUDA, not on CPU) gives the same numbers as the per-tensor loop, faster."""
    groups = [([vq.codebook], cfg.lr_codebook), ([m.bias for m in linears if m.bias is not None], cfg.lr_bias),
              ([vq.logits], cfg.lr_logits)]
    return torch.optim.RMSprop([{"params": params, "lr": lr} for params, lr in groups if params],
                               alpha=cfg.rmsprop_alpha, foreach=True)


class Calibrator:
    """One whole-model optimiser step per teacher sampling step (:meth:`forward` is the sampler's model call)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, vq: VQLayers, layers: dict[str, VQLinear],
                 cfg: CalibrationConfig) -> None:
        self.teacher, self.student, self.vq, self.layers, self.cfg = teacher, student, vq, layers, cfg
        blocks = [_block_index(name) for name in layers]
        self.block_layers = [[i for i, b in enumerate(blocks) if b == block] for block in range(len(student.transformer_blocks))]
        vq.freeze_threshold, vq.layer_threshold = cfg.freeze_threshold, cfg.layer_threshold
        vq.codebook_training = cfg.codebook_training
        trainable = {id(p) for p in [vq.codebook, vq.logits, *(m.bias for m in layers.values() if m.bias is not None)]}
        for p in student.parameters():
            p.requires_grad_(id(p) in trainable)
        self.optimizer = make_optimizer(vq, list(layers.values()), cfg)
        device = vq.codebook.device
        deadline = None if cfg.ratio_reg_deadline >= 1.0 else int(cfg.ratio_reg_deadline * cfg.optimizer_steps)
        self.switch = RatioRegSwitch(cfg.ratio_reg_rule, cfg.ratio_reg_start, deadline, device)
        self.autocast = set_precision(cfg.precision, device.type)
        self.every = max(1, cfg.optimizer_steps // HISTORY_POINTS)
        self.history: list[list[tuple[int, float, float, float]]] = [[] for _ in student.transformer_blocks]
        self.teacher_acts = _Activations(teacher)
        self.student_acts = _Activations(student) if cfg.objective == "sequential" else None
        self.bar = None

    @property
    def step(self) -> int:
        return self.switch.steps

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The teacher's output on (x, t, y), after one optimiser step of the student on the same input."""
        with self.autocast:
            out = self.teacher(x, timestep=t, class_labels=y).sample
        with torch.enable_grad():
            with self.autocast:
                l_d_blocks = self._block_losses(x, t, y)
            self._optimise(l_d_blocks)
        return out

    def _block_losses(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        targets = self.teacher_acts.outputs
        if self.student_acts is not None:  # sequential: the student's own activations
            self.student(x, timestep=t, class_labels=y)
            outputs = self.student_acts.outputs
        else:  # blockwise: every student block fed the teacher's input of that block
            inputs = [self.teacher_acts.block_input, *targets[:-1]]
            outputs = [block(h, timestep=t, class_labels=y) for block, h in zip(self.student.transformer_blocks, inputs)]
        return torch.stack([F.mse_loss(out.float(), target.float()) for out, target in zip(outputs, targets)])

    def _optimise(self, l_d_blocks: Tensor) -> None:
        cfg = self.cfg
        l_d, l_r = l_d_blocks.mean(), self.vq.ratio_loss()
        on = self.switch.update(l_d.detach(), l_r.detach())
        loss = cfg.lambda_d * l_d + cfg.lambda_r * on.to(l_r.dtype) * l_r
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # before freezing: the gradients' memory is free for it
        self.vq.freeze_()
        step = self.step - 1
        if step % self.every == 0 or step == cfg.optimizer_steps - 1:
            self._record(step, l_d_blocks.detach())
        if self.bar is not None:
            self.bar.update(1)

    def _record(self, step: int, l_d_blocks: Tensor) -> None:
        """One history point: per block (step, L_d, L_r, frozen fraction); L_r is the mean over its soft layers."""
        with host_reads():
            l_r_layers, frozen_layers = (v.tolist() for v in self.vq.layer_stats())
            hard, rows = self.vq.hard.tolist(), self.vq.rows_per_layer.tolist()
            l_d = l_d_blocks.tolist()
        for history, mine, block_l_d in zip(self.history, self.block_layers, l_d):
            soft = [l_r_layers[i] for i in mine if not hard[i]]
            frozen = sum(frozen_layers[i] * rows[i] for i in mine) / max(sum(rows[i] for i in mine), 1)
            history.append((step, block_l_d, sum(soft) / len(soft) if soft else 0.0, frozen))
        for block, history in enumerate(self.history):
            if not (math.isfinite(history[-1][1]) and math.isfinite(history[-1][2])):
                raise NonFiniteLoss(f"calibration diverged: L_d {history[-1][1]}, L_r {history[-1][2]} at optimiser "
                                    f"step {step} in block {block}; no packed model written (lower the learning rates)")
        if self.bar is not None:
            self.bar.set_postfix(L_d=f"{sum(l_d) / len(l_d):.3g}", frozen=f"{sum(frozen_layers) / len(frozen_layers):.3f}",
                                 refresh=False)

    def state_dict(self) -> dict:
        """Everything a resumed run needs; the VQ parameters and biases go back through :func:`restore_layers`."""
        return {"vq": self.vq.state_dict(), "biases": {name: m.bias for name, m in self.layers.items() if m.bias is not None},
                "optimizer": self.optimizer.state_dict(), "switch": self.switch.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.switch.load_state_dict(state["switch"])
        self.history = state["history"]

    def close(self) -> None:
        self.teacher_acts.remove()
        if self.student_acts is not None:
            self.student_acts.remove()


def load_checkpoint(path: Path | None, fingerprint: str, device: torch.device | str) -> dict | None:
    """A resumable calibration state written for ``fingerprint``, or None (no file, another setting, unreadable)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        log.warning("%s: unreadable calibration checkpoint (%s); starting over", path, err)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("%s: checkpoint of another setting or configuration; starting over", path)
        return None
    log.info("%s: resuming calibration at optimiser step %d", path, state["switch"]["steps"])
    return state


def restore_layers(model: nn.Module, names: list[str], state: dict) -> tuple[VQLayers, dict[str, VQLinear]]:
    """The VQ container and layers of a checkpoint, swapped into ``model`` (no k-means)."""
    vq = VQLayers.from_state_dict(state["vq"])
    layers = attach(model, names, vq)
    with torch.no_grad():
        for name, bias in state["biases"].items():
            layers[name].bias.copy_(bias)
    return vq, layers


def _save_checkpoint(path: Path, calibrator: Calibrator, streams: TeacherStreams, seconds: float,
                     fingerprint: str) -> None:
    with host_reads():
        state = {"fingerprint": fingerprint, "seconds": seconds, "streams": streams.state_dict(),
                 **calibrator.state_dict()}
        with atomic_output(path, (RuntimeError,)) as partial:
            torch.save(state, partial)
    log.info("checkpoint %s: %d optimiser steps done", path, calibrator.step)


class TeacherStreams:
    """The teacher's guided trajectories the student trains on, ``cfg.streams`` of them in flight.

    Each stream runs trajectories of ``labels_per_trajectory / streams`` labels, one after the other;
    stream s starts ``s * steps / streams`` sampling steps into its first one (the teacher alone runs
    those steps), so every optimiser step sees ``streams`` timesteps. Stream s's k-th trajectory is
    global trajectory ``j = k * streams + s`` with the labels and noise of ``labels_for(seed, j * per,
    per)``: with one stream, trajectory j is the authors' outer iteration j.
    """

    def __init__(self, teacher: nn.Module, cfg: CalibrationConfig) -> None:
        self.teacher, self.cfg = teacher, cfg
        self.per = cfg.labels_per_trajectory // cfg.streams
        self.started = [0] * cfg.streams
        self.trajectories = [self._next(s) for s in range(cfg.streams)]

    def _next(self, stream: int) -> Trajectory:
        j = self.started[stream] * self.cfg.streams + stream
        self.started[stream] += 1
        labels, generators = labels_for(self.cfg.seed, j * self.per, self.per, num_classes(self.teacher))
        return Trajectory(self.teacher, labels, generators, self.cfg.steps, self.cfg.cfg_scale, self.cfg.cfg_channels)

    def stagger(self) -> None:
        """Run stream s alone for its first ``s * steps / streams`` sampling steps."""
        for s, trajectory in enumerate(self.trajectories):
            for _ in range(s * self.cfg.steps // self.cfg.streams):
                x, t, y = trajectory.inputs()
                trajectory.advance(self.teacher(x, timestep=t, class_labels=y).sample)

    def inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every stream's current model input, concatenated."""
        return tuple(torch.cat(parts) for parts in zip(*(trajectory.inputs() for trajectory in self.trajectories)))

    def advance(self, out: Tensor) -> None:
        """Advance every stream with its part of the teacher's output; a finished stream starts its next trajectory."""
        for s, part in enumerate(out.split(len(out) // self.cfg.streams)):
            self.trajectories[s].advance(part)
            if self.trajectories[s].done:
                self.trajectories[s] = self._next(s)

    def state_dict(self) -> dict:
        return {"started": list(self.started), "trajectories": [t.state_dict() for t in self.trajectories]}

    def load_state_dict(self, state: dict) -> None:
        self.started = [count - 1 for count in state["started"]]  # rebuild each stream's current trajectory
        self.trajectories = [self._next(s) for s in range(self.cfg.streams)]
        for trajectory, trajectory_state in zip(self.trajectories, state["trajectories"]):
            trajectory.load_state_dict(trajectory_state)


def calibrate(teacher: nn.Module, student: nn.Module, vq: VQLayers, layers: dict[str, VQLinear],
              cfg: CalibrationConfig, checkpoint: Path | None = None, resume: dict | None = None,
              fingerprint: str = "") -> dict:
    """Calibrate ``vq`` (and the biases of ``layers``) in ``student`` against ``teacher`` (see the module docstring).

    ``resume``: a state from :func:`load_checkpoint` (its VQ parameters and biases already in ``vq`` and
    ``layers``). Returns ``{"blocks": per block [(step, L_d, L_r, frozen fraction), ...],
    "ratio_reg_on": first step with L_r on (None: never), "ratio_reg_steps": steps with L_r on,
    "optimizer_steps", "calibration_seconds"}``.
    """
    start = time.perf_counter()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    calibrator = Calibrator(teacher, student, vq, layers, cfg)
    streams = TeacherStreams(teacher, cfg)
    previous, last_save, saved = 0.0, time.monotonic(), "no checkpoint kept: a rerun starts over"
    try:
        with torch.no_grad(), TerminationRequest() as stop:
            if resume is None:
                streams.stagger()
            else:
                calibrator.load_state_dict(resume)
                streams.load_state_dict(resume["streams"])
                previous = resume["seconds"]
            with progress(total=cfg.optimizer_steps, initial=calibrator.step, desc="calibration",
                          unit="step") as calibrator.bar:
                for step in range(calibrator.step, cfg.optimizer_steps):
                    if step % cfg.steps == 0:  # a trajectory's length: the authors reset their L_r minimum here
                        calibrator.switch.new_trajectory()
                    try:
                        streams.advance(calibrator.forward(*streams.inputs()))
                    except torch.OutOfMemoryError as err:
                        raise OSError(f"out of GPU memory at calibration step {step} ({saved} kept): a smaller "
                                      "batch would be another calibration; rerun on a GPU with more memory (it resumes)"
                                      " or lower calibration key labels_per_trajectory (starts over)") from err
                    due = step + 1 < cfg.optimizer_steps and time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes
                    if checkpoint is not None and (due or stop.requested):
                        _save_checkpoint(checkpoint, calibrator, streams, previous + time.perf_counter() - start,
                                         fingerprint)
                        last_save = time.monotonic()
                        saved = f"checkpoint {checkpoint} at optimiser step {step + 1} kept: a rerun resumes there"
                    stop.check(saved)
    finally:
        calibrator.close()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    with host_reads():
        first_on, on_steps = int(calibrator.switch.state["first_on"]), int(calibrator.switch.state["on_steps"])
    seconds = previous + time.perf_counter() - start
    log.info("calibration: %d whole-model steps, %.1f s, L_r first on at step %s (%d steps on)",
             calibrator.step, seconds, first_on if first_on >= 0 else None, on_steps)
    return {"blocks": calibrator.history, "ratio_reg_on": first_on if first_on >= 0 else None,
            "ratio_reg_steps": on_steps, "optimizer_steps": calibrator.step, "calibration_seconds": seconds}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run_block(block: nn.Module, hidden: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
    return block(hidden, timestep=timesteps, class_labels=labels)


@torch.no_grad()
def _block_forward(block: nn.Module, hidden: Tensor, calib: CalibrationSet) -> Tensor:
    """A block's output on every input of ``calib``, in batches."""
    return torch.cat([
        _run_block(block, h, t, y)
        for h, t, y in zip(hidden.split(FORWARD_BATCH), calib.timesteps.split(FORWARD_BATCH),
                           calib.labels.split(FORWARD_BATCH))
    ])


@torch.no_grad()
def block_mse(fp_model: nn.Module, q_model: nn.Module, calib: CalibrationSet, max_samples: int = 512) -> float:
    """Mean over blocks of MSE(FP block(X_b), quantized block(X_b)), X_b the FP (teacher) block inputs.

    Uses at most ``max_samples`` evenly spaced calibration entries.
    """
    device = _device(q_model)
    calib = calib.subset(max_samples)
    calib = CalibrationSet(calib.latents.to(device), calib.timesteps.to(device), calib.labels.to(device))
    hidden = torch.cat([fp_model.pos_embed(x) for x in calib.latents.split(FORWARD_BATCH)])
    errors = []
    for fp_block, q_block in zip(fp_model.transformer_blocks, q_model.transformer_blocks):
        target = _block_forward(fp_block, hidden, calib)
        errors.append(F.mse_loss(_block_forward(q_block, hidden, calib), target).item())
        hidden = target
    return sum(errors) / len(errors)
