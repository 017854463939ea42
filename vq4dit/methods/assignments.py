"""Vector-quantized linear layers with calibratable candidate assignments (VQ4DiT).

Every sub-vector of a layer's weight keeps a candidate set of its ``n`` nearest codewords and
``n`` learnable logits; its ratios are ``softmax(logits)`` and it is rebuilt as the
ratio-weighted average of its candidate codewords.

All VQ layers of a model live in one :class:`VQLayers` container, as flat tensors: the codebooks of
every layer stacked into one ``(K, d)`` parameter (candidates hold global codeword indices), every
layer's logits in one ``(N, n)`` parameter. A calibration step therefore rebuilds every weight, its
ratio regulariser and its freezing with a handful of operators for the whole model instead of a
handful per layer (each operator is at least one kernel launch on a GPU), and nothing in it reads a
number back to the host. The model's ``nn.Linear`` modules are replaced by thin :class:`VQLinear`
modules that take their weight from the container.

Tensors are candidate-major: logits and candidates are ``(n, N)``, so the softmax over a sub-vector's
candidates and every per-candidate operation runs over contiguous rows (a softmax over a last
dimension of size 2 is ten times slower on a CPU).

Freezing (the authors' way): a sub-vector whose largest ratio exceeds ``freeze_threshold`` gets the
logits ``10000 * one_hot(argmax)``. Its softmax is then exactly one-hot in float32, so its ratio
gradient is exactly zero, RMSprop (no momentum) leaves it in place, and its ratio regulariser is
exactly zero: nothing in a step needs to mask frozen sub-vectors. Candidates never change. Once more
than ``layer_threshold`` of a layer's sub-vectors are frozen, every sub-vector of it freezes on its
argmax and the layer is hard for good.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq4dit.methods.codebook import kmeans, nearest, segment_sums, subvectors
from vq4dit.size import clamp_k

log = logging.getLogger(__name__)

EPS = 1e-8
"""``ratio_init="both-eps"``: added to every candidate distance before the logit init's log-ratio."""
AUTHORS_EPS = 1e-5
"""``ratio_init="authors"``: added to the nearer candidates' distances only (dengjuncan/VQ4DiT ``CompressedLinear.py``)."""
RATIO_INITS = ("authors", "both-eps")
"""The logit init's guard against distance 0: the authors' code's, or 1e-8 on every distance."""
CODEBOOK_TRAINING = ("always", "after-hard")
"""When a layer's codebook trains: from the start (the paper's text) or once the layer is hard (the authors' code)."""


def init_logits(distances: Tensor, ratio_init: str = "authors") -> Tensor:
    """Logits from sorted candidate distances (N, n): ``logit_j = log(dist_n / dist_j)``, the farthest 0.

    For n = 2 the nearest candidate gets log(dist_2 / dist_1) and the other 0, so nearer codewords
    start with larger ratios. ``ratio_init`` (:data:`RATIO_INITS`): ``"authors"``
    ``log(dist_n / (dist_j + 1e-5))`` for j < n; ``"both-eps"`` ``log((dist_n + 1e-8) / (dist_j + 1e-8))``.
    """
    if ratio_init not in RATIO_INITS:
        raise ValueError(f"ratio_init {ratio_init!r}: expected one of {RATIO_INITS}")
    if ratio_init == "both-eps":
        distances = distances.float() + EPS
        return torch.log(distances[:, -1:] / distances)
    distances = distances.float()
    logits = torch.log(distances[:, -1:] / (distances + AUTHORS_EPS))
    logits[:, -1] = 0.0
    return logits


FROZEN_LOGIT = 1e4
"""Logit of a frozen sub-vector's chosen candidate (the others get 0): softmax is exactly one-hot (the authors' value)."""


