"""Tests of vq4dit.metrics: closed forms, ADM details, batching, and the stage command line."""

import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from vq4dit import metrics
from vq4dit.__main__ import main


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------- FID


def test_frechet_distance_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-12)  # 1 + 6.25 + 4 + 1 + 0


def test_frechet_distance_matches_eigenvalue_form(rng):
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    stats1 = {"mu": rng.normal(size=6), "sigma": a @ a.T + 0.1 * np.eye(6)}
    stats2 = {"mu": rng.normal(size=6), "sigma": b @ b.T + 0.1 * np.eye(6)}
    expected = fid_statistics_to_metric(stats1, stats2, verbose=False)["frechet_inception_distance"]
    got = metrics.frechet_distance(stats1["mu"], stats1["sigma"], stats2["mu"], stats2["sigma"])
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_of_set_with_itself_is_zero(rng):
    x = rng.normal(size=(300, 16)).astype(np.float32)
    assert abs(metrics.fid_from_features(x, x)) < 1e-6


def test_fid_from_features_uses_mean_and_unbiased_covariance(rng):
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(40, 4)) * 2 + 1
    def fid(ddof):
        return metrics.frechet_distance(a.mean(0), np.cov(a.T, ddof=ddof),
                                        b.mean(0), np.cov(b.T, ddof=ddof))

    expected, biased = fid(1), fid(0)
    assert metrics.fid_from_features(a, b) == pytest.approx(expected, rel=1e-12)
    assert metrics.fid_from_features(a, b) != pytest.approx(biased, rel=1e-6)


def test_fid_float32_equals_float64_of_same_values(rng):
    a = rng.normal(size=(80, 5)).astype(np.float32)
    b = (rng.normal(size=(70, 5)) + 0.5).astype(np.float32)
    assert metrics.fid_from_features(a, b) == metrics.fid_from_features(
        a.astype(np.float64), b.astype(np.float64)
    )


def test_fid_retries_with_eps_inside_sqrtm_only(monkeypatch):
    calls = []
    real_sqrtm = metrics.linalg.sqrtm

    def flaky_sqrtm(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.linalg, "sqrtm", flaky_sqrtm)
    sigma1, sigma2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        got = metrics.frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2)
    eps = 1e-6 * np.eye(2)
    np.testing.assert_array_equal(calls[1], (sigma1 + eps) @ (sigma2 + eps))
    # traces of the original covariances: 5 + 13 - 2 * (sqrt((1+e)(4+e)) + sqrt((4+e)(9+e)))
    e = 1e-6
    expected = 18 - 2 * (np.sqrt((1 + e) * (4 + e)) + np.sqrt((4 + e) * (9 + e)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_fid_imaginary_component(monkeypatch):
    sigma = np.eye(2)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: np.eye(2) + 1e-4j * np.ones((2, 2)))
    assert metrics.frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma) == pytest.approx(0.0)
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda m: np.eye(2) + 1e-2j * np.eye(2))
    with pytest.raises(ValueError, match="Imaginary component"):
        metrics.frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma)


