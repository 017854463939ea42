"""Vector-quantized linear layers with calibratable candidate assignments (VQ4DiT).

Every sub-vector of a layer's weight keeps a candidate set of its ``n`` nearest codewords and
``n`` learnable logits; its ratios are ``softmax(logits)`` and it is rebuilt as the
ratio-weighted average of its candidate codewords.

Freezing: a frozen sub-vector keeps its chosen codeword in candidate column 0 (``freeze_``
swaps the argmax candidate, and its logit, into column 0) and its ratios are the constant
one-hot ``[1, 0, ...]``, selected with ``torch.where``. The autograd graph therefore gives its
logits an exactly zero gradient, and because its ratios never read the logits again, even an
optimiser with momentum that keeps moving them cannot un-freeze it. Once more than
``layer_threshold`` of a layer's sub-vectors are frozen, every sub-vector is frozen on its argmax
and the layer turns hard for good: weight = codebook[candidates[:, 0]], only codebook and bias
still train.
"""

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq4dit.codebook import clamp_k, kmeans, nearest, subvectors

log = logging.getLogger(__name__)

EPS = 1e-8
"""Added to candidate distances before the logit init's log-ratio (guards distance 0)."""


def init_logits(distances: Tensor) -> Tensor:
    """Logits from sorted candidate distances (N, n): ``logit_j = log(dist_n / dist_j)``.

    For n = 2 the nearest candidate gets log(dist_2 / dist_1) and the other 0, so nearer
    codewords start with larger ratios; the farthest candidate always starts at 0.
    """
    distances = distances.float() + EPS
    return torch.log(distances[:, -1:] / distances)


def _swap_to_front(choice: Tensor, n: int) -> Tensor:
    """Per-row column permutation (N, n) swapping column ``choice`` with column 0."""
    perm = torch.arange(n, device=choice.device).expand(choice.shape[0], n).clone()
    perm[:, 0] = choice
    return perm.scatter_(1, choice.unsqueeze(1), 0)


