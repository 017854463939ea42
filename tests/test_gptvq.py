"""GPTVQ against independent statements: a valid packed "vq" layer, the group-by-group error feedback written
from the equations, lazy batches changing nothing, the output error against plain k-means VQ, and the codebook
update against the least-squares optimum written as normal equations."""

import pytest
import torch

from vq4dit import packed as packed_io
from vq4dit.methods.assignments import dequantize
from vq4dit.methods.codebook import kmeans
from vq4dit.methods.gptvq import adam_codebook_update, assign_with_feedback, gptvq_quantize, update_codebook


def _hessian(n_in: int, seed: int, samples: int = 256) -> torch.Tensor:
    """X^T X of correlated inputs with unequal magnitudes (float32)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_in) + 0.5 * torch.randn(n_in, n_in, generator=generator) / n_in**0.5
    scale = 0.1 + 2.0 * torch.rand(n_in, generator=generator)
    x = torch.randn(samples, n_in, generator=generator) @ mix * scale
    return x.T @ x


def _output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) in float64: the squared output error on the inputs H was built from."""
    delta = (weight - quantized).double()
    return float(torch.trace(delta @ hessian.double() @ delta.T))


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(100 + seed))


def test_packed_layer_is_valid_and_dequantizes_row_major() -> None:
    weight, hessian = _weight(24, 32, 0), _hessian(32, 0)
    k, d = 16, 4
    packed = gptvq_quantize(weight, hessian, k, d, seed=1)
    assert set(packed) == {"assignments", "codebook", "shape"}
    assert packed["codebook"].shape == (k, d) and packed["codebook"].dtype == torch.float16
    assert packed["assignments"].shape == (24 * 32 // d,) and packed["assignments"].dtype == torch.uint8
    assert int(packed["assignments"].max()) < k
    assert packed["shape"].dtype == torch.int64 and packed["shape"].tolist() == [24, 32]
    # sub-vector r * (in / d) + g holds columns g*d .. g*d+d-1 of row r
    expected = torch.empty(24, 32)
    for r in range(24):
        for g in range(32 // d):
            expected[r, g * d : (g + 1) * d] = packed["codebook"][int(packed["assignments"][r * (32 // d) + g])].float()
    weight_out, bias = dequantize(packed)
    assert bias is None and torch.equal(weight_out, expected)
    # the packed-file "vq" format: bit-packed assignments read back to the same weight
    bits = 4
    layer = {"format": "vq", "bits": bits, "code_shape": list(packed["assignments"].shape),
             "code_dtype": str(packed["assignments"].dtype)}
    stored = dict(packed, assignments=packed_io.pack_bits(packed["assignments"], bits))
    assert packed_io.code_bits("vq", packed, {}) == bits
    assert torch.equal(packed_io.unpack_layer(stored, layer), expected)
    # deterministic for a seed
    again = gptvq_quantize(weight, hessian, k, d, seed=1)
    assert all(torch.equal(packed[key], again[key]) for key in packed)


def test_larger_codebooks_get_wider_indices() -> None:
    weight = _weight(64, 16, 1)
    packed = gptvq_quantize(weight, _hessian(16, 1), 300, 2, kmeans_iters=2, codebook_update_iters=2)
    assert packed["assignments"].dtype == torch.int16 and int(packed["assignments"].max()) < 300


def test_rejects_indivisible_columns_and_too_many_codewords() -> None:
    with pytest.raises(ValueError, match=r"\(8, 6\).*d=4"):
        gptvq_quantize(torch.zeros(8, 6), torch.eye(6), 4, 4)
    with pytest.raises(ValueError, match=r"k=33.*32"):
        gptvq_quantize(torch.randn(8, 8), torch.eye(8), 33, 2)
    with pytest.raises(ValueError, match="blocksize=3"):
        gptvq_quantize(torch.randn(8, 8), torch.eye(8), 4, 2, blocksize=3)


def _reference_feedback(weight: torch.Tensor, upper: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Group by group, no lazy batches: the multi-column OBS update with E = (W_F - Q_F) U_FF^-1."""
    d = codebook.shape[1]
    w = weight.clone()
    chosen = []
    for j in range(0, w.shape[1], d):
        cols = slice(j, j + d)
        importance = 1.0 / torch.diagonal(upper)[cols] ** 2
        distance = ((w[:, cols].unsqueeze(1) - codebook.unsqueeze(0)) ** 2 * importance).sum(-1)
        index = distance.argmin(1)
        error = (w[:, cols] - codebook[index]) @ torch.linalg.inv(upper[cols, cols])
        w[:, j + d :] -= error @ upper[cols, j + d :]
        chosen.append(index)
    return torch.stack(chosen, dim=1)


def test_error_feedback_matches_group_by_group_reference_for_every_blocksize() -> None:
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    codebook = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    hessian = _hessian(16, 7).double()
    damped = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(16, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.linalg.inv(damped)).T  # H^-1 = U^T U, U upper
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(damped))
    expected = _reference_feedback(weight, upper, codebook)
    for blocksize in (2, 4, 6, 16, 128):
        assert torch.equal(assign_with_feedback(weight, upper, codebook, blocksize, "exact"), expected), blocksize
    # the feedback matters here: plain weighted-nearest assignment differs
    importance = (1.0 / torch.diagonal(upper) ** 2).reshape(-1, 2)
    plain = ((weight.reshape(8, 8, 1, 2) - codebook) ** 2 * importance.unsqueeze(1)).sum(-1).argmin(-1)
    assert not torch.equal(plain, expected)


def test_lazy_batches_change_nothing_end_to_end() -> None:
    weight, hessian = _weight(16, 32, 2), _hessian(32, 2)
    results = [gptvq_quantize(weight, hessian, 8, 2, blocksize=b, seed=3, variant="exact") for b in (2, 8, 10, 32, 128)]
    for result in results[1:]:
        assert all(torch.equal(results[0][key], result[key]) for key in result)


def test_identity_hessian_is_plain_nearest_codeword_vq() -> None:
    """H = I: no feedback (U diagonal), equal importances: the assignments are the Euclidean-nearest codewords."""
    weight = _weight(16, 32, 3)
    packed = gptvq_quantize(weight, torch.eye(32), 8, 4, kmeans_iters=0, codebook_update_iters=0, seed=5, variant="exact")
    seeds, _ = kmeans(weight.reshape(-1, 4), 8, iters=0, seed=5)
    assert torch.equal(packed["codebook"], seeds.half())
    assert torch.equal(packed["assignments"].long(), torch.cdist(weight.reshape(-1, 4), seeds).argmin(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_error_is_at_most_plain_kmeans_vq(seed: int) -> None:
    """The issue's "block MSE <= vq-kmeans'" in miniature, both with fp16 codebooks as stored."""
    weight, hessian = _weight(32, 64, seed), _hessian(64, 10 + seed)
    k, d = 16, 2
    gptvq = dequantize(gptvq_quantize(weight, hessian, k, d, seed=seed, variant="exact"))[0]
    codebook, assignments = kmeans(weight.reshape(-1, d), k, iters=100, seed=seed)
    plain = codebook.half().float()[assignments].reshape(weight.shape)
    assert _output_error(weight, gptvq, hessian) <= _output_error(weight, plain, hessian)


def test_codebook_update_reaches_the_least_squares_codebook() -> None:
    """k d CG steps solve S^T (I ⊗ H) S c = S^T (I ⊗ H) w, S the one-hot codeword spreading (written here)."""
    generator = torch.Generator().manual_seed(11)
    out_features, in_features, k, d = 6, 8, 3, 2
    weight = torch.randn(out_features, in_features, generator=generator)
    hessian = _hessian(in_features, 11, samples=512) + torch.eye(in_features)
    assignments = torch.arange(out_features * in_features // d) % k
    assignments = assignments[torch.randperm(assignments.numel(), generator=generator)]
    spread = torch.zeros(out_features * in_features, k * d, dtype=torch.float64)
    for i, a in enumerate(assignments.tolist()):
        for t in range(d):
            spread[i * d + t, a * d + t] = 1.0
    metric = torch.block_diag(*[hessian.double()] * out_features)
    gram = spread.T @ metric @ spread
    optimum = torch.linalg.solve(gram, spread.T @ metric @ weight.double().reshape(-1)).reshape(k, d)
    start = torch.randn(k, d, generator=generator)
    updated = update_codebook(weight, hessian, start, assignments, iters=k * d)
    assert torch.allclose(updated.double(), optimum, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("iters", [1, 3, 25])
def test_codebook_update_never_increases_the_output_error(iters: int) -> None:
    generator = torch.Generator().manual_seed(20 + iters)
    weight, hessian = _weight(32, 64, iters), _hessian(64, 20 + iters)
    for _ in range(3):
        codebook = torch.randn(16, 4, generator=generator)
        assignments = torch.randint(16, (32 * 64 // 4,), generator=generator)
        before = _output_error(weight, codebook[assignments].reshape(weight.shape), hessian)
        updated = update_codebook(weight, hessian, codebook, assignments, iters=iters)
        after = _output_error(weight, updated[assignments].reshape(weight.shape), hessian)
        assert after <= before
    # and on GPTVQ's own assignments: the update only helps
    no_update = gptvq_quantize(weight, hessian, 16, 4, codebook_update_iters=0, variant="exact")
    with_update = gptvq_quantize(weight, hessian, 16, 4, codebook_update_iters=iters, variant="exact")
    assert torch.equal(no_update["assignments"], with_update["assignments"])
    assert _output_error(weight, dequantize(with_update)[0], hessian) <= _output_error(weight, dequantize(no_update)[0], hessian)


def test_prepared_hessian_factor_and_dead_columns() -> None:
    from vq4dit.methods.gptvq import prepare_hessian

    hessian = _hessian(12, 4).double()
    hessian[5, :] = 0.0
    hessian[:, 5] = 0.0
    weight = _weight(3, 12, 4)
    w, damped, upper = prepare_hessian(weight, hessian, percdamp=0.05)
    assert torch.equal(w[:, 5], torch.zeros(3)) and torch.equal(torch.cat([w[:, :5], w[:, 6:]], 1),
                                                               torch.cat([weight[:, :5], weight[:, 6:]], 1))
    expected = hessian.clone()
    expected[5, 5] = 1.0
    expected += 0.05 * torch.diagonal(expected).mean() * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(damped.double(), expected, rtol=1e-6)
    assert torch.equal(upper, upper.triu()) and bool((torch.diagonal(upper) > 0).all())
    assert torch.allclose(upper.double().T @ upper.double(), torch.linalg.inv(expected), rtol=1e-4, atol=1e-6)


def _official_gptvq(weight: torch.Tensor, hessian: torch.Tensor, k: int, d: int, iters: int, percdamp: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTVQ's published code (Qualcomm-AI-research/gptvq ``vq_quant.py``, ``gptq.py`` ``fasterquant`` with
    ``--use-vq --hessian-weighted-lookups --kmeans-init-method mahalanobis``), one codebook for the whole layer,
    no lazy batches, float64, no M-step: (codebook (k, d), assignments (out, in / d))."""
    w, h = weight.double().clone(), hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).T
    u_diag = torch.diagonal(u)
    x = w.reshape(-1, d)  # sub-vector n: row n // (in / d), columns d * (n % (in / d)) + t
    kmeans_weight = u_diag.reshape(-1, d).repeat(w.shape[0], 1)  # H_inv_diag = diag(Hinv), tiled over rows
    centered = x - x.mean(0)
    mahalanobis = ((centered @ torch.linalg.inv(centered.T @ centered)) * centered).sum(1)
    codebook = x[torch.argsort(mahalanobis)[torch.round(torch.linspace(0, len(x) - 1, k)).long()]]
    for _ in range(iters):
        members = ((x.unsqueeze(1) - codebook) ** 2 * kmeans_weight.unsqueeze(1)).sum(-1).argmin(1)
        one_hot = torch.nn.functional.one_hot(members, k).double()  # (N, k)
        codebook = (one_hot.T @ (x * kmeans_weight)) / (one_hot.T @ kmeans_weight).clamp(min=1e-10)
    chosen = []
    for j in range(0, w.shape[1], d):
        cols = slice(j, j + d)
        index = ((w[:, cols].unsqueeze(1) - codebook) ** 2 / u_diag[cols]).sum(-1).argmin(1)
        error = (w[:, cols] - codebook[index]) / u_diag[cols]
        w[:, j + d:] -= error @ u[cols, j + d:]
        chosen.append(index)
    return codebook, torch.stack(chosen, dim=1)


@pytest.mark.parametrize("blocksize", [4, 8, 64])
def test_default_is_the_published_code(blocksize: int) -> None:
    weight, hessian = _weight(24, 32, 7), _hessian(32, 7)
    hessian[:, 10:12] = 0.0  # a dead input pair
    hessian[10:12, :] = 0.0
    codebook, chosen = _official_gptvq(weight, hessian, 8, 2, iters=3)
    packed = gptvq_quantize(weight, hessian, 8, 2, kmeans_iters=3, codebook_update_iters=0, blocksize=blocksize)
    assert torch.equal(packed["assignments"].long().reshape(24, 16), chosen)
    assert torch.allclose(packed["codebook"].float(), codebook.float(), atol=2e-3, rtol=1e-3)
    exact = gptvq_quantize(weight, hessian, 8, 2, kmeans_iters=3, codebook_update_iters=0, variant="exact")
    assert not torch.equal(exact["assignments"], packed["assignments"])


def _adam_reference(weight, hessian, codebook, assignments, steps, lr):
    """Adam (betas 0.9, 0.999, eps 1e-8) by hand on tr((W - C[A]) H (W - C[A])^T), restarting with lr / 10
    from the start whenever a step's loss exceeds the starting loss (GPTVQ's ``lut_m_step``), float64."""
    w, h, start = weight.double(), hessian.double(), codebook.double()
    one_hot = torch.nn.functional.one_hot(assignments, len(codebook)).double()  # (N, k)

    def loss(c):
        delta = w - (one_hot @ c).reshape(w.shape)
        return float(((delta @ h) * delta).sum()), delta

    before = loss(start)[0]
    while True:
        c, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
        for t in range(1, steps + 1):
            value, delta = loss(c)
            if value > before:
                break
            grad = one_hot.T @ (-2.0 * delta @ h).reshape(-1, c.shape[1])
            m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
            c = c - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        else:
            return c
        lr *= 0.1


@pytest.mark.parametrize("lr", [1e-3, 10.0])  # 10: the loss rises, the update restarts at lr 1
def test_published_codebook_update_is_adam_with_restarts(lr: float) -> None:
    generator = torch.Generator().manual_seed(5)
    weight, hessian = _weight(16, 32, 5), _hessian(32, 5)
    codebook = torch.randn(8, 2, generator=generator)
    assignments = torch.randint(8, (16 * 16,), generator=generator)
    ours = adam_codebook_update(weight, hessian, codebook, assignments, steps=25, lr=lr)
    expected = _adam_reference(weight, hessian, codebook, assignments, 25, lr)
    assert torch.allclose(ours.double(), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, codebook.double(), atol=1e-3)


def test_unknown_variant_is_named() -> None:
    with pytest.raises(ValueError, match="published"):
        gptvq_quantize(torch.randn(8, 8), torch.eye(8), 4, 2, variant="official")
