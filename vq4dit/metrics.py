"""FID, sFID, Inception Score, Precision and Recall from extracted Inception features.

The definitions follow the ADM evaluation suite (openai/guided-diffusion
``evaluations/evaluator.py``), which produced the numbers of the DiT and DiT-quantization papers.
Everything is computed in float64 by default; ADM's own float16 distance kernel is available as an
opt-in (``precision_recall(..., adm_float16=True)``). Where torch-fidelity computes a metric
differently, the function's docstring says how.

Stage command line::

    python -m vq4dit metrics --features SAMPLES.npz --reference REF.npz [--sample-counts N ...] --output METRICS.json

FID is biased by the sample count, so numbers are comparable only at equal counts: ``--sample-counts``
adds the metrics of the first N images of the same feature file (the paper evaluates 10,000 samples).
"""

import argparse
import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg, special

from vq4dit.io import atomic_write_json, log_peak_gpu_memory, resolve_device, verify_npz

logger = logging.getLogger(__name__)

FID_EPS = 1e-6
IMAG_ATOL = 1e-3
BATCH_SIZE = 10_000
STATISTICS_KEYS = (("mu", "sigma", "pool"), ("mu_s", "sigma_s", "spatial"))


# ---------------------------------------------------------------------------------------------
# input validation


def _as_float64(array: Any, name: str, ndim: int) -> np.ndarray:
    """``array`` as a finite float64 array of ``ndim`` dimensions, else ValueError naming it."""
    arr = np.asarray(array)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real float array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _as_features(array: Any, name: str, min_rows: int = 2) -> np.ndarray:
    """A finite float64 (N, D) feature matrix with at least ``min_rows`` rows."""
    arr = _as_float64(array, name, ndim=2)
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: need at least {min_rows} samples, got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name}: feature dimension is 0")
    return arr


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"feature dimensions differ: {name_a} has {a.shape[-1]}, {name_b} has {b.shape[-1]}"
        )


# ---------------------------------------------------------------------------------------------
# FID / sFID


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance ``|mu1-mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2))`` in float64.

    As ADM's ``FIDStatistics.frechet_distance``: ``scipy.linalg.sqrtm(S1 @ S2)``; if that is not
    finite, warn and retry with ``1e-6 * I`` added to both covariances *inside the square root
    only* (the traces keep the original covariances, as in ADM); a complex root is accepted when
    its diagonal's imaginary part is within 1e-3 of 0 (else ValueError) and its real part is used.
    ADM passes ``disp=False``, which only changes whether an error estimate is returned (and is
    deprecated since SciPy 1.16): the root is the same, so it is not passed here.

    torch-fidelity instead sums ``sqrt`` of the complex eigenvalues of ``S1 @ S2`` (real part),
    with neither the eps retry nor the imaginary-part check; not followed.
    """
    mu1 = _as_float64(np.atleast_1d(mu1), "mu1", ndim=1)
    mu2 = _as_float64(np.atleast_1d(mu2), "mu2", ndim=1)
    sigma1 = _as_float64(np.atleast_2d(sigma1), "sigma1", ndim=2)
    sigma2 = _as_float64(np.atleast_2d(sigma2), "sigma2", ndim=2)
    dim = mu1.shape[0]
    if mu2.shape != (dim,):
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} has shape {sigma.shape}, expected ({dim}, {dim})")

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {FID_EPS} to diagonal of cov "
            "estimates",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(dim) * FID_EPS
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features: Any, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov(rowvar=False)``, ddof 1) of (N, D) features, in float64.

    ADM takes the mean of its float32 activations in float32 (the covariance is float64 in both
    ADM and torch-fidelity because ``np.cov`` promotes); here the mean is float64 as well.
    """
    arr = _as_features(features, name)
    return arr.mean(axis=0), np.cov(arr, rowvar=False)


def fid_from_features(features_a: Any, features_b: Any) -> float:
    """FID between two (N, D) feature sets (pool features: FID; spatial features: sFID)."""
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    _check_same_dim(a, b, "features_a", "features_b")
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


