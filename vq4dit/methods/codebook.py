"""Codebooks: sub-vector layout, k clamping, k-means and nearest-codeword search.

A weight ``W`` (out x in) is cut into sub-vectors of ``d`` contiguous input weights per output
row, ``W.reshape(-1, d)``, giving ``N = out * in / d`` rows. One layer's codebook holds ``k``
codewords of dimension ``d``, initialised by k-means (Euclidean) on those sub-vectors.

k-means here:

- init: k-means++ (D^2 sampling). The random numbers come from a CPU ``torch.Generator`` seeded
  with ``seed``, and each draw is turned into an index by inverse-CDF search on the device, so the
  init is deterministic for a seed and (up to float rounding of the cumulative sum) the same on
  CPU and GPU.
- seeding sample: k-means++ is k sequential passes over the points (16 s for one 1152x1152 DiT-XL/2
  layer on 2 CPU cores, ~50 min per VQ model), so with more than ``SEED_POINTS_PER_CODEWORD * k``
  points it seeds on that many, drawn without replacement from the same generator (faiss trains
  its k-means on at most 256 points per centroid; here only the seeding is sampled, every Lloyd
  iteration uses all points). Layers at or below the limit (every smoke layer) are seeded as before.
- Lloyd iterations on whatever device ``x`` lives on; the point-to-codeword distance matrix is
  built in row chunks of at most ``CHUNK_ELEMENTS`` entries, so memory stays bounded.
- centroid update: points sorted by cluster and summed by :func:`segment_sums` (a float64 cumulative
  sum), which avoids the non-deterministic atomic adds of ``index_add_`` on GPU (CUDA's cumsum is
  deterministic under ``torch.use_deterministic_algorithms``, which the quantize stage turns on).
- empty clusters: re-seeded, in cluster order, to the points farthest from their current
  codeword (stable sort, so ties resolve by point index).
- early stop when an iteration leaves every assignment unchanged.
"""

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SEED_POINTS_PER_CODEWORD = 64
"""k-means++ seeds on at most this many points per codeword (a seeded random sample of the rows)."""
CHUNK_ELEMENTS = 1 << 21
"""Upper bound on the entries of one chunk of the (codewords x points) distance matrix (8 MB: stays in cache)."""


def subvectors(weight: Tensor, d: int) -> Tensor:
    """Split every output row of ``weight`` (out x in) into contiguous chunks of ``d`` inputs: (N, d)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out x in), got shape {tuple(weight.shape)}")
    if d < 1 or weight.shape[1] % d != 0:
        raise ValueError(
            f"in_features of weight with shape {tuple(weight.shape)} is not divisible by d={d}"
        )
    return weight.reshape(-1, d)


def _chunk_rows(k: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(k, 1))


def _shifted_sq_distances(x: Tensor, codebook: Tensor, codebook_sq: Tensor) -> Tensor:
    """||c||^2 - 2 x.c (rows x k): squared distances minus ||x||^2, which no row ranking needs.

    Codewords along the contiguous dim 1: the nearest-codeword reductions run 2.2x faster on an idle
    2-core CPU than over dim 0 of the (k x rows) layout (k = 256, d = 4, 2M points: 0.55 s vs 1.23 s,
    ``benchmarks/kmeans_bench.py``), with bitwise the same distances.
    """
    return torch.addmm(codebook_sq, x, codebook.t(), alpha=-2.0)


def _assign(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest codeword per row: (indices (N,) int64, squared distances (N,)), chunked."""
    codebook_sq = codebook.pow(2).sum(1)
    indices = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    sq = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = _chunk_rows(codebook.shape[0])
    for start in range(0, x.shape[0], step):
        shifted = _shifted_sq_distances(x[start : start + step], codebook, codebook_sq)
        torch.min(shifted, dim=1, out=(sq[start : start + step], indices[start : start + step]))
    sq += x.pow(2).sum(1)
    return indices, sq.clamp_(min=0.0)


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ init: first centre uniform, then each next centre drawn with probability ~ D^2."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator).item())
    centres = [first]
    x_sq = x.pow(2).sum(1)
    min_sq = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        u = float(torch.rand(1, generator=generator, dtype=torch.float64).item())
        cdf = min_sq.double().cumsum(0)
        total = float(cdf[-1].item())
        if total > 0.0:
            target = torch.tensor([u * total], dtype=torch.float64, device=x.device)
            index = int(torch.searchsorted(cdf, target, right=True).clamp_(max=n - 1).item())
        else:  # every point already coincides with a centre: any point will do
            index = min(int(u * n), n - 1)
        centres.append(index)
        centre = x[index]
        sq = torch.addmv(x_sq + centre.pow(2).sum(), x, centre, alpha=-2.0).clamp_(min=0.0)
        torch.minimum(min_sq, sq, out=min_sq)
    return x[centres].clone()


