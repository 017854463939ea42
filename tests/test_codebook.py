"""Sub-vector layout, k clamping, k-means and nearest-codeword search."""

import pytest
import torch

from vq4dit.methods.codebook import _update, kmeans, nearest, subvectors
from vq4dit.size import clamp_k


def test_subvectors_are_contiguous_row_chunks() -> None:
    weight = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8)
    x = subvectors(weight, 4)
    assert x.shape == (8, 4)
    assert torch.equal(x[0], weight[0, :4])
    assert torch.equal(x[1], weight[0, 4:])
    assert torch.equal(x[2], weight[1, :4])
    assert torch.equal(x.reshape(4, 8), weight)


def test_subvectors_rejects_indivisible_in_features() -> None:
    with pytest.raises(ValueError, match=r"\(4, 6\)"):
        subvectors(torch.zeros(4, 6), 4)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(256, 1_327_104, 256), (256, 128, 32), (256, 127, 16), (256, 1024, 256), (64, 100, 16), (8, 3, 1), (1, 1000, 1)],
)
def test_clamp_k(k: int, n: int, expected: int) -> None:
    assert clamp_k(k, n) == expected


def _distortion(x: torch.Tensor, codebook: torch.Tensor, assignments: torch.Tensor) -> float:
    return float((x - codebook[assignments]).pow(2).sum(1).mean())


def test_kmeans_is_deterministic_and_improves_on_its_init() -> None:
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(1))
    codebook, assignments = kmeans(x, 32, iters=50, seed=3)
    again_codebook, again_assignments = kmeans(x, 32, iters=50, seed=3)
    assert codebook.shape == (32, 4) and codebook.dtype == torch.float32
    assert assignments.shape == (4000,) and assignments.dtype == torch.int64
    assert torch.equal(codebook, again_codebook) and torch.equal(assignments, again_assignments)
    init_codebook, init_assignments = kmeans(x, 32, iters=0, seed=3)
    assert _distortion(x, codebook, assignments) < 0.9 * _distortion(x, init_codebook, init_assignments)
    other_codebook, _ = kmeans(x, 32, iters=50, seed=4)
    assert not torch.equal(codebook, other_codebook)


def test_kmeans_assignments_are_nearest_codewords() -> None:
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    codebook, assignments = kmeans(x, 16, iters=100)
    assert torch.equal(assignments, torch.cdist(x, codebook).argmin(1))


def test_kmeans_recovers_exact_codewords() -> None:
    generator = torch.Generator().manual_seed(0)
    words = torch.randn(8, 4, generator=generator)
    x = words[torch.randint(8, (1000,), generator=generator)]
    codebook, assignments = kmeans(x, 8, iters=20)
    assert torch.equal(codebook[assignments], x)


def test_kmeans_reseeds_empty_clusters() -> None:
    # Three distinct points, duplicated: k = 3 clusters must end up on the three points.
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat(10, 1)
    codebook, assignments = kmeans(x, 3, iters=10)
    assert torch.equal(codebook[assignments], x)
    assert len(set(assignments.tolist())) == 3


def test_centroid_update_is_each_clusters_mean_and_moves_empty_ones_to_the_farthest_points() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=generator)
    assignments = torch.randint(0, 7, (5000,), generator=generator)  # clusters 7 and 8 stay empty
    sq = torch.rand(5000, generator=generator)
    centroids, n_empty = _update(x, assignments, sq, 9)
    points = x.double().numpy()
    for j in range(7):  # the definition: the mean of the cluster's points, in float64
        mean = points[(assignments == j).numpy()].mean(axis=0)
        assert torch.allclose(centroids[j].double(), torch.from_numpy(mean), rtol=0, atol=1e-6)
    assert n_empty == 2
    farthest = sq.argsort(descending=True)[:2]
    assert torch.equal(centroids[7:], x[farthest])


def test_nearest_sorted_and_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(16, 4, generator=generator)
    x = torch.cat([codebook[:5], torch.randn(100, 4, generator=generator)])
    indices, distances = nearest(x, codebook, n=3)
    reference = torch.cdist(x, codebook)
    assert indices.shape == distances.shape == (105, 3)
    assert torch.equal(indices, reference.argsort(1)[:, :3])
    assert torch.all(distances[:, :-1] <= distances[:, 1:])
    assert torch.equal(indices[:5, 0], torch.arange(5)) and torch.all(distances[:5, 0] == 0)
    assert torch.allclose(distances, reference.gather(1, indices), atol=1e-5)
    one, one_distances = nearest(x, codebook, n=1)
    assert torch.equal(one, indices[:, :1]) and torch.allclose(one_distances, distances[:, :1])


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(2))
    codebook, assignments = kmeans(x, 16, iters=30)
    indices, distances = nearest(x, codebook, n=2)
    monkeypatch.setattr("vq4dit.methods.codebook.CHUNK_ELEMENTS", 16 * 61)
    chunked_codebook, chunked_assignments = kmeans(x, 16, iters=30)
    assert torch.equal(codebook, chunked_codebook) and torch.equal(assignments, chunked_assignments)
    chunked_indices, chunked_distances = nearest(x, codebook, n=2)
    assert torch.equal(indices, chunked_indices) and torch.equal(distances, chunked_distances)


def test_kmeans_seeds_on_every_point_up_to_the_sampling_limit_and_on_a_sample_above():
    from vq4dit.methods.codebook import SEED_POINTS_PER_CODEWORD, _kmeans_plus_plus

    k = 4
    small = torch.randn(SEED_POINTS_PER_CODEWORD * k, 2, generator=torch.Generator().manual_seed(0))
    seeded, _ = kmeans(small, k, iters=0, seed=5)
    assert torch.equal(seeded, _kmeans_plus_plus(small, k, torch.Generator().manual_seed(5)))  # unchanged
    large = torch.cat([small, small + 100.0])  # twice the limit: the seeding sees a sample of the rows
    codebook, _ = kmeans(large, k, iters=0, seed=5)
    assert torch.equal(codebook, kmeans(large, k, iters=0, seed=5)[0])  # deterministic for a seed
    assert all(bool((large == c).all(dim=1).any()) for c in codebook)  # seeds are data points