# ---------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: Any, split_size: int = 5000) -> float:
    """ADM's Inception Score of (N, C) unbiased logits (``pool_3 @ W``, no bias).

    ``p = softmax(logits)``; consecutive chunks of ``split_size`` samples (a shorter last chunk
    counts as a full chunk, as in ADM); per chunk ``exp(mean_i KL(p_i || mean_j p_j))``; the mean
    over chunks. Differences from ADM: float64 instead of TensorFlow's float32 softmax, and
    ``log p`` is ``log_softmax(logits)`` rather than ``log(softmax(logits))``: equal wherever ADM's
    value is finite, but a probability that underflows to 0 contributes 0 here instead of ADM's NaN.

    torch-fidelity (``isc_splits=10``) differs: it shuffles the samples (``samples_shuffle=True``,
    seed 2020) and splits them into 10 equal parts, so it agrees with ADM at no sample count in
    general; it also reports the standard deviation over splits. Not followed.
    """
    arr = _as_features(logits, "logits", min_rows=1)
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    log_p = special.log_softmax(arr, axis=1)
    scores = []
    for begin in range(0, arr.shape[0], split_size):
        part = log_p[begin : begin + split_size]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        kl = np.sum(p * (part - log_marginal), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------
# Precision / Recall (Kynkäänniemi et al. 2019, ADM's ManifoldEstimator)


def _sq_dists(u: torch.Tensor, v: torch.Tensor, adm_float16: bool) -> torch.Tensor:
    """Pairwise squared distances ``max(|u|^2 - 2 u.v + |v|^2, 0)`` of two row blocks.

    Default: in the dtype of ``u``/``v`` (float64). ``adm_float16``: ADM's ``DistanceBlock``, i.e.
    the same expression on float16 copies, cast to float32 if every entry is finite, else
    recomputed from the float32 inputs.
    """
    if adm_float16:
        dist = _sq_dists(u.half(), v.half(), adm_float16=False)
        if torch.isfinite(dist).all():
            return dist.float()
        return _sq_dists(u, v, adm_float16=False)
    dist = u @ v.T
    dist.mul_(-2).add_((u * u).sum(1)[:, None]).add_((v * v).sum(1)[None, :])
    return dist.clamp_(min=0)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(begin, min(begin + size, n)) for begin in range(0, n, size)]