class _SoftWeight(torch.autograd.Function):
    """Every layer's sub-vectors ``sum_j r_j c[cand_j]`` (N_l, d) from ratios and candidates (n, N); a
    deterministic backward.

    Written by hand because autograd's backward of ``codebook[candidates]`` is a scatter-add that CUDA
    does with atomic adds, or, in deterministic mode, by sorting the N·n indices at every step. Here the
    codebook gradient is ``index_add_`` in index order on a CPU (deterministic there, and the fastest
    form) and, on a GPU, a float64 segment sum in the candidates' codeword order, sorted once. The
    gathered candidate codewords (n x the weights' size) are not kept for the backward but gathered again
    there. On a CPU the backward goes layer by layer, on each layer's weight gradient as autograd hands it
    over: no (N, d) copy of the gradients and no (N, d) gather (at DiT-XL/2 size 2.7 GB each, the
    difference between fitting a 24 GiB machine and not); on a GPU, one flat pass (fewest kernels).
    """

    @staticmethod
    def forward(ctx, ratios: Tensor, codebook: Tensor, candidates: Tensor, order: Tensor | None,
                bounds: Tensor, rows: tuple[int, ...]) -> tuple[Tensor, ...]:
        out = F.embedding(candidates[0], codebook).mul_(ratios[0].unsqueeze(1))
        for column, ratio in zip(candidates[1:], ratios[1:]):
            out.addcmul_(F.embedding(column, codebook), ratio.unsqueeze(1))
        ctx.save_for_backward(ratios, codebook, candidates, bounds)
        ctx.order, ctx.rows = order, rows  # fixed buffers and sizes of the container, not autograd inputs
        return out.split(rows)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        ratios, codebook, candidates, bounds = ctx.saved_tensors
        if ctx.order is not None:
            grad = torch.cat(grads)
            grad_ratios = _ratio_gradient(grad, codebook, candidates)
            grad_codebook = codebook_gradient(grad, ratios, candidates, ctx.order, bounds, codebook.shape)
            return grad_ratios, grad_codebook, None, None, None, None
        grad_ratios = torch.empty_like(ratios)
        grad_codebook = torch.zeros_like(codebook)
        for grad, start, end in zip(grads, itertools.accumulate(ctx.rows, initial=0), itertools.accumulate(ctx.rows)):
            grad = grad.contiguous()
            grad_ratios[:, start:end] = _ratio_gradient(grad, codebook, candidates[:, start:end])
            _add_codebook_gradient(grad_codebook, grad, ratios[:, start:end], candidates[:, start:end])
        return grad_ratios, grad_codebook, None, None, None, None


def _ratio_gradient(grad: Tensor, codebook: Tensor, candidates: Tensor) -> Tensor:
    """d loss / d r_j = <c[cand_j], grad> per sub-vector (n, rows), one candidate's gather at a time."""
    return torch.stack([torch.einsum("nd,nd->n", F.embedding(column, codebook), grad) for column in candidates])


INDEX_ADD_ROWS = 1 << 22
"""Sub-vectors per ``index_add_`` on a CPU: bounds its temporaries (4M rows: 64 MB at d = 4)."""


def _add_codebook_gradient(total: Tensor, grad: Tensor, ratios: Tensor, candidates: Tensor) -> None:
    """``total[c] += ratios[j, i] * grad[i]`` for every candidate ``c = candidates[j, i]``: ``index_add_`` in
    index order, :data:`INDEX_ADD_ROWS` sub-vectors at a time (deterministic on a CPU, not on a GPU)."""
    for column, ratio in zip(candidates, ratios):
        for start in range(0, grad.shape[0], INDEX_ADD_ROWS):
            part = slice(start, start + INDEX_ADD_ROWS)  # int32 indices take an index_add_ path 8x slower
            total.index_add_(0, column[part].long(), grad[part] * ratio[part].unsqueeze(1))


def codebook_gradient(grad: Tensor, ratios: Tensor, candidates: Tensor, order: Tensor | None, bounds: Tensor,
                      shape: torch.Size, sorted_sum: bool | None = None) -> Tensor:
    """``sum over (j, i) with candidates[j, i] = c`` of ``ratios[j, i] * grad[i]`` for every codeword c.

    ``sorted_sum`` (default: on GPUs) sums in the fixed codeword ``order`` of the flattened (n, N)
    candidates with :func:`segment_sums`, one coordinate at a time (peak memory of a few (n·N,)
    vectors); otherwise :func:`_add_codebook_gradient`.
    """
    if sorted_sum if sorted_sum is not None else grad.device.type != "cpu":
        if order is None:
            raise ValueError("the sorted codebook gradient needs the candidates' codeword order")
        rows = order % grad.shape[0]  # flat index j * N + i -> sub-vector i
        ratio = ratios.reshape(-1)[order]
        return torch.stack([segment_sums(ratio * column[rows], bounds) for column in grad.t()], dim=1).to(grad.dtype)
    total = grad.new_zeros(shape)
    _add_codebook_gradient(total, grad, ratios, candidates)
    return total


