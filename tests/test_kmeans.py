"""The sorted-values k-means against a plain float64 Lloyd's, and its exact edge cases."""

import pytest
import torch

from torchzip.passes import codebook
from torchzip.passes.codebook import assign_nearest, kmeans_1d


@pytest.fixture(autouse=True)
def route(cpu_route):
    """Every test runs on both Lloyd's loops: the compiled one (where it builds) and torch's."""
    return cpu_route


def lloyd_reference(x, valid, k, iterations, weights=None):
    """Straightforward Lloyd's in float64: linear seeds, every point against every centroid."""
    x = x.double()
    w = valid.double() if weights is None else weights.double() * valid
    big = float("inf")
    lo = torch.where(valid, x, big).amin(1, keepdim=True)
    hi = torch.where(valid, x, -big).amax(1, keepdim=True)
    lo, hi = torch.where(lo > hi, 0.0, lo), torch.where(lo > hi, 0.0, hi)
    c = lo + (hi - lo) * torch.linspace(0, 1, k, dtype=torch.float64)
    for _ in range(iterations):
        a = (x.unsqueeze(-1) - c.unsqueeze(1)).abs().argmin(-1)  # first of equals: the lower centroid
        sums = torch.zeros_like(c).scatter_add_(1, a, x * w)
        counts = torch.zeros_like(c).scatter_add_(1, a, w)
        c = torch.where(counts > 0, sums / counts.clamp(min=1e-300), c)
    return c


def weighted_mse(x, valid, centroids, assign, weights=None):
    w = valid.double() if weights is None else weights.double() * valid
    err = (centroids.double().gather(1, assign.clamp(min=0)) - x.double()) ** 2
    return float((err * w).sum() / w.sum())


def clustered(rows, n):
    centres = torch.randn(rows, 5) * 3
    pick = torch.randint(0, 5, (rows, n))
    return centres.gather(1, pick) + 0.05 * torch.randn(rows, n)


