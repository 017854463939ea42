"""GPTVQ (van Baalen et al., 2024): Hessian-aware vector quantization of one linear layer.

The strongest vector baseline of issue 18: the same codebook shape as VQ4DiT (one codebook of ``k``
codewords of dimension ``d`` per layer, sub-vectors of ``d`` consecutive inputs of one output row,
``W.reshape(-1, d)`` as in :func:`vq4dit.methods.codebook.subvectors`), but the codebook and the assignments
are chosen for the layer's output error ``tr((W - Q) H (W - Q)^T)`` with ``H = X^T X`` of its
calibration inputs, instead of the weights' Euclidean error. The output is the packed "vq" layer of
:meth:`vq4dit.methods.assignments.VQLayers.packed` (assignments, fp16 codebook, shape; no bias), so
:func:`vq4dit.methods.assignments.dequantize` and ``vq4dit.packed``'s "vq" format apply unchanged.

Two variants (``variant``, config ``baselines.gptvq_variant``). ``"published"`` (default) is the
official code (Qualcomm-AI-research/gptvq ``vq_quant.py`` and ``gptq.py`` ``fasterquant``, as its
scripts run it: ``--kmeans-init-method mahalanobis --hessian-weighted-lookups --include-m-step``):
k-means from :func:`mahalanobis_init` with coordinate weights ``U_jj`` and empty codewords set to 0,
assignments weighted by ``1 / U_jj``, each group's error ``(W_F - Q_F) / diag(U_FF)`` fed to the
later columns only, and 25 Adam steps (lr 1e-3, restarted at lr / 10 when the loss rises) on the
codebook (:func:`adam_codebook_update`). ``"exact"`` is ours, the steps below; on random layers it
reaches a lower output error (benchmarks/baselines_fidelity.py, docs/departures.md).

Steps of the ``"exact"`` variant and the choices made here:

1. Hessian: dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weight column is set to 0 (as
   GPTQ); then ``H + percdamp * mean(diag H) * I``; ``U`` is the upper Cholesky factor of ``H^-1``
   (``H^-1 = U^T U``), computed in float64 (from the Cholesky factor of the reversed H) and used in float32.
2. Codebook init: weighted k-means on all the layer's sub-vectors. Coordinate ``t`` of a sub-vector
   in column group ``g`` weighs ``1 / U_jj^2`` (``j = g d + t``, the GPTQ saliency of column j), and
   the distance is ``sum_t w_t (x_t - c_t)^2``. Seeding is VQ4DiT's own k-means++
   (:func:`vq4dit.methods.codebook.seed_codebook`: Euclidean D^2 sampling on a seeded sample of
   the points, deterministic for ``seed``); ``kmeans_iters`` weighted Lloyd iterations follow (a
   coordinate of a centroid is the weighted mean of its points' coordinates; an empty cluster moves
   to the point farthest from its codeword, as in codebook.py). One codebook per layer, fixed before
   the column loop (GPTVQ proper fits a codebook per block of columns; VQ4DiT's bit budget has one
   per layer, so that is what is compared).
3. Assignment with error feedback, left to right in groups of ``d`` columns ``F = [j, j+d)``: every
   row's d-vector takes the codeword minimising the diagonally weighted distance (weights
   ``1 / U_jj^2`` of the group's columns), then the group's error is carried to the later columns
   ``R`` by the multi-column OBS update ``W_R -= E U_FR`` with ``E = (W_F - Q_F) U_FF^-1``
   (the same as GPTQ's one-column-at-a-time update over the group's columns). Lazy batches of
   ``blocksize`` columns (a multiple of d): inside a block the update is applied at once, the rest of
   the matrix gets the block's accumulated ``E`` in one product at the block's end (same result up
   to rounding).
4. Codebook update with the assignments fixed: ``codebook_update_iters`` iterations of linear
   conjugate gradient on the quadratic ``tr((W - C[A]) H (W - C[A])^T)`` in the codewords ``C``
   (H damped as in step 1, W the original weight), which converges to its least-squares optimum in
   at most ``k d`` iterations; one ``(out x in) @ (in x in)`` product per iteration. The scatter of a
   gradient onto the codewords is a sorted segment sum (deterministic on any device). If rounding
   left the objective higher than before, the codebook before the update is kept, so the update
   never increases it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vq4dit.methods.assignments import index_dtype
from vq4dit.methods.codebook import CHUNK_ELEMENTS, seed_codebook, segment_sums
from vq4dit.methods.gptq import one_thread

#: the column loop, k-means and codebook update of GPTVQ's published code, or this module's exact ones
VARIANTS = ("published", "exact")


def _check(weight: Tensor, hessian: Tensor, k: int, d: int, blocksize: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if d < 1 or in_features % d != 0:
        raise ValueError(f"in_features of weight with shape {tuple(weight.shape)} is not divisible by d={d}")
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}: "
                         f"expected ({in_features}, {in_features})")
    n_subvectors = out_features * in_features // d
    if not 1 <= k <= n_subvectors:
        raise ValueError(f"k={k} must lie in [1, {n_subvectors}]: the number of sub-vectors of d={d} in a weight "
                         f"of shape {tuple(weight.shape)}")
    if blocksize < d or blocksize % d != 0:
        raise ValueError(f"blocksize={blocksize} must be a positive multiple of d={d}")


def prepare_hessian(weight: Tensor, hessian: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """(weight with dead columns zeroed, damped Hessian, upper Cholesky factor U of its inverse), float32.

    Dead inputs (``H_jj = 0``) get ``H_jj = 1``; the damping adds ``percdamp * mean(diag H)`` to the
    diagonal. The factorisation runs in float64.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * torch.diagonal(h).mean())
    # with P the order reversal, P H P = L L^T gives H^-1 = U^T U for the upper U = P L^-1 P: one Cholesky
    # and one triangular inverse instead of Cholesky, inverse and Cholesky again (2.6x faster at 4608 inputs)
    lower = torch.linalg.cholesky(h.flip(0, 1))
    identity = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)
    return w, h.float(), upper.float()