class VQLayers(nn.Module):
    """The VQ layers of one model in flat tensors (see the module docstring).

    Parameters: ``codebook`` (K, d), every layer's codebook stacked; ``logits`` (n, N). Buffers:
    ``candidates`` (n, N) global codeword indices; ``frozen`` (N,); ``hard`` (L,) per layer;
    ``shapes`` (L, 2) and ``codebook_sizes`` (L,) describe the layers, so a state dict rebuilds the
    container (:meth:`from_state_dict`).
    """

    freeze_threshold: float = 0.99
    """Largest ratio above which a sub-vector freezes."""
    layer_threshold: float = 0.99
    """Frozen fraction above which a whole layer switches to hard assignments."""

    def __init__(self, shapes: Tensor, codebook_sizes: Tensor, codebook: Tensor, candidates: Tensor,
                 logits: Tensor, frozen: Tensor | None = None, hard: Tensor | None = None,
                 codebook_training: str = "always") -> None:
        super().__init__()
        if codebook_training not in CODEBOOK_TRAINING:
            raise ValueError(f"codebook_training {codebook_training!r}: expected one of {CODEBOOK_TRAINING}")
        device = codebook.device
        d = codebook.shape[1]
        rows = [int(out) * int(inp) // d for out, inp in shapes.tolist()]
        self.layer_shapes = [tuple(int(v) for v in shape) for shape in shapes.tolist()]
        self.layer_rows = rows
        self.row_offsets = list(itertools.accumulate(rows, initial=0))
        self.codeword_offsets = list(itertools.accumulate(codebook_sizes.tolist(), initial=0))
        self.codebook_training = codebook_training
        self.codebook = nn.Parameter(codebook.float())
        self.logits = nn.Parameter(logits.float())  # no copy when already float32
        n_rows = candidates.shape[1]
        self.register_buffer("shapes", shapes.long().to(device))
        self.register_buffer("codebook_sizes", codebook_sizes.long().to(device))
        self.register_buffer("candidates", candidates.int())  # int32: n·N < 2^31, half the memory of int64
        self.register_buffer("frozen", frozen if frozen is not None else torch.zeros(n_rows, dtype=torch.bool, device=device))
        self.register_buffer("hard", hard if hard is not None else torch.zeros(len(rows), dtype=torch.bool, device=device))
        # derived, fixed for good: the codeword bounds of the candidates (their order: :meth:`codeword_order`)
        self._order: Tensor | None = None
        counts = torch.bincount(self.candidates.flatten(), minlength=codebook.shape[0])
        self.register_buffer("codeword_bounds", F.pad(counts.cumsum(0), (1, 0)), persistent=False)
        # per-layer sums and broadcasts in chunks of `chunk` rows, a divisor of every layer's row count:
        # one contiguous reduction or broadcast instead of a scan over all rows
        self.chunk = math.gcd(*rows)
        chunks = torch.tensor([r // self.chunk for r in rows], device=device)
        self.register_buffer("chunk_bounds", F.pad(chunks.cumsum(0), (1, 0)), persistent=False)
        self.register_buffer("chunk_layer", torch.arange(len(rows), device=device).repeat_interleave(chunks),
                             persistent=False)
        self.register_buffer("rows_per_layer", torch.tensor(rows, device=device), persistent=False)
        self.register_buffer("columns", torch.arange(self.n_candidates, device=device).unsqueeze(1), persistent=False)
        self._cache: tuple | None = None
        if self.n_candidates == 1:
            self.harden_()

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], k: int, d: int, n_candidates: int = 2, kmeans_iters: int = 100,
                     seed: int = 0, codebook_training: str = "always", ratio_init: str = "authors") -> VQLayers:
        """Quantize each linear: k-means codebook (k clamped), n nearest codewords, logit init.

        ``n_candidates = 1`` gives hard nearest-codeword layers (the "vq-kmeans" baseline).
        """
        subvecs = [subvectors(linear.weight.detach(), d) for linear in linears]
        sizes = [clamp_k(k, x.shape[0]) for x in subvecs]
        n_sizes = {min(n_candidates, k_eff) for k_eff in sizes}
        if len(n_sizes) > 1:
            raise ValueError(f"layers would get different candidate counts {sorted(n_sizes)}: k too small for "
                             f"n_candidates={n_candidates} in some layer")
        n = n_sizes.pop()
        device = linears[0].weight.device
        rows = [x.shape[0] for x in subvecs]
        # filled in place, layer by layer: per-layer lists joined by torch.cat would double the peak and,
        # being many allocations below the allocator's mmap threshold, stay in the process' heap after
        candidates = torch.empty(n, sum(rows), dtype=torch.int32, device=device)
        logits = torch.empty(n, sum(rows), device=device)
        codebooks = []
        offset = 0
        for x, k_eff, start, end in zip(subvecs, sizes, itertools.accumulate(rows, initial=0),
                                        itertools.accumulate(rows)):
            codebook, nearest_one = kmeans(x, k_eff, iters=kmeans_iters, seed=seed)
            if n == 1:  # k-means' own assignments are the nearest codewords; one candidate's logit is 0
                cand, distances = nearest_one.unsqueeze(1), torch.ones(x.shape[0], 1, device=device)
            else:
                cand, distances = nearest(x, codebook, n)
            candidates[:, start:end] = cand.t() + offset
            logits[:, start:end] = init_logits(distances, ratio_init).t()
            codebooks.append(codebook)
            offset += k_eff
        shapes = torch.tensor([tuple(linear.weight.shape) for linear in linears], device=device)
        return cls(shapes, torch.tensor(sizes, device=device), torch.cat(codebooks), candidates, logits,
                   codebook_training=codebook_training)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], codebook_training: str = "always") -> VQLayers:
        """The container a state dict (``state_dict()``, e.g. of a calibration checkpoint) describes."""
        keys = ("shapes", "codebook_sizes", "codebook", "candidates", "logits", "frozen", "hard")
        return cls(*(state[key] for key in keys), codebook_training=codebook_training)

    @property
    def n_candidates(self) -> int:
        return self.candidates.shape[0]

    @property
    def d(self) -> int:
        return self.codebook.shape[1]

    def __len__(self) -> int:
        return len(self.layer_shapes)

    def _layer_sums(self, per_row: Tensor) -> Tensor:
        """Per-layer sums (L,) of a per-sub-vector tensor (N,): float64, or int64 for integers and bools."""
        dtype = torch.float64 if per_row.is_floating_point() else torch.int64
        return segment_sums(per_row.view(-1, self.chunk).sum(dim=1, dtype=dtype), self.chunk_bounds)

    def _by_row(self, per_layer: Tensor) -> Tensor:
        """A per-layer tensor (L,) broadcast to sub-vectors viewed as (N / chunk, chunk)."""
        return per_layer[self.chunk_layer].unsqueeze(1)

    def _effective_codebook(self) -> Tensor:
        """The codebook, with no gradient into layers that are not hard yet under ``after-hard`` training."""
        if self.codebook_training == "always":
            return self.codebook
        trains = self.hard.repeat_interleave(self.codebook_sizes, output_size=self.codebook.shape[0])  # K rows: small
        return torch.where(trains.unsqueeze(1), self.codebook, self.codebook.detach())

    def codeword_order(self) -> Tensor:
        """Flat (n·N) candidate positions sorted by codeword (int32, stable): the GPU codebook gradient's
        summation order. Made at first use, so a CPU run never holds it (n·N int32: 1.3 GB at DiT-XL/2 size)."""
        if self._order is None or self._order.device != self.candidates.device:
            self._order = torch.argsort(self.candidates.flatten(), stable=True).int()
        return self._order

    def _rebuild(self) -> tuple[Tensor, list[Tensor]]:
        ratios = self.ratios()
        order = self.codeword_order() if self.candidates.device.type != "cpu" else None
        parts = _SoftWeight.apply(ratios, self._effective_codebook(), self.candidates, order, self.codeword_bounds,
                                  tuple(self.layer_rows))
        weights = [part.view(out, inp) for part, (out, inp) in zip(parts, self.layer_shapes)]
        return ratios, weights

    def _state(self) -> tuple:
        # in-place updates (optimiser steps, freezing, loading) bump a tensor's version counter
        tensors = (self.codebook, self.logits, self.frozen, self.hard)
        return (torch.is_grad_enabled(), *(t._version for t in tensors), *(t.data_ptr() for t in tensors))

    def _current(self) -> tuple[Tensor, list[Tensor]]:
        """(ratios, every layer's weight), rebuilt once per parameter state."""
        state = self._state()
        if self._cache is None or self._cache[0] != state:
            self._cache = None  # the stale weights go before the new ones are built (2.7 GB at DiT-XL/2 size)
            self._cache = (state, *self._rebuild())
        return self._cache[1], self._cache[2]

    def weight(self, index: int) -> Tensor:
        """Reconstructed weight (out x in) of layer ``index``: ratio-weighted candidate codewords."""
        return self._current()[1][index]

    def ratios(self) -> Tensor:
        """Ratios (n, N): softmax of the logits over the candidates (exactly one-hot for frozen sub-vectors)."""
        return self.logits.softmax(dim=0)

    def _layer_regularizers(self, ratios: Tensor) -> tuple[Tensor, Tensor]:
        """Per layer: (``n * mean(r (1 - r))`` over its active sub-vectors, 0 when hard; active sub-vectors).

        Frozen sub-vectors have exactly one-hot ratios, so they add exactly 0 to the sums.
        """
        active = self.rows_per_layer - self._layer_sums(self.frozen)
        sums = self._layer_sums((ratios - ratios * ratios).sum(dim=0))
        return sums / active.clamp(min=1) * (~self.hard), active

    def ratio_loss(self) -> Tensor:
        """L_r: mean over the layers that are not hard of ``n * mean(r (1 - r))`` over their active sub-vectors."""
        per_layer, _ = self._layer_regularizers(self._current()[0])
        return (per_layer.sum() / (~self.hard).sum().clamp(min=1)).to(self.logits.dtype)

    @torch.no_grad()
    def layer_stats(self) -> tuple[Tensor, Tensor]:
        """Per layer: L_r (``n * mean(r (1 - r))`` over active sub-vectors, 0 when hard) and frozen fraction."""
        l_r, active = self._layer_regularizers(self.ratios())
        return l_r.float(), 1.0 - active / self.rows_per_layer

    @torch.no_grad()
    def freeze_(self, threshold: float | None = None) -> None:
        """Freeze sub-vectors whose largest ratio exceeds ``threshold`` (default ``freeze_threshold``);
        harden every layer with more than ``layer_threshold`` of its sub-vectors frozen."""
        self._cache = None  # stale after any optimiser step; dropping it here lowers the step's peak memory
        threshold = self.freeze_threshold if threshold is None else threshold
        top, argmax = self.logits.softmax(dim=0).max(dim=0)
        over = top > threshold
        del top
        frozen_after = self._layer_sums(self.frozen | over)
        harden = self.hard | (frozen_after > self.layer_threshold * self.rows_per_layer)
        newly = ~self.frozen & (over.view(-1, self.chunk) | self._by_row(harden)).view(-1)
        # logits of newly frozen sub-vectors := FROZEN_LOGIT * one_hot(argmax), in place (bool masks, no (n, N)
        # float temporaries): x * 0 + 1e4 or x * 1 + 0 are exact for finite logits
        self.logits.mul_(~newly)
        self.logits.add_((self.columns == argmax) & newly, alpha=FROZEN_LOGIT)
        self.frozen.logical_or_(newly)
        self.hard.copy_(harden)

    @torch.no_grad()
    def harden_(self) -> None:
        """Every sub-vector takes its largest-ratio candidate, every layer hard: what :meth:`packed` stores."""
        self.freeze_(threshold=-1.0)

    def _layer_rows(self, index: int) -> slice:
        return slice(self.row_offsets[index], self.row_offsets[index + 1])

    def assignments(self, index: int) -> Tensor:
        """Codeword index per sub-vector of layer ``index`` (N_l,), local to its codebook: the largest ratio's."""
        rows = self._layer_rows(index)
        choice = self.logits.detach()[:, rows].argmax(dim=0)
        chosen = self.candidates[:, rows].gather(0, choice.unsqueeze(0)).squeeze(0)
        return chosen - self.codeword_offsets[index]

    def layer_codebook(self, index: int) -> Tensor:
        return self.codebook.detach()[self.codeword_offsets[index] : self.codeword_offsets[index + 1]]

    def packed(self, index: int) -> dict[str, Tensor]:
        """Layer ``index`` for storage, hard: assignments (smallest integer type), fp16 codebook, shape."""
        codebook = self.layer_codebook(index)
        packed = {
            "assignments": self.assignments(index).to(index_dtype(codebook.shape[0])),
            "codebook": codebook.half(),
            "shape": torch.tensor(self.layer_shapes[index], dtype=torch.int64),
        }
        return {name: t.cpu().contiguous() for name, t in packed.items()}