@pytest.mark.parametrize("data", ["gaussian", "clustered", "heavy-tailed"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_no_worse_than_reference_lloyd(data, weighted):
    rows, n = 7, 333  # odd shapes
    x = {"gaussian": lambda: torch.randn(rows, n), "clustered": lambda: clustered(rows, n),
         "heavy-tailed": lambda: torch.distributions.StudentT(3.0).sample((rows, n))}[data]()
    valid = torch.rand(rows, n) > 0.3
    weights = torch.rand(rows, n) ** 2 if weighted else None
    for k in (2, 16):
        centroids, assign = kmeans_1d(x, valid, k, iterations=25, weights=weights)
        ref = lloyd_reference(x, valid, k, 25, weights)
        ref_assign = (x.double().unsqueeze(-1) - ref.unsqueeze(1)).abs().argmin(-1)
        ours, theirs = weighted_mse(x, valid, centroids, assign, weights), weighted_mse(x, valid, ref, ref_assign, weights)
        assert ours <= theirs * (1 + 1e-4) + 1e-12, (k, ours, theirs)
        # Every kept point sits at its nearest centroid; pruned ones take none.
        assert torch.equal(assign[~valid], torch.full_like(assign[~valid], -1))
        d = (x.double().unsqueeze(-1) - centroids.double().unsqueeze(1)).abs().amin(-1)
        got = (x.double() - centroids.double().gather(1, assign.clamp(min=0))).abs()
        assert torch.allclose(got[valid], d[valid], atol=1e-6)


def test_one_layer_group_matches_reference():
    x = torch.randn(1, 20000)
    valid = torch.rand(1, 20000) > 0.5
    centroids, assign = kmeans_1d(x, valid, 16, iterations=25)
    ref = lloyd_reference(x, valid, 16, 25)
    assert torch.allclose(centroids.double(), ref, atol=2e-4)


def test_ties_go_to_the_smaller_centroid():
    x = torch.tensor([[0.0, 1.0, 2.0]])  # 1 sits exactly between the seeds 0 and 2
    centroids, assign = kmeans_1d(x, torch.ones_like(x, dtype=torch.bool), 2)
    assert torch.equal(centroids, torch.tensor([[0.5, 2.0]]))
    assert torch.equal(assign, torch.tensor([[0, 0, 1]]))
    # Equal centroids: the first of them, whatever order they come in.
    assert torch.equal(assign_nearest(torch.tensor([[3.0, -1.0]]), torch.tensor([[5.0, 3.0, 3.0]])),
                       torch.tensor([[1, 1]]))


def test_constant_zero_and_empty_rows_are_exact():
    n = 37
    x = torch.randn(5, n)
    x[0] = 0.7311  # constant
    x[1] = 0.0  # all zero
    valid = torch.ones(5, n, dtype=torch.bool)
    valid[2] = False  # everything pruned
    valid[3, ::2] = False
    for k in (2, 8, 256):
        centroids, assign = kmeans_1d(x, valid, k)
        back = torch.where(assign >= 0, centroids.gather(1, assign.clamp(min=0)), 0.0)
        assert torch.equal(back[0], x[0]) and torch.equal(back[1], x[1])
        assert bool((assign[2] == -1).all()) and torch.equal(centroids[2], torch.zeros(k))
        assert bool((assign[3, ::2] == -1).all()) and bool((assign[3, 1::2] >= 0).all())
        assert int(assign.max()) < k


def test_pruned_values_do_not_move_centroids():
    x = torch.randn(3, 101)
    valid = torch.rand(3, 101) > 0.4
    poisoned = torch.where(valid, x, 1e6)  # what sits at pruned places must not matter
    a = kmeans_1d(x, valid, 8)
    b = kmeans_1d(poisoned, valid, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_integer_weights_equal_repeated_points():
    x = torch.randn(2, 50)
    reps = torch.randint(1, 4, (2, 50))
    valid = torch.ones(2, 50, dtype=torch.bool)
    centroids, assign = kmeans_1d(x, valid, 4, weights=reps.float())
    rows = [row.repeat_interleave(r) for row, r in zip(x, reps)]
    for i, row in enumerate(rows):
        c, _ = kmeans_1d(row.unsqueeze(0), torch.ones(1, row.numel(), dtype=torch.bool), 4)
        assert torch.allclose(centroids[i], c[0], atol=1e-6)


@pytest.mark.parametrize("init", ["linear", "kmeans++"])
def test_deterministic_and_independent_of_row_chunks(init, monkeypatch):
    x = torch.randn(9, 70)
    valid = torch.rand(9, 70) > 0.2
    whole = kmeans_1d(x, valid, 16, init=init, seed=3)
    again = kmeans_1d(x, valid, 16, init=init, seed=3)
    monkeypatch.setattr(codebook, "_CHUNK", 150)  # two rows a chunk
    chunked = kmeans_1d(x, valid, 16, init=init, seed=3)
    for a, b in ((whole, again), (whole, chunked)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_two_level_search_equals_searchsorted():
    for n in (5, 16, 17, 333, 4096):
        keys = torch.randn(4, n).sort(1).values
        keys[:, n // 2:] = keys[:, n // 2:n // 2 + 1]  # runs of equal keys
        mids = torch.cat([torch.randn(4, 6), keys[:, :3], torch.full((4, 1), 1e9)], 1).sort(1).values.contiguous()
        coarse = keys[:, 15::16].contiguous()
        assert torch.equal(codebook._count_at_most(keys, coarse, 16, mids), torch.searchsorted(keys, mids, right=True))


def test_threads_do_not_change_the_clustering(route):
    x, valid = torch.randn(40, 500), torch.rand(40, 500) > 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans_1d(x, valid, 16)
        torch.set_num_threads(2)
        two = kmeans_1d(x, valid, 16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_kmeans_rejects_more_clusters_than_int16_assignments_name():
    # Assignments are int16 on every path: k past 32767 would wrap to negative indices silently.
    from torchzip.passes.codebook import kmeans_1d

    x = torch.randn(1, 64)
    valid = torch.ones_like(x, dtype=torch.bool)
    with pytest.raises(ValueError, match="k must be in 1..32767"):
        kmeans_1d(x, valid, 40000, iterations=1)
    centroids, assign = kmeans_1d(x, valid, 32767, iterations=1)
    assert int(assign.min()) >= 0 and int(assign.max()) < 32767