def _smallest(values: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` smallest entries of each row (all of them if the row is shorter), sorted."""
    return torch.topk(values, min(count, values.shape[1]), dim=1, largest=False).values


def _manifold_radii(
    feats: torch.Tensor, k: int, row_batch_size: int, col_batch_size: int, adm_float16: bool
) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in ``feats`` (self = 0th).

    ADM fills a (row batch x N) matrix and partitions it; here a running top-(k+1) is merged over
    column blocks, so memory stays at one (row x column) block. The selected value is the same.
    """
    radii = []
    for rows in _blocks(feats.shape[0], row_batch_size):
        nearest = feats.new_empty((rows.stop - rows.start, 0))
        for cols in _blocks(feats.shape[0], col_batch_size):
            dist = _sq_dists(feats[rows], feats[cols], adm_float16)
            nearest = torch.cat([nearest, _smallest(dist, k + 1)], dim=1)
            nearest = _smallest(nearest, k + 1)
            del dist  # free the block before the next one is computed
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(
    real_features: Any,
    fake_features: Any,
    k: int = 3,
    *,
    row_batch_size: int = BATCH_SIZE,
    col_batch_size: int = BATCH_SIZE,
    device: str | torch.device | None = None,
    adm_float16: bool = False,
) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds) as ADM's ``compute_prec_recall``.

    Radius of a point: squared distance to its k-th nearest neighbour within its own set, the
    point itself being the 0th. Precision: fraction of fake points within (``<=``) the radius of
    at least one real point; recall: fraction of real points within the radius of at least one
    fake point. Distances are computed by blocks of ``row_batch_size`` real (or own-set) rows x
    ``col_batch_size`` columns, so no N x N matrix is formed; ``device`` (default CPU) runs them
    with torch on e.g. ``"cuda"``.

    Default: ADM's expression ``max(|u|^2 - 2 u.v + |v|^2, 0)`` evaluated in float64 (ADM's
    float16/float32 rounding can move points across a ball's boundary). ``adm_float16=True``
    reproduces ADM's
    TensorFlow ``DistanceBlock``: each block in float16 (products accumulated as torch does for
    float16, which may differ from TF's kernels in the last bit), a block with any non-finite
    entry recomputed in float32, radii and comparisons in float32.

    torch-fidelity differs: argument order (generated first), Euclidean rather than squared
    distances (same ordering in exact arithmetic) from ``torch.cdist`` in float32, and by default
    (``save_cpu_ram=False``) the full N x N matrices; k = 3, ``<=`` and the self-as-0th rule agree.
    """
    if k < 1 or row_batch_size < 1 or col_batch_size < 1:
        raise ValueError("k, row_batch_size and col_batch_size must be positive")
    real = _as_features(real_features, "real_features", min_rows=k + 1)
    fake = _as_features(fake_features, "fake_features", min_rows=k + 1)
    _check_same_dim(real, fake, "real_features", "fake_features")
    dtype = torch.float32 if adm_float16 else torch.float64
    real_t = torch.from_numpy(real).to(device=device or "cpu", dtype=dtype)
    fake_t = torch.from_numpy(fake).to(device=device or "cpu", dtype=dtype)
    radii_real = _manifold_radii(real_t, k, row_batch_size, col_batch_size, adm_float16)
    radii_fake = _manifold_radii(fake_t, k, row_batch_size, col_batch_size, adm_float16)
    real_in = torch.zeros(real_t.shape[0], dtype=torch.bool, device=real_t.device)
    fake_in = torch.zeros(fake_t.shape[0], dtype=torch.bool, device=real_t.device)
    for rows in _blocks(real_t.shape[0], row_batch_size):
        for cols in _blocks(fake_t.shape[0], col_batch_size):
            dist = _sq_dists(real_t[rows], fake_t[cols], adm_float16)
            real_in[rows] |= (dist <= radii_fake[cols][None, :]).any(dim=1)
            fake_in[cols] |= (dist <= radii_real[rows][:, None]).any(dim=0)
            del dist
    return fake_in.double().mean().item(), real_in.double().mean().item()


# ---------------------------------------------------------------------------------------------
# stage command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m vq4dit metrics``."""
    parser.add_argument("--features", type=Path, required=True,
                        help="sample features .npz (keys pool, spatial, logits)")
    parser.add_argument("--reference", type=Path, required=True,
                        help="reference features .npz (pool; spatial or mu_s/sigma_s; optional "
                             "mu/sigma)")
    parser.add_argument("--output", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--split-size", type=int, default=5000,
                        help="Inception Score chunk size (ADM: 5000)")
    parser.add_argument("--k", type=int, default=3, help="precision/recall neighbourhood size")
    parser.add_argument("--sample-counts", type=int, nargs="*", default=[],
                        help="also compute every metric on the first N samples, for each N (e.g. the paper's 10000)")
    parser.add_argument("--device", default="auto",
                        help="torch device for the precision/recall distances (auto: CUDA when present)")


class FeatureFile:
    """Lazy reader of a features .npz whose errors name the file and the key; a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._npz = np.load(path, allow_pickle=False)
            self.keys = set(self._npz.files)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read features .npz ({err})") from err

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._npz.close()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def _missing(self, key: str) -> ValueError:
        found = ", ".join(sorted(self.keys)) or "none"
        return ValueError(f"{self.path}: missing key '{key}' (found: {found})")

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.keys:
            raise self._missing(key)
        try:
            return self._npz[key]
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: cannot read key '{key}' ({err})") from err

    def require(self, *keys: str) -> None:
        """ValueError naming the file and the first of ``keys`` it lacks."""
        for key in keys:
            if key not in self.keys:
                raise self._missing(key)

    def rows(self, key: str, n_rows: int) -> np.ndarray:
        """Array ``key``, checked to have ``n_rows`` rows."""
        array = self[key]
        if array.ndim < 1 or array.shape[0] != n_rows:
            raise ValueError(
                f"{self.path}: '{key}' has shape {array.shape}, expected {n_rows} rows"
            )
        return array

    def statistics(self, mu_key: str, sigma_key: str, features_key: str) -> tuple[np.ndarray, ...]:
        """Precomputed ``(mu, sigma)`` when either key exists (then both must), else computed."""
        if mu_key in self or sigma_key in self:
            logger.info("%s: using precomputed %s/%s", self.path, mu_key, sigma_key)
            return self[mu_key], self[sigma_key]
        return feature_statistics(self[features_key], f"{self.path}:{features_key}")


def _timed(name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    logger.info("%s = %s (%.1f s)", name, value, time.perf_counter() - start)
    return value


def _sample_metrics(source: Path, pool: np.ndarray, spatial: np.ndarray, logits: np.ndarray, reference_stats: dict,
                    ref_pool: np.ndarray, split_size: int, k: int, device: str) -> dict[str, float | int]:
    """The five metrics of one set of sample features (rows aligned; from file ``source``) against the reference."""
    n = len(pool)
    precision, recall = _timed(f"precision, recall (n={n})", lambda: precision_recall(ref_pool, pool, k=k,
                                                                                      device=device))
    return {
        "fid": _timed(f"FID (n={n})", lambda: frechet_distance(
            *feature_statistics(pool, f"{source}:pool"), *reference_stats["pool"])),
        "sfid": _timed(f"sFID (n={n})", lambda: frechet_distance(
            *feature_statistics(spatial, f"{source}:spatial"), *reference_stats["spatial"])),
        "is": _timed(f"IS (n={n})", lambda: inception_score(logits, split_size)),
        "precision": precision,
        "recall": recall,
        "n_samples": n,
    }


def compute_metrics(
    samples: FeatureFile, reference: FeatureFile, split_size: int, k: int, device: str,
    sample_counts: list[int] = (),
) -> dict[str, Any]:
    """All five metrics of a sample feature file against a reference feature file.

    Top level: on all samples. ``subsets``: the same metrics on the first ``N`` samples (by global image
    index, i.e. the order of the feature file) for each ``N`` of ``sample_counts`` below the sample count
    (an ``N`` equal to it is the top level); the reference is always whole.
    """
    samples.require("pool", "spatial", "logits")
    reference.require("pool")
    for mu_key, sigma_key, features_key in STATISTICS_KEYS:
        if mu_key in reference or sigma_key in reference:
            reference.require(mu_key, sigma_key)
        else:
            reference.require(features_key)
    pool = samples["pool"]
    n_samples = len(pool)
    too_many = [n for n in sample_counts if n > n_samples or n < k + 1]
    if too_many:
        raise ValueError(f"{samples.path}: sample counts {too_many} are not between k + 1 = {k + 1} and the "
                         f"{n_samples} samples of the file (config key metrics.sample_counts)")
    spatial, logits = samples.rows("spatial", n_samples), samples.rows("logits", n_samples)
    reference_stats = {features_key: reference.statistics(mu_key, sigma_key, features_key)
                       for mu_key, sigma_key, features_key in STATISTICS_KEYS}
    ref_pool = reference["pool"]
    metrics: dict[str, Any] = _sample_metrics(samples.path, pool, spatial, logits, reference_stats, ref_pool, split_size, k, device)
    metrics["n_reference"] = len(ref_pool)
    metrics["subsets"] = [
        _sample_metrics(samples.path, pool[:n], spatial[:n], logits[:n], reference_stats, ref_pool, split_size, k, device)
        for n in sorted(set(sample_counts)) if n < n_samples
    ]
    return metrics


def run(args: argparse.Namespace) -> None:
    """Compute the metrics of ``--features`` against ``--reference`` and write ``--output``."""
    logger.info("metrics of %s against %s", args.features, args.reference)
    verify_npz(args.features)
    verify_npz(args.reference)
    device = resolve_device(args.device)
    with FeatureFile(args.features) as samples, FeatureFile(args.reference) as reference:
        metrics = compute_metrics(samples, reference, args.split_size, args.k, device, args.sample_counts)
    atomic_write_json(args.output, metrics)
    logger.info("wrote %s", args.output)
    log_peak_gpu_memory(logger, device)