def test_fid_input_validation(rng):
    with pytest.raises(ValueError, match="feature dimensions differ"):
        metrics.fid_from_features(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.fid_from_features(rng.normal(size=(1, 3)), rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="expected 2 dimensions"):
        metrics.fid_from_features(rng.normal(size=10), rng.normal(size=(10, 1)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.fid_from_features(np.full((3, 2), np.nan), rng.normal(size=(10, 2)))
    with pytest.raises(ValueError, match="sigma2 has shape"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="mean vectors"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))


# ---------------------------------------------------------------------------------- IS


def test_inception_score_uniform_is_one():
    assert metrics.inception_score(np.zeros((100, 10))) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("scale", [100.0, 1e4])  # 1e4: probabilities underflow to exactly 0
def test_inception_score_confident_balanced_is_num_classes(scale):
    logits = scale * np.eye(7)[np.arange(70) % 7]
    assert metrics.inception_score(logits, split_size=35) == pytest.approx(7.0, rel=1e-9)


def test_inception_score_consecutive_chunks_include_short_last_chunk(rng):
    logits = rng.normal(size=(12, 6)) * 3
    expected = np.mean([metrics.inception_score(logits[s], split_size=100)
                        for s in (slice(0, 5), slice(5, 10), slice(10, 12))])
    assert metrics.inception_score(logits, split_size=5) == pytest.approx(expected, rel=1e-12)
    assert metrics.inception_score(logits, split_size=5) != pytest.approx(
        metrics.inception_score(logits, split_size=12), rel=1e-3)


def test_inception_score_matches_torch_fidelity_without_shuffle(rng):
    logits = rng.normal(size=(60, 9)) * 2
    expected = isc_features_to_metric(torch.from_numpy(logits), splits=3, shuffle=False)
    got = metrics.inception_score(logits.astype(np.float32), split_size=20)
    assert got == pytest.approx(expected["inception_score_mean"], rel=1e-6)


def test_inception_score_validation():
    with pytest.raises(ValueError, match="split_size"):
        metrics.inception_score(np.zeros((4, 3)), split_size=0)
    with pytest.raises(ValueError, match="expected 2 dimensions"):
        metrics.inception_score(np.zeros(4))


# ---------------------------------------------------------------------------------- P/R


def _brute_force_pr(real, fake, k=3):
    """Independent dense implementation of the definitions (scipy squared distances)."""
    radius_real = np.sort(cdist(real, real, "sqeuclidean"), axis=1)[:, k]
    radius_fake = np.sort(cdist(fake, fake, "sqeuclidean"), axis=1)[:, k]
    cross = cdist(real, fake, "sqeuclidean")
    precision = (cross <= radius_real[:, None]).any(0).mean()
    recall = (cross <= radius_fake[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_identical_sets(rng):
    x = rng.normal(size=(200, 8)).astype(np.float32)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_far_outliers(rng):
    real = rng.normal(size=(90, 8))
    outliers = 1e3 * rng.normal(size=(10, 8))
    fake = np.concatenate([real, outliers])
    assert metrics.precision_recall(real, fake) == pytest.approx((0.9, 1.0))
    assert metrics.precision_recall(fake, real) == pytest.approx((1.0, 0.9))


def test_precision_recall_boundary_counts_as_inside():
    real = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0]])  # radius of point 0: 3rd NN at 3 -> 9
    fake = np.array([[-3.0, 0], [-3, 0.5], [-3, -0.5], [-3, 1]])  # (-3, 0): on that boundary only
    assert metrics.precision_recall(real, fake) == (0.25, 0.0)
    assert metrics.precision_recall(real, fake, adm_float16=True) == (0.25, 0.0)
    assert metrics.precision_recall(real, fake, k=1) == (0.0, 0.0)  # radius of point 0 is 1


def test_precision_recall_matches_independent_implementations(rng):
    real = rng.normal(size=(150, 12))
    fake = rng.normal(size=(120, 12)) * 1.2 + 0.3
    got = metrics.precision_recall(real, fake)
    assert got == pytest.approx(_brute_force_pr(real, fake))
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0
    tf_precision, tf_recall = calculate_precision_recall_part(
        torch.from_numpy(fake), torch.from_numpy(real), neighborhood=3)
    assert got == pytest.approx((tf_precision, tf_recall))
    got_k5 = metrics.precision_recall(real, fake, k=5)
    assert got_k5 == pytest.approx(_brute_force_pr(real, fake, 5))
    assert got_k5 != pytest.approx(got)


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 3), (16, 200), (1000, 5)])
def test_precision_recall_batching_invariance(rng, rows, cols):
    real = rng.normal(size=(60, 6))
    fake = rng.normal(size=(45, 6)) + 0.4
    expected = metrics.precision_recall(real, fake)
    got = metrics.precision_recall(real, fake, row_batch_size=rows, col_batch_size=cols)
    assert got == expected


def test_precision_recall_adm_float16_close_to_exact(rng):
    real = rng.random(size=(300, 32)).astype(np.float32)
    fake = (rng.random(size=(300, 32)) * 1.1).astype(np.float32)
    exact = metrics.precision_recall(real, fake)
    half = metrics.precision_recall(real, fake, adm_float16=True)
    assert half == pytest.approx(exact, abs=0.05)


def test_precision_recall_adm_float16_falls_back_to_float32_on_overflow(rng):
    real = rng.normal(size=(40, 4)) * 1e3  # squared norms overflow float16 (max 65504)
    fake = rng.normal(size=(40, 4)) * 1e3 + 500
    assert metrics.precision_recall(real, fake, adm_float16=True) == pytest.approx(
        _brute_force_pr(real, fake))


def test_precision_recall_validation(rng):
    with pytest.raises(ValueError, match="at least 4 samples"):
        metrics.precision_recall(rng.normal(size=(3, 2)), rng.normal(size=(10, 2)))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        metrics.precision_recall(rng.normal(size=(10, 2)), rng.normal(size=(10, 3)))


# ---------------------------------------------------------------------------------- CLI


def _features(rng, n, shift=0.0):
    return {
        "pool": (rng.normal(size=(n, 8)) + shift).astype(np.float32),
        "spatial": (rng.normal(size=(n, 6)) * (1 + shift)).astype(np.float32),
        "logits": (rng.normal(size=(n, 5)) * 2).astype(np.float32),
    }


def _run_cli(samples, reference, output, *extra):
    main(["--debug", "metrics", "--features", str(samples), "--reference", str(reference),
          "--output", str(output), *extra])


def test_cli_end_to_end(rng, tmp_path):
    samples, reference = _features(rng, 60, shift=0.5), _features(rng, 80)
    np.savez(tmp_path / "samples.npz", **samples)
    np.savez(tmp_path / "ref.npz", **reference)
    out = tmp_path / "out" / "metrics.json"
    _run_cli(tmp_path / "samples.npz", tmp_path / "ref.npz", out, "--split-size", "20", "--k", "2")
    result = json.loads(out.read_text())
    assert sorted(result) == sorted(["fid", "sfid", "is", "precision", "recall", "n_samples", "n_reference",
                                     "subsets"])
    assert result["subsets"] == []
    assert result["n_samples"] == 60 and result["n_reference"] == 80
    assert result["fid"] == pytest.approx(
        metrics.fid_from_features(samples["pool"], reference["pool"]))
    assert result["sfid"] == pytest.approx(
        metrics.fid_from_features(samples["spatial"], reference["spatial"]))
    assert result["is"] == pytest.approx(metrics.inception_score(samples["logits"], 20))
    assert (result["precision"], result["recall"]) == pytest.approx(
        metrics.precision_recall(reference["pool"], samples["pool"], k=2))
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary file left