class VQLinear(nn.Module):
    """A linear layer whose weight is rebuilt from a codebook and (soft or hard) assignments."""

    layer_threshold: float = 0.99
    """Frozen fraction above which the whole layer switches to hard assignments."""

    def __init__(
        self,
        codebook: Tensor,
        candidates: Tensor,
        logits: Tensor,
        bias: Tensor | None,
        in_features: int,
        out_features: int,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.codebook = nn.Parameter(codebook.float())
        self.logits = nn.Parameter(logits.float())
        self.register_parameter("bias", nn.Parameter(bias.detach().clone()) if bias is not None else None)
        self.register_buffer("candidates", candidates.long())
        self.register_buffer("frozen", torch.zeros(candidates.shape[0], dtype=torch.bool, device=candidates.device))
        self.register_buffer("hard", torch.tensor(False, device=candidates.device))
        self._is_hard = False
        self.register_load_state_dict_post_hook(VQLinear._sync_hard)
        if candidates.shape[1] == 1:
            self._harden_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        k: int,
        d: int,
        n_candidates: int = 2,
        kmeans_iters: int = 100,
        seed: int = 0,
    ) -> "VQLinear":
        """Quantize ``linear``: k-means codebook (k clamped), n nearest codewords, logit init.

        ``n_candidates = 1`` gives the hard nearest-codeword layer ("vq-kmeans" baseline).
        """
        x = subvectors(linear.weight.detach(), d)
        k_eff = clamp_k(k, x.shape[0])
        codebook, nearest_one = kmeans(x, k_eff, iters=kmeans_iters, seed=seed)
        n = min(n_candidates, k_eff)
        if n == 1:  # k-means' own assignments are the nearest codewords; one candidate's logit is 0
            candidates, distances = nearest_one.unsqueeze(1), torch.ones(x.shape[0], 1, device=x.device)
        else:
            candidates, distances = nearest(x, codebook, n)
        log.debug("VQLinear %s: k=%d d=%d n=%d", tuple(linear.weight.shape), k_eff, d, n)
        return cls(codebook, candidates, init_logits(distances), linear.bias, linear.in_features, linear.out_features)

    @staticmethod
    def _sync_hard(module: "VQLinear", _incompatible_keys: object) -> None:
        module._is_hard = bool(module.hard.item())
        module.logits.requires_grad_(not module._is_hard)

    @property
    def is_hard(self) -> bool:
        """Whether the layer uses hard (argmax) assignments for good."""
        return self._is_hard

    @property
    def k(self) -> int:
        return self.codebook.shape[0]

    @property
    def d(self) -> int:
        return self.codebook.shape[1]

    @property
    def n_candidates(self) -> int:
        return self.candidates.shape[1]

    def _front_one_hot(self) -> Tensor:
        one_hot = torch.zeros(self.n_candidates, dtype=self.logits.dtype, device=self.logits.device)
        one_hot[0] = 1.0
        return one_hot

    def ratios(self) -> Tensor:
        """Ratios (N, n): softmax of the logits, one-hot on column 0 for frozen sub-vectors."""
        if self._is_hard:
            return self._front_one_hot().expand(self.candidates.shape[0], -1)
        return torch.where(self.frozen.unsqueeze(1), self._front_one_hot(), self.logits.softmax(dim=1))

    def choice(self) -> Tensor:
        """Chosen candidate column per sub-vector (N,): 0 if frozen, else the argmax ratio."""
        return torch.where(self.frozen, 0, self.logits.detach().argmax(dim=1))

    def assignments(self) -> Tensor:
        """Hard codeword index per sub-vector (N,)."""
        if self._is_hard:
            return self.candidates[:, 0]
        return self.candidates.gather(1, self.choice().unsqueeze(1)).squeeze(1)

    def weight(self) -> Tensor:
        """Reconstructed weight (out x in): ratio-weighted candidate codewords, or hard codewords."""
        if self._is_hard:
            vectors = self.codebook[self.candidates[:, 0]]
        else:
            vectors = (self.ratios().unsqueeze(2) * self.codebook[self.candidates]).sum(dim=1)
        return vectors.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``F.linear`` with the reconstructed weight (cast to the input's dtype)."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight().to(x.dtype), bias)

    def frozen_fraction(self) -> float:
        """Fraction of sub-vectors frozen to one codeword."""
        return float(self.frozen.float().mean().item())

    @torch.no_grad()
    def freeze_(self, threshold: float = 0.99) -> None:
        """Freeze sub-vectors whose max ratio exceeds ``threshold``; harden the layer past ``layer_threshold``."""
        if self._is_hard:
            return
        top, choice = self.logits.softmax(dim=1).max(dim=1)
        rows = ~self.frozen & (top > threshold)
        if rows.any():  # most steps freeze nothing: skip the permutation (this runs after every step)
            self._freeze_rows_(rows, choice)
        if self.frozen_fraction() > self.layer_threshold:
            self._harden_()

    def _freeze_rows_(self, rows: Tensor, choice: Tensor) -> None:
        """Move the chosen candidate (and its logit) of the ``rows`` (N,) bool to column 0, mark them frozen."""
        perm = _swap_to_front(torch.where(rows, choice, 0), self.n_candidates)
        self.candidates.copy_(self.candidates.gather(1, perm))
        self.logits.copy_(self.logits.gather(1, perm))
        self.frozen |= rows

    @torch.no_grad()
    def _harden_(self) -> None:
        """Freeze every remaining sub-vector on its argmax and switch to hard assignments for good."""
        self._freeze_rows_(~self.frozen, self.logits.argmax(dim=1))
        self.hard.fill_(True)
        self._is_hard = True
        self.logits.requires_grad_(False)
        self.logits.grad = None

    def ratio_regularizer(self) -> Tensor:
        """n * mean(r * (1 - r)) over the not-yet-frozen sub-vectors (0 if there are none)."""
        if self._is_hard:
            return self.logits.new_zeros(())
        r = self.logits.softmax(dim=1)
        active = (~self.frozen).to(r.dtype)
        per_row = (r * (1.0 - r)).mean(dim=1) * active
        return per_row.sum() / active.sum().clamp(min=1.0) * self.n_candidates

    def packed(self) -> dict[str, Tensor]:
        """Hard layer for storage: assignments (smallest integer type), fp16 codebook, fp32 bias, shape."""
        packed = {
            "assignments": self.assignments().to(index_dtype(self.k)),
            "codebook": self.codebook.detach().half(),
            "shape": torch.tensor([self.out_features, self.in_features], dtype=torch.int64),
        }
        if self.bias is not None:
            packed["bias"] = self.bias.detach().clone()
        return {name: t.cpu().contiguous() for name, t in packed.items()}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, d={self.d}, "
            f"n_candidates={self.n_candidates}, hard={self._is_hard}, bias={self.bias is not None}"
        )


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


def quantize_model_linears(model: nn.Module, names: list[str], **vq_kwargs: object) -> dict[str, VQLinear]:
    """Replace each named nn.Linear of ``model`` in place by ``VQLinear.from_linear(linear, **vq_kwargs)``."""
    layers = {}
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, not nn.Linear")
        layers[name] = VQLinear.from_linear(linear, **vq_kwargs)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layers[name])
        log.info("quantized %s: k=%d d=%d", name, layers[name].k, layers[name].d)
    return layers
