"""The paper's comparison methods run by us, weight-only: GPTQ, Q-DiT's weight quantizer and GPTVQ.

Layer Hessians H = 2/N sum x x^T (N = rows of X: one row per token for the attention and MLP
linears, one per model input for adaLN's ``norm1.linear``) from forward hooks on the FP teacher while
it samples the zero-data calibration inputs: ``trajectories`` seeded guided trajectories of ``steps``
steps with ``labels_per_trajectory`` labels and their null-label copies, all sampling steps (the
source of VQ4DiT's calibration, :func:`vq4dit.methods.calibration.collect_calibration_inputs`, with its seed,
guidance scale and guided channels; the held-out block-MSE trajectory uses seed + 1 and is never
seen here). The paper preset's 8 x 4 x 2 x 50 = 3,200 model inputs give 819,200 token rows per
attention/MLP linear of DiT-XL/2 at 256 px (GPTQ's reference: 128 x 2048 = 262,144) spread over
all 50 timesteps, and 3,200 adaLN rows (about 1,650 distinct conditionings, more than its 1,152
inputs).

All Hessians are accumulated in one pass (float32, the reference's running mean), q, k and v sharing
their input's: at DiT-XL/2 size 28 x (4 x 1152^2 + 4608^2) x 4 B = 2.9 GB. Each is freed once its
layers are quantized. Every layer sees the FP model's inputs (the reference GPTQ instead feeds each
block the outputs of the already-quantized blocks before it).

Q-DiT's group-size search (Chen et al., 2024) is evolutionary and scored by FID on generated images,
too costly per setting. Here: per layer, GPTQ at every candidate group size; choose per layer the
group size minimising the summed Hessian-weighted output error sum_l tr(dW_l H_l dW_l^T) under a
budget of scale/zero bits equal to ``qdit_budget_group_size`` everywhere (Lagrangian relaxation,
bisection on the multiplier). A ``group_size`` in the setting skips the search (the scripts' fixed
configuration: 128).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vq4dit import size
from vq4dit.methods.calibration import CalibrationConfig, Trajectories, collect_calibration_inputs
from vq4dit.methods.gptq import GROUP_GRIDS, gptq_quantize, output_error
from vq4dit.methods.gptvq import VARIANTS, gptvq_quantize
from vq4dit.io import config_from_dict, progress
from vq4dit.packed import Packed

log = logging.getLogger(__name__)

#: layers whose input is another layer's (self-attention: k and v read q's input)
SHARED_INPUT = {".attn1.to_k": ".attn1.to_q", ".attn1.to_v": ".attn1.to_q"}


@dataclass
class BaselineConfig:
    """Config key ``baselines``: the Hessians' calibration inputs and the GPTQ / Q-DiT / GPTVQ options."""

    trajectories: int = 8
    labels_per_trajectory: int = 4
    steps: int = 50
    percdamp: float = 0.01
    """Damping, a fraction of the mean Hessian diagonal (GPTQ's reference: 0.01)."""
    blocksize: int = 128
    """Columns per lazy batch (GPTQ's reference: 128)."""
    act_order: bool = False
    qdit_group_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 0])
    """Q-DiT's candidate group sizes (0: one group per output row)."""
    qdit_budget_group_size: int = 128
    kmeans_iters: int = 100
    """GPTVQ's k-means iterations (the VQ4DiT rows' value)."""
    codebook_update_iters: int = 25
    """GPTVQ's codebook-update iterations."""
    gptq_group_grid: str = "published"
    """GPTQ / Q-DiT group grids: from the lazy batch's start copy of W (published) or the error-updated columns."""
    gptvq_variant: str = "published"
    """GPTVQ: its published code's k-means, column loop and Adam codebook update, or the exact ones (vq4dit.methods.gptvq)."""

    def __post_init__(self) -> None:
        for key in ("trajectories", "labels_per_trajectory", "steps", "blocksize"):
            if getattr(self, key) < 1:
                raise ValueError(f"baselines key {key!r}: {getattr(self, key)}, expected >= 1")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"baselines key 'percdamp': {self.percdamp}, expected 0 <= percdamp < 1")
        for key, allowed in (("gptq_group_grid", GROUP_GRIDS), ("gptvq_variant", VARIANTS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"baselines key {key!r}: {getattr(self, key)!r}, expected one of {list(allowed)}")
        if not self.qdit_group_sizes or min(self.qdit_group_sizes) < 0:
            raise ValueError(f"baselines key 'qdit_group_sizes': {self.qdit_group_sizes}, expected group sizes >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> BaselineConfig:
        """Build from a (possibly partial) dict; an unknown key raises ValueError naming it."""
        return config_from_dict(cls, d, "baselines")


def input_owner(name: str) -> str:
    """The layer whose Hessian ``name`` uses (itself unless it shares its input)."""
    for suffix, owner in SHARED_INPUT.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + owner
    return name


class HessianHooks:
    """Forward hooks accumulating H = 2/N sum x x^T of the input of every named (owner) layer."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.hessians: dict[str, Tensor] = {}
        self.rows: Counter = Counter()
        owners = dict.fromkeys(input_owner(n) for n in names)
        self.handles = [model.get_submodule(o).register_forward_hook(self._hook(o)) for o in owners]

    def _hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            n, m = self.rows[name], x.shape[0]
            h = self.hessians.setdefault(name, x.new_zeros(x.shape[1], x.shape[1]))
            h.mul_(n / (n + m)).addmm_(x.T, x, alpha=2 / (n + m))
            self.rows[name] = n + m
        return accumulate

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def layer_hessians(teacher: nn.Module, names: list[str], calibration: CalibrationConfig, cfg: BaselineConfig,
                   device) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Hessians of the named layers' inputs (by owner) and their row counts, from the teacher's trajectories."""
    spec = Trajectories(cfg.trajectories, cfg.labels_per_trajectory, cfg.steps, calibration.cfg_scale,
                        calibration.cfg_channels, calibration.seed)
    hooks = HessianHooks(teacher, names)
    try:
        with torch.no_grad():
            collect_calibration_inputs(teacher, spec, device)
    finally:
        hooks.remove()
    log.info("%d layer Hessians from %d rows (attention/MLP linears) and %d (adaLN)", len(hooks.hessians),
             max(hooks.rows.values()), min(hooks.rows.values()))
    return hooks.hessians, dict(hooks.rows)


def each_layer(model: nn.Module, names: list[str], hessians: dict[str, Tensor]):
    """(name, weight, Hessian) of every layer; a Hessian is freed after its last layer."""
    users = Counter(input_owner(n) for n in names)
    for name in progress(names, desc="layers", unit="layer"):
        owner = input_owner(name)
        yield name, model.get_submodule(name).weight, hessians[owner]
        users[owner] -= 1
        if not users[owner]:
            del hessians[owner]


def quantize_gptq(model, names, setting, calibration, device, teacher, baselines: BaselineConfig
                  ) -> tuple[Packed, dict]:
    """GPTQ of every block linear at the setting's bits and ``group_size`` (default: one grid per row)."""
    bits, group_size = int(setting["bits"]), int(setting.get("group_size", 0))
    hessians, rows = layer_hessians(teacher, names, calibration, baselines, device)
    packed = {name: gptq_quantize(w, h, bits, group_size=group_size, act_order=baselines.act_order,
                                  percdamp=baselines.percdamp, blocksize=baselines.blocksize,
                                  group_grid=baselines.gptq_group_grid)
              for name, w, h in each_layer(model, names, hessians)}
    shapes = size.linear_shapes(model, names)
    overhead = [size.grouped_overhead_bits(s, group_size, baselines.act_order) for s in shapes]
    return packed, {"size": size.scalar_size(shapes, bits, overhead), "hessian_rows": rows}


def effective_group_size(group_size: int, columns: int) -> int:
    """0 when the group covers the whole row."""
    return group_size if 0 < group_size < columns else 0


def choose_group_sizes(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, int]], budget: int
                       ) -> dict[str, int]:
    """Per layer the candidate minimising sum of errors s.t. sum of costs <= budget (Lagrangian, bisection on log lambda)."""

    def pick(lam: float) -> dict[str, int]:
        return {n: min(errors[n], key=lambda g: errors[n][g] + lam * costs[n][g]) for n in errors}

    def cost(choice: dict[str, int]) -> int:
        return sum(costs[n][g] for n, g in choice.items())

    lo, hi = -60.0, 60.0  # log10 lambda: at 1e60 every layer takes its cheapest candidate
    if cost(pick(10**hi)) > budget:
        raise ValueError(f"Q-DiT search: even the cheapest group sizes exceed the budget of {budget} bits")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(pick(10**mid)) <= budget else (mid, hi)
    return pick(10**hi)