def test_cli_uses_precomputed_reference_statistics(rng, tmp_path):
    samples, reference = _features(rng, 50), _features(rng, 50)
    mu, sigma = np.full(8, 3.0), np.diag(np.arange(1.0, 9.0))
    mu_s, sigma_s = np.full(6, -1.0), 2 * np.eye(6)
    np.savez(tmp_path / "samples.npz", **samples)
    np.savez(tmp_path / "ref.npz", pool=reference["pool"], mu=mu, sigma=sigma, mu_s=mu_s,
             sigma_s=sigma_s)  # no 'spatial': the statistics must be enough for sFID
    _run_cli(tmp_path / "samples.npz", tmp_path / "ref.npz", tmp_path / "m.json")
    result = json.loads((tmp_path / "m.json").read_text())
    pool, spatial = samples["pool"].astype(np.float64), samples["spatial"].astype(np.float64)
    assert result["fid"] == pytest.approx(
        metrics.frechet_distance(pool.mean(0), np.cov(pool, rowvar=False), mu, sigma), rel=1e-9)
    assert result["sfid"] == pytest.approx(
        metrics.frechet_distance(spatial.mean(0), np.cov(spatial, rowvar=False), mu_s, sigma_s),
        rel=1e-9)
    assert result["fid"] != pytest.approx(metrics.fid_from_features(pool, reference["pool"]))


def test_cli_missing_key_names_file_and_key(rng, tmp_path):
    samples = _features(rng, 20)
    del samples["logits"]
    np.savez(tmp_path / "samples.npz", **samples)
    np.savez(tmp_path / "ref.npz", **_features(rng, 20))
    with pytest.raises(ValueError, match=r"samples\.npz: missing key 'logits'"):
        _run_cli(tmp_path / "samples.npz", tmp_path / "ref.npz", tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_cli_reference_needs_both_statistics(rng, tmp_path):
    reference = _features(rng, 20)
    np.savez(tmp_path / "samples.npz", **_features(rng, 20))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(8), **reference)  # 'mu' without 'sigma'
    with pytest.raises(ValueError, match=r"ref\.npz: missing key 'sigma'"):
        _run_cli(tmp_path / "samples.npz", tmp_path / "ref.npz", tmp_path / "m.json")


def test_cli_unreadable_file_and_row_mismatch(rng, tmp_path):
    (tmp_path / "bad.npz").write_text("not an npz")
    np.savez(tmp_path / "ref.npz", **_features(rng, 20))
    with pytest.raises(ValueError, match=r"bad\.npz: unreadable \(File is not a zip file\): the file is corrupt"):
        _run_cli(tmp_path / "bad.npz", tmp_path / "ref.npz", tmp_path / "m.json")
    samples = _features(rng, 20)
    samples["logits"] = samples["logits"][:10]
    np.savez(tmp_path / "short.npz", **samples)
    with pytest.raises(ValueError, match=r"short\.npz: 'logits' has shape \(10, 5\)"):
        _run_cli(tmp_path / "short.npz", tmp_path / "ref.npz", tmp_path / "m.json")


def test_cli_metrics_at_the_first_n_samples_too(rng, tmp_path):
    samples, reference = _features(rng, 60, shift=0.5), _features(rng, 80)
    samples["pool"][40:] += 3.0  # the last 20 images differ: the first 40 must score better
    np.savez(tmp_path / "samples.npz", **samples)
    np.savez(tmp_path / "ref.npz", **reference)
    out = tmp_path / "metrics.json"
    _run_cli(tmp_path / "samples.npz", tmp_path / "ref.npz", out, "--split-size", "20", "--k", "2",
             "--sample-counts", "40", "60")
    result = json.loads(out.read_text())
    assert result["n_samples"] == 60 and [s["n_samples"] for s in result["subsets"]] == [40]  # 60 = all
    first = {key: value[:40] for key, value in samples.items()}
    subset = result["subsets"][0]
    assert subset["fid"] == pytest.approx(metrics.fid_from_features(first["pool"], reference["pool"]))
    assert subset["sfid"] == pytest.approx(metrics.fid_from_features(first["spatial"], reference["spatial"]))
    assert subset["is"] == pytest.approx(metrics.inception_score(first["logits"], 20))
    assert (subset["precision"], subset["recall"]) == pytest.approx(
        metrics.precision_recall(reference["pool"], first["pool"], k=2))
    assert subset["fid"] < result["fid"]
    with pytest.raises(ValueError, match=r"samples\.npz: sample counts \[61\].*metrics.sample_counts"):
        _run_cli(tmp_path / "samples.npz", tmp_path / "ref.npz", out, "--sample-counts", "61")