class VQLinear(nn.Module):
    """A linear layer whose weight is layer ``index`` of a :class:`VQLayers` container; owns only its bias."""

    def __init__(self, vq: VQLayers, index: int, bias: Tensor | None) -> None:
        super().__init__()
        object.__setattr__(self, "vq", vq)  # a reference, not a submodule: the container is saved on its own
        self.index = index
        self.out_features, self.in_features = vq.layer_shapes[index]
        self.register_parameter("bias", nn.Parameter(bias.detach().clone()) if bias is not None else None)

    def weight(self) -> Tensor:
        return self.vq.weight(self.index)

    def forward(self, x: Tensor) -> Tensor:
        """``F.linear`` with the reconstructed weight (cast to the input's dtype)."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight().to(x.dtype), bias)

    def packed(self) -> dict[str, Tensor]:
        """The hard layer for storage: :meth:`VQLayers.packed` plus the fp32 bias."""
        packed = self.vq.packed(self.index)
        if self.bias is not None:
            packed["bias"] = self.bias.detach().cpu().clone()
        return packed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layer={self.index}, " \
               f"bias={self.bias is not None}"


def index_dtype(k: int) -> torch.dtype:
    """Smallest integer dtype holding codeword indices 0..k-1: uint8, int16 or int32."""
    if k <= 256:
        return torch.uint8
    if k <= 1 << 15:
        return torch.int16
    return torch.int32


def dequantize(packed: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(weight fp32 (out x in), bias or None) from ``VQLinear.packed()``: hard decoding."""
    out_features, in_features = (int(v) for v in packed["shape"])
    weight = packed["codebook"].float()[packed["assignments"].long()]
    return weight.reshape(out_features, in_features), packed.get("bias")