def quantize_qdit(model, names, setting, calibration, device, teacher, baselines: BaselineConfig
                  ) -> tuple[Packed, dict]:
    """Q-DiT's weight quantizer: group-wise GPTQ with a per-layer group size (fixed by the setting or searched)."""
    if "group_size" in setting:
        return quantize_gptq(model, names, setting, calibration, device, teacher, baselines)
    bits, act_order = int(setting["bits"]), baselines.act_order
    hessians, rows = layer_hessians(teacher, names, calibration, baselines, device)
    candidates: dict[str, dict[int, dict]] = {}
    errors: dict[str, dict[int, float]] = {}
    for name, w, h in each_layer(model, names, hessians):
        sizes = dict.fromkeys(effective_group_size(g, w.shape[1]) for g in baselines.qdit_group_sizes)
        candidates[name] = {g: gptq_quantize(w, h, bits, group_size=g, act_order=act_order, percdamp=baselines.percdamp,
                                             blocksize=baselines.blocksize, group_grid=baselines.gptq_group_grid)
                            for g in sizes}
        errors[name] = {g: output_error(w, p, h) for g, p in candidates[name].items()}
    shapes = dict(zip(names, size.linear_shapes(model, names)))
    costs = {n: {g: size.grouped_overhead_bits(shapes[n], g, act_order) for g in errors[n]} for n in names}
    budget = sum(size.grouped_overhead_bits(s, baselines.qdit_budget_group_size, act_order) for s in shapes.values())
    chosen = choose_group_sizes(errors, costs, budget)
    packed = {n: candidates[n][g] for n, g in chosen.items()}
    overhead = [costs[n][chosen[n]] for n in names]
    info = {"size": size.scalar_size(list(shapes.values()), bits, overhead), "hessian_rows": rows,
            "group_sizes": chosen, "output_error": sum(errors[n][g] for n, g in chosen.items()),
            "output_error_budget_group_size": sum(
                errors[n][effective_group_size(baselines.qdit_budget_group_size, shapes[n][1])] for n in names)}
    return packed, info


def quantize_gptvq(model, names, setting, calibration, device, teacher, baselines: BaselineConfig
                   ) -> tuple[Packed, dict]:
    """GPTVQ (van Baalen et al., 2024) of every block linear at the setting's k and d (``vq4dit.methods.gptvq``)."""
    k, d = int(setting["k"]), int(setting["d"])
    hessians, rows = layer_hessians(teacher, names, calibration, baselines, device)
    packed = {name: gptvq_quantize(w.detach().float(), h, k, d, percdamp=baselines.percdamp,
                                   blocksize=baselines.blocksize, kmeans_iters=baselines.kmeans_iters,
                                   codebook_update_iters=baselines.codebook_update_iters, seed=calibration.seed,
                                   variant=baselines.gptvq_variant)
              for name, w, h in each_layer(model, names, hessians)}
    return packed, {"size": size.vq_size(size.linear_shapes(model, names), k, d), "hessian_rows": rows}