def _weighted_assign(x: Tensor, weights: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Points ``x`` (G, rows, d) in G groups of equal coordinate weights ``weights`` (G, d): per point, the
    codeword minimising ``sum_t w_t (x_t - c_t)^2`` and that distance, both (G, rows).

    The distance minus ``sum_t w_t x_t^2`` (which no ranking needs) is ``sum_t w_t c_t^2 - 2 x . (w c)``:
    one batched product per chunk of groups, at most ``CHUNK_ELEMENTS`` distances at a time.
    """
    groups, rows, _ = x.shape
    scaled = (-2.0 * weights).unsqueeze(2) * codebook.t()  # (G, d, k)
    offsets = (weights @ codebook.pow(2).t()).unsqueeze(1)  # (G, 1, k)
    indices = torch.empty(groups, rows, dtype=torch.long, device=x.device)
    distances = torch.empty(groups, rows, dtype=x.dtype, device=x.device)
    step = max(1, CHUNK_ELEMENTS // (rows * codebook.shape[0]))
    for start in range(0, groups, step):
        part = slice(start, start + step)
        shifted = torch.baddbmm(offsets[part], x[part], scaled[part])
        torch.min(shifted, dim=2, out=(distances[part], indices[part]))
    distances += (weights.unsqueeze(1) * x.pow(2)).sum(2)
    return indices, distances.clamp_(min=0.0)


def _bounds(assignments: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(stable order of the points by codeword, cluster boundaries (k + 1,)) for :func:`segment_sums`."""
    order = torch.argsort(assignments, stable=True)
    counts = torch.bincount(assignments, minlength=k)
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _weighted_sums(points: Tensor, point_weights: Tensor, assignments: Tensor, k: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Per codeword: summed coordinate weights, summed weighted points (both (k, d)) and the cluster bounds."""
    order, bounds = _bounds(assignments, k)
    mass = segment_sums(point_weights[order], bounds)
    return mass, segment_sums((point_weights * points)[order], bounds), bounds


def mahalanobis_init(points: Tensor, k: int) -> Tensor:
    """GPTVQ's ``mahalanobis_init``: the points (N, d) at k evenly spaced ranks of their Mahalanobis distance
    to the mean (distance rank ``round(linspace(0, N - 1, k))``)."""
    centered = points - points.mean(0)
    distances = ((centered @ torch.linalg.inv(centered.t() @ centered)) * centered).sum(1)
    ranks = torch.round(torch.linspace(0, points.shape[0] - 1, k, device=points.device)).long()
    return points[torch.argsort(distances)[ranks]].clone()


def published_kmeans(x: Tensor, weights: Tensor, k: int, iters: int = 10) -> Tensor:
    """GPTVQ's ``kmeans_vq`` from :func:`mahalanobis_init`: codebook (k, d) after ``iters`` rounds of weighted
    assignment (``weights`` (G, d) per coordinate, as :func:`weighted_kmeans`) and weighted means; an empty
    cluster's codeword becomes 0 (``kmeans_m_step_3``: its sums over no point, divided by 1e-10)."""
    rows, groups, d = x.shape
    points = x.reshape(-1, d)
    by_group = x.transpose(0, 1).contiguous()
    point_weights = weights.expand(rows, groups, d).reshape(-1, d)
    codebook = mahalanobis_init(points, k)
    for _ in range(iters):
        assignments = _weighted_assign(by_group, weights, codebook)[0].t().reshape(-1)
        mass, sums, _ = _weighted_sums(points, point_weights, assignments, k)
        codebook = (sums / mass.clamp(min=1e-10)).to(points.dtype)
    return codebook


def weighted_kmeans(x: Tensor, weights: Tensor, k: int, iters: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """k-means of the sub-vectors ``x`` (rows, G, d) when every coordinate of group g weighs ``weights[g]`` (G, d).

    Seeded by :func:`vq4dit.methods.codebook.seed_codebook` (k-means++ on ``x.reshape(-1, d)``, ``seed``);
    then up to ``iters`` weighted Lloyd iterations, stopping once no assignment changes. Returns
    (codebook (k, d) float32, assignments (rows * G,) int64 in ``x.reshape(-1, d)``'s order), the
    assignments being the weighted-nearest codewords of the codebook.
    """
    rows, groups, d = x.shape
    points = x.reshape(-1, d)
    by_group = x.transpose(0, 1).contiguous()  # (G, rows, d): one weighting per batch entry

    def assign(codebook: Tensor) -> tuple[Tensor, Tensor]:
        indices, distances = _weighted_assign(by_group, weights, codebook)
        return indices.t().reshape(-1), distances.t().reshape(-1)

    codebook = seed_codebook(points, k, seed)
    assignments, distances = assign(codebook)
    point_weights = weights.expand(rows, groups, d).reshape(-1, d)
    for _ in range(iters):
        mass, sums, bounds = _weighted_sums(points, point_weights, assignments, k)
        updated = torch.where(mass > 0, sums / mass.clamp(min=torch.finfo(torch.float64).tiny), codebook.double())
        updated = updated.to(points.dtype)
        empty = torch.nonzero(bounds[1:] == bounds[:-1]).flatten()
        if empty.numel() > 0:
            updated[empty] = points[torch.argsort(distances, descending=True, stable=True)[: empty.numel()]]
        codebook = updated
        new_assignments, distances = assign(codebook)
        changed = bool((new_assignments != assignments).any())
        assignments = new_assignments
        if not changed:
            break
    return codebook, assignments


def assign_with_feedback(weight: Tensor, upper: Tensor, codebook: Tensor, blocksize: int = 128,
                         variant: str = "published") -> Tensor:
    """Assignments (out, in / d) int64 of ``weight`` to a fixed ``codebook`` (k, d), with GPTQ-style error feedback.

    ``upper`` is the upper Cholesky factor of the damped inverse Hessian (:func:`prepare_hessian`).
    Column groups F of d, left to right; the group's error E updates the later columns R by
    ``- E U_FR``, lazily per block of ``blocksize`` columns. Runs in the dtype of ``weight``.
    ``variant="exact"``: codeword minimising ``sum_t (x_t - c_t)^2 / U_tt^2``, ``E = (W_F - Q_F) U_FF^-1``.
    ``variant="published"`` (GPTVQ's ``gptq.py`` ``fasterquant`` with ``--hessian-weighted-lookups``):
    weights ``1 / U_tt``, ``E = (W_F - Q_F) / diag(U_FF)``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"GPTVQ variant {variant!r}: expected one of {VARIANTS}")
    d = codebook.shape[1]
    out_features, in_features = weight.shape
    if blocksize < d or blocksize % d != 0:
        raise ValueError(f"blocksize={blocksize} must be a positive multiple of d={d}")
    w = weight.clone()
    codebook = codebook.to(w.dtype)
    upper = upper.to(w.dtype)
    saliency = torch.diagonal(upper).pow(-2) if variant == "exact" else torch.diagonal(upper).reciprocal()
    assignments = torch.empty(out_features, in_features // d, dtype=torch.long, device=w.device)
    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        block = w[:, i1:i2].clone()
        errors = torch.empty_like(block)
        u_block = upper[i1:i2, i1:i2]
        for g in range(0, i2 - i1, d):
            group = slice(g, g + d)
            index = _weighted_assign(block[:, group].unsqueeze(0), saliency[i1 + g : i1 + g + d].unsqueeze(0),
                                     codebook)[0][0]
            assignments[:, (i1 + g) // d] = index
            u_group = u_block[group, group]
            if variant == "exact":
                error = torch.linalg.solve_triangular(u_group, block[:, group] - codebook[index], upper=True, left=False)
            else:
                error = (block[:, group] - codebook[index]) / torch.diagonal(u_group)
            errors[:, group] = error
            block[:, g + d :] -= error @ u_block[group, g + d :]
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return assignments


def weighted_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``, summed in float64."""
    delta = weight.float() - quantized.float()
    return float((delta @ hessian.float() * delta).sum(dtype=torch.float64))


def update_codebook(weight: Tensor, hessian: Tensor, codebook: Tensor, assignments: Tensor, iters: int = 25) -> Tensor:
    """The codebook (k, d) after ``iters`` conjugate-gradient steps on ``tr((W - C[A]) H (W - C[A])^T)``.

    ``assignments`` are the flat sub-vector indices (N,) of ``weight.reshape(-1, d)``; they stay
    fixed. Codewords no sub-vector uses are left as they are. Never returns a codebook with a higher
    objective than the given one (computed in float32, summed in float64).
    """
    k, d = codebook.shape
    w = weight.float()
    h = hessian.float()
    flat = assignments.long().reshape(-1)
    order, bounds = _bounds(flat, k)

    def spread(c: Tensor) -> Tensor:  # S(C): the weight the codewords stand for
        return c[flat].reshape(w.shape)

    def gather(m: Tensor) -> Tensor:  # S^T(M): sums over each codeword's sub-vectors
        return segment_sums(m.reshape(-1, d)[order], bounds).float()

    start = codebook.float().clone()
    delta = w - spread(start)
    delta_h = delta @ h
    before = float((delta_h * delta).sum(dtype=torch.float64))
    current = start.clone()
    residual = gather(delta_h)
    direction = residual.clone()
    rr = float(residual.pow(2).sum(dtype=torch.float64))
    for _ in range(iters):
        if rr == 0.0:
            break
        spread_dir = spread(direction)
        spread_dir_h = spread_dir @ h
        curvature = float((spread_dir_h * spread_dir).sum(dtype=torch.float64))
        if curvature <= 0.0:
            break
        alpha = rr / curvature
        current += alpha * direction
        residual -= alpha * gather(spread_dir_h)
        rr_next = float(residual.pow(2).sum(dtype=torch.float64))
        direction = residual + (rr_next / rr) * direction
        rr = rr_next
    if iters > 0 and weighted_error(w, spread(current), h) > before:
        return start
    return current


def adam_codebook_update(weight: Tensor, hessian: Tensor, codebook: Tensor, assignments: Tensor, steps: int = 25,
                         lr: float = 1e-3) -> Tensor:
    """GPTVQ's ``lut_m_step``: ``steps`` Adam steps on ``tr((W - C[A]) H (W - C[A])^T)`` (the raw Hessian and
    weight); a step whose loss exceeds the starting one (or is NaN) restarts from the start with lr / 10."""
    with torch.inference_mode(False), torch.enable_grad():  # the quantize stage runs in inference mode
        return _adam_steps(weight.float().clone(), hessian.float().clone(), codebook.float().clone(),
                           assignments.long().reshape(-1).clone(), steps, lr)


def _adam_steps(w: Tensor, h: Tensor, start: Tensor, flat: Tensor, steps: int, lr: float) -> Tensor:
    def loss(c: Tensor) -> Tensor:
        delta = w - c[flat].reshape(w.shape)
        return ((delta @ h) * delta).sum()

    with torch.no_grad():
        before = loss(start)
    while True:
        current = start.clone().requires_grad_()
        optimizer = torch.optim.Adam([current], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            value = loss(current)
            if value > before or torch.isnan(value):
                break
            value.backward()
            optimizer.step()
        else:
            return current.detach()
        lr *= 0.1


def gptvq_quantize(weight: Tensor, hessian: Tensor, k: int, d: int, *, percdamp: float = 0.01,
                   blocksize: int = 128, kmeans_iters: int = 10, codebook_update_iters: int = 25,
                   seed: int = 0, variant: str = "published") -> dict[str, Tensor]:
    """GPTVQ of one layer (see the module docstring): its packed "vq" tensors.

    ``weight`` (out, in) and ``hessian`` (in, in) (``X^T X`` of the layer's inputs, any positive
    scale). Returns ``{"assignments": (out * in / d,) uint8/int16/int32 (the smallest for k),
    "codebook": (k, d) float16, "shape": (2,) int64}``, the keys and dtypes of
    :meth:`vq4dit.methods.assignments.VQLayers.packed` (no bias). ``blocksize`` must be a multiple of d
    (a block wider than ``in`` is the whole layer). Raises ``ValueError`` when ``in`` is
    not a multiple of d or k exceeds the number of sub-vectors. Deterministic for ``seed``.
    """
    _check(weight, hessian, k, d, blocksize)
    if variant not in VARIANTS:
        raise ValueError(f"GPTVQ variant {variant!r}: expected one of {VARIANTS}")
    out_features, in_features = weight.shape
    w, h, upper = prepare_hessian(weight, hessian, percdamp)
    if variant == "exact":
        saliency = torch.diagonal(upper).pow(-2).reshape(-1, d)  # (in / d, d): one row per column group
        codebook, _ = weighted_kmeans(w.view(out_features, -1, d), saliency, k, iters=kmeans_iters, seed=seed)
    else:
        codebook = published_kmeans(w.view(out_features, -1, d), torch.diagonal(upper).reshape(-1, d), k, kmeans_iters)
    blocksize = min(blocksize, in_features)
    with one_thread():  # the column loop's operations are small (as GPTQ's)
        assignments = assign_with_feedback(w, upper, codebook, blocksize, variant).reshape(-1)
    if variant == "exact":
        codebook = update_codebook(w, h, codebook, assignments, codebook_update_iters)
    else:
        codebook = adam_codebook_update(weight, hessian, codebook, assignments, codebook_update_iters)
    packed = {
        "assignments": assignments.to(index_dtype(k)),
        "codebook": codebook.half(),
        "shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    return {name: t.cpu().contiguous() for name, t in packed.items()}