def _linears(model: nn.Module, names: list[str]) -> list[nn.Linear]:
    linears = [model.get_submodule(name) for name in names]
    for name, linear in zip(names, linears):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, not nn.Linear")
    return linears


def attach(model: nn.Module, names: list[str], vq: VQLayers) -> dict[str, VQLinear]:
    """Replace each named ``nn.Linear`` of ``model`` in place by layer i of ``vq`` (keeping its bias)."""
    layers = {}
    for index, (name, linear) in enumerate(zip(names, _linears(model, names))):
        if tuple(linear.weight.shape) != vq.layer_shapes[index]:
            raise ValueError(f"{name}: weight {tuple(linear.weight.shape)} but VQ layer {index} is {vq.layer_shapes[index]}")
        layers[name] = VQLinear(vq, index, linear.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layers[name])
    return layers


def quantize_model_linears(model: nn.Module, names: list[str], **vq_kwargs: object) -> tuple[VQLayers, dict[str, VQLinear]]:
    """Quantize the named ``nn.Linear`` modules of ``model`` (:meth:`VQLayers.from_linears`) and swap them in place."""
    vq = VQLayers.from_linears(_linears(model, names), **vq_kwargs)
    log.info("quantized %d layers: %d codewords of d=%d, %d sub-vectors x %d candidates", len(names),
             vq.codebook.shape[0], vq.d, vq.candidates.shape[1], vq.n_candidates)
    return vq, attach(model, names, vq)