def segment_sums(values: Tensor, bounds: Tensor) -> Tensor:
    """Sums of the row ranges ``[bounds[i], bounds[i+1])`` of ``values`` (N,) or (N, c), deterministic on any device.

    A cumulative sum (float64 for floating values, int64 for integers and bools) read at the range
    ends and differenced: no atomic adds, no sorting. Columns are scanned as separate 1-D tensors:
    a scan along dim 0 of (N, c) runs c sequential threads on CUDA, 1,000x slower
    (benchmarks/kmeans_bench.py); on the CPU both add in the same order. Returns float64 or int64,
    (L,) or (L, c).
    """
    dtype = torch.float64 if values.is_floating_point() else torch.int64
    columns = values.unsqueeze(1) if values.dim() == 1 else values
    starts, ends = bounds[:-1], bounds[1:]
    sums = []
    for column in columns.unbind(1):
        running = column.cumsum(0, dtype=dtype)
        before = torch.where(starts > 0, running[(starts - 1).clamp(min=0)], 0)
        sums.append(torch.where(ends > 0, running[(ends - 1).clamp(min=0)], 0) - before)
    return sums[0] if values.dim() == 1 else torch.stack(sums, dim=1)


def _update(x: Tensor, assignments: Tensor, sq: Tensor, k: int) -> tuple[Tensor, int]:
    """Centroids of the k current clusters (and how many were empty); empty ones move to the farthest points."""
    order = torch.argsort(assignments, stable=True)
    counts = torch.bincount(assignments, minlength=k)
    sums = segment_sums(x[order], torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    new = (sums / counts.clamp(min=1).unsqueeze(1)).to(x.dtype)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() > 0:
        farthest = torch.argsort(sq, descending=True, stable=True)[: empty.numel()]
        new[empty] = x[farthest]
    return new, int(empty.numel())


def seed_codebook(x: Tensor, k: int, seed: int = 0) -> Tensor:
    """The k-means++ codebook (k, d) float32 of the rows of ``x`` (N, d), seeded on a sample of at most
    ``SEED_POINTS_PER_CODEWORD * k`` rows; deterministic for ``seed``."""
    if x.dim() != 2:
        raise ValueError(f"expected points of shape (N, d), got {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k={k} must lie in [1, N={x.shape[0]}]")
    x = x.detach().float().contiguous()
    generator = torch.Generator().manual_seed(seed)
    limit = SEED_POINTS_PER_CODEWORD * k
    seeding = x if x.shape[0] <= limit else x[torch.randperm(x.shape[0], generator=generator)[:limit].to(x.device)]
    return _kmeans_plus_plus(seeding, k, generator)


def kmeans(x: Tensor, k: int, iters: int = 100, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Euclidean k-means of the rows of ``x`` (N, d) on x's device.

    Returns (codebook (k, d) float32, assignments (N,) int64), the assignments being the
    nearest codeword of the returned codebook. ``iters`` bounds the Lloyd iterations
    (0 gives the k-means++ init, :func:`seed_codebook`); the loop stops early once no assignment changes.
    """
    codebook = seed_codebook(x, k, seed)
    x = x.detach().float().contiguous()
    assignments, sq = _assign(x, codebook)
    for it in range(iters):
        codebook, n_empty = _update(x, assignments, sq, k)
        new_assignments, sq = _assign(x, codebook)
        changed = int((new_assignments != assignments).sum().item())
        assignments = new_assignments
        log.debug("k-means iter %d: %d changed, %d empty re-seeded", it, changed, n_empty)
        if changed == 0:
            break
    return codebook, assignments


def nearest(x: Tensor, codebook: Tensor, n: int = 1) -> tuple[Tensor, Tensor]:
    """The ``n`` nearest codewords of every row of ``x``: (indices (N, n) int64, distances (N, n)).

    Sorted by increasing Euclidean distance. Candidates are found on the expanded
    squared-distance form in chunks; their distances are then recomputed directly as
    ``||x - c||`` (exact zero for a point equal to a codeword).
    """
    if not 1 <= n <= codebook.shape[0]:
        raise ValueError(f"n={n} must lie in [1, k={codebook.shape[0]}]")
    x = x.detach().float()
    codebook = codebook.detach().float()
    if n == 1:
        indices = _assign(x, codebook)[0].unsqueeze(1)
    else:
        codebook_sq = codebook.pow(2).sum(1)
        step = _chunk_rows(codebook.shape[0])
        indices = torch.cat([
            _shifted_sq_distances(x[s : s + step], codebook, codebook_sq).topk(n, dim=1, largest=False).indices
            for s in range(0, x.shape[0], step)
        ])
    distances = (x.unsqueeze(1) - codebook[indices]).norm(dim=2)
    distances, order = distances.sort(dim=1, stable=True)
    return indices.gather(1, order), distances
