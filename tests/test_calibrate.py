"""Calibration: statistics gathered layer by layer, and the passes that use them (GPTQ int8 and
codebooks, activation-weighted k-means, Wanda, SparseGPT), against float64 references."""

import itertools
import warnings

import pytest
import torch
from torch import nn

import torchzip as tz
import torchzip.passes.quantize as quantize_module
from torchzip import calibrate
from torchzip.packed import Int8Weight


def correlated(n, k, seed):
    """Inputs with a known covariance: a random mixing of features with very different scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * torch.logspace(-1.5, 1.0, k).unsqueeze(1)
    return lambda m: torch.randn(m, k, generator=gen) @ mix


def second_moment(batches):
    x = torch.cat([b.double() for b in batches])
    return x.T @ x


def output_mse(model, ref, x):
    with torch.no_grad():
        return float((model(x).double() - ref(x).double()).pow(2).mean())


# ---- references written here, in float64 ----------------------------------------------------


def reference_gptq(w, h, grid):
    """GPTQ as Frantar et al. state it (OBQ's column order, no blocks, no Cholesky): round column
    j onto its grid, spread its error over the later columns with the inverse Hessian, then
    drop j from the inverse."""
    w = w.double().clone()
    h = h.double() + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q = grid(j, w[:, j])
        out[:, j] = q
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j + 1:] -= err.unsqueeze(1) * hinv[j, j + 1:].unsqueeze(0)
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return out


@pytest.mark.parametrize("group_size", [0, 16])
def test_gptq_int8_matches_float64_reference(group_size):
    k, n = 144, 37  # more columns than one block of 128
    data = correlated(n, k, seed=1)
    batches = [data(100) for _ in range(3)]
    layer = nn.Linear(k, n)
    model = tz.compress(nn.Sequential(layer), [tz.Quantize(method="gptq", group_size=group_size)], progress=False,
                        calibration=batches)
    packed = tz.freeze(model)[0].packed
    assert isinstance(packed, Int8Weight)
    scales = packed.scales.double()
    g = group_size or k
    h = second_moment(batches)

    def grid(j, col):
        s = scales[:, j // g]
        return torch.round(col / s).clamp(-127, 127) * s

    # The reference chooses nothing: it rounds onto the scales the pass chose (checked below), in
    # the pass's column order: by decreasing input energy per channel, as they come with groups.
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if not group_size else torch.arange(k)
    inverse = torch.argsort(order)
    ref = reference_gptq(layer.weight.detach()[:, order], h[order][:, order], lambda j, col: grid(int(order[j]), col))
    ref = ref[:, inverse]
    got = packed.qweight.double() * scales.repeat_interleave(g, dim=1)
    # A rare flip at a near tie (float32 in the pass, float64 here) may differ, and the error
    # feedback then carries it along that row: every other row must agree.
    close = torch.isclose(got, ref, rtol=0, atol=1e-5 * float(scales.max()) * 127).all(1)
    assert (got == ref).double().mean() > 0.99 and close.double().mean() >= 0.9, (close.sum(), n)
    if not group_size:  # per channel: max|w| / 127 of the row, shrunk by at most half, never grown
        # (group scales are fitted to the columns as the feedback has changed them)
        amax = layer.weight.detach().double().abs().amax(1, keepdim=True) / 127
        assert bool((scales <= amax * (1 + 1e-6)).all()) and bool((scales >= amax * 0.5 * (1 - 1e-6)).all())
    # Less output error on fresh inputs than rounding to nearest.
    plain = tz.compress(nn.Sequential(layer), [tz.Quantize(method="round", group_size=group_size)], progress=False)
    x = data(400)
    assert output_mse(model, nn.Sequential(layer), x) < output_mse(plain, nn.Sequential(layer), x)


def test_gptq_codebook_assignment_matches_float64_reference(cpu_route):
    from torchzip.passes.calibrated import act_order, inverse_hessian_factor
    from torchzip.passes.codebook import _gptq_assign

    k, n = 40, 9
    data = correlated(n, k, seed=2)
    h = second_moment([data(64), data(64)])
    w = torch.randn(n, k)
    book = torch.sort(torch.randn(n, 8) * 0.7, dim=1).values.double()
    visit = act_order(h)
    got = _gptq_assign(w, h, book, None, visit, inverse_hessian_factor(h[visit][:, visit]))

    def grid(j, col):
        return book.gather(1, (col.unsqueeze(1) - book).abs().argmin(1, keepdim=True)).squeeze(1)

    order = torch.argsort(torch.diagonal(h), descending=True)
    ref = reference_gptq(w[:, order], h[order][:, order], grid)[:, torch.argsort(order)]
    assert (book.gather(1, got) == ref).double().mean() > 0.99


@pytest.mark.parametrize("k, n, shared, masked", [(300, 37, False, True), (129, 20, True, False), (7, 5, False, False)])
def test_compiled_gptq_codebook_assignment_is_torchs_bit_for_bit(k, n, shared, masked, monkeypatch):
    from torchzip.kernels import cpu
    from torchzip.passes.calibrated import act_order, inverse_hessian_factor
    from torchzip.passes.codebook import _gptq_assign

    if not cpu.available():
        pytest.skip(f"needs the compiled CPU kernels (x86-64 with AVX2 and gcc; the torch route is tested everywhere): {cpu.why_not()}")
    gen = torch.Generator().manual_seed(k)
    h = second_moment([correlated(n, k, seed=k)(2 * k)])
    w = torch.randn(n, k, generator=gen)
    book = torch.sort(torch.randn(1 if shared else n, 16, generator=gen), dim=1).values
    book[:, 3] = book[:, 2]  # a tie: the first of equal centroids wins on both routes
    keep = torch.rand(n, k, generator=gen) > 0.3 if masked else None
    visit = act_order(h)
    factor = inverse_hessian_factor(h[visit][:, visit])
    got = _gptq_assign(w, h, book, keep, visit, factor)  # several ragged blocks of 128 columns at k = 300
    monkeypatch.setattr(cpu, "available", lambda: False)
    want = _gptq_assign(w, h, book, keep, visit, factor)
    assert torch.equal(got, want)
    assert masked == bool((got == -1).any()) and not bool((got == 3).any())


def test_calibrated_codebook_is_the_least_squares_codebook_of_its_assignments():
    k, n = 40, 9
    data = correlated(n, k, seed=2)
    batches = [data(64) for _ in range(2)]
    layer = nn.Linear(k, n)
    for granularity in ("channel", "layer"):
        model = tz.compress(nn.Sequential(layer), [tz.Codebook(bits=3, granularity=granularity, method="gptq")],
                            progress=False, calibration=batches)
        quant = model[0].parametrizations.weight[0]
        assign, book = quant.indices(), quant.centroids.detach().double()
        h, w = second_moment(batches), layer.weight.detach().double()
        # Normal equations, row by row, in float64: for each row's one-hot A, (A^T H A) c = A^T H w.
        lhs, rhs = torch.zeros(n, 8, 8, dtype=torch.float64), torch.zeros(n, 8, dtype=torch.float64)
        for i in range(n):
            a = torch.nn.functional.one_hot(assign[i], 8).double()
            lhs[i], rhs[i] = a.T @ h @ a, a.T @ h @ w[i]
        if granularity == "layer":
            lhs, rhs = lhs.sum(0, keepdim=True), rhs.sum(0, keepdim=True)
        used = torch.diagonal(lhs, dim1=1, dim2=2) > 0
        # At the least-squares codebook the gradient A^T H (w - A c) vanishes for every used centroid.
        grad = rhs - (lhs @ book.unsqueeze(-1)).squeeze(-1)
        assert float(grad[used].abs().max()) < 1e-4 * float(rhs.abs().max())
        x = data(300)
        kmeans = tz.compress(nn.Sequential(layer), [tz.Codebook(bits=3, granularity=granularity, method="kmeans")],
                             progress=False)
        assert output_mse(model, nn.Sequential(layer), x) < output_mse(kmeans, nn.Sequential(layer), x)


def test_float_target_weight_is_the_least_squares_fit_to_the_float_outputs():
    from torchzip.passes.calibrated import float_target_weight

    gen = torch.Generator().manual_seed(11)
    m, k, n = 300, 17, 5
    x_ref = torch.randn(m, k, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)
    x = x_ref + 0.3 * torch.randn(m, k, generator=gen, dtype=torch.float64)  # the compressed model's inputs
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    got = float_target_weight(w.float(), x.T @ x, x_ref.T @ x, damp=1e-12)
    best = torch.linalg.lstsq(x, x_ref @ w.T).solution.T  # argmin_Q |X_ref W^T - X Q^T|, in float64
    assert torch.allclose(got, best, rtol=1e-6, atol=1e-6)
    # Damping shrinks the correction towards W, and inputs equal to the float ones leave W as it is.
    damped = float_target_weight(w, x.T @ x, x_ref.T @ x, damp=1e3)
    assert (damped - w).norm() < 0.01 * (best - w).norm()
    assert torch.allclose(float_target_weight(w, x.T @ x, x.T @ x), w, atol=1e-12)


@pytest.mark.parametrize("reuse_blocks", [True, False])
def test_float_targets_get_the_cross_moment_of_float_and_compressed_inputs(monkeypatch, reuse_blocks):
    from torchzip.passes import calibrated

    data = correlated(0, 12, seed=5)
    batches = [data(40) for _ in range(3)]
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 4))
    crosses = []
    real = calibrated.float_target_weight
    monkeypatch.setattr(calibrated, "float_target_weight",
                        lambda w, h, cross, **kw: (crosses.append((h.clone(), cross.clone())), real(w, h, cross, **kw))[1])
    real_sweep = calibrate.sweep
    monkeypatch.setattr(calibrate, "sweep", lambda *a, **kw: real_sweep(*a, **dict(kw, reuse_blocks=reuse_blocks)))
    out = tz.compress(model, [tz.Codebook(bits=2, granularity="layer", method="gptq", float_targets=True)], progress=False,
                      calibration=batches)
    assert len(crosses) == 3

    def rows(net, index):
        got = []
        handle = net[index].register_forward_pre_hook(lambda m, args: got.append(args[0].double()))
        with torch.no_grad():
            for b in batches:
                net(b)
        handle.remove()
        return torch.cat(got)

    for index, (h, cross) in zip((0, 2, 4), crosses):
        x, x_ref = rows(out, index), rows(model, index)
        scale = float((x.T @ x).abs().max())
        assert torch.allclose(h, x.T @ x, rtol=1e-5, atol=1e-5 * scale)
        assert torch.allclose(cross, x_ref.T @ x, rtol=1e-5, atol=1e-5 * scale)
        if index:  # 2-bit layers before it: the compressed inputs are not the float ones
            assert not torch.allclose(x, x_ref, atol=1e-2)
    # Fitting the float outputs undoes some of the error of the layers before: on fresh inputs the
    # whole network's output error is smaller than with the usual targets, summed over a few
    # networks (one small random network can go either way: about 1 in 10 does not gain).
    totals = {True: 0.0, False: 0.0}
    for _ in range(6):
        net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 4))
        x = data(500)
        for fit in totals:
            got = tz.compress(net, [tz.Codebook(bits=2, granularity="layer", method="gptq", float_targets=fit)],
                              progress=False, calibration=batches)
            totals[fit] += output_mse(got, net, x)
    assert totals[True] < totals[False]


def test_weighted_kmeans_reduces_output_error():
    k, n = 64, 23
    # Known, diagonal input covariance: feature j has standard deviation scale[j].
    gen = torch.Generator().manual_seed(3)
    scale = torch.logspace(-1.5, 1.0, k)[torch.randperm(k, generator=gen)]

    def data(m):
        return torch.randn(m, k, generator=gen) * scale
    batches = [data(128) for _ in range(2)]
    layer = nn.Linear(k, n)
    x = data(512)
    errors = {}
    for method in ("kmeans", "weighted"):
        # Per channel: each row's centroids follow the weights on the inputs that matter. (One
        # codebook per layer gains little here: every column holds the same distribution.)
        recipe = [tz.Codebook(bits=3, granularity="channel", method=method)]
        model = tz.compress(nn.Sequential(layer), recipe, progress=False, calibration=batches if method != "kmeans" else None)
        errors[method] = output_mse(model, nn.Sequential(layer), x)
    assert errors["weighted"] < 0.8 * errors["kmeans"], errors


# ---- pruning --------------------------------------------------------------------------------


def brute_force_wanda(w, x, pattern, sparsity):
    w, x = w.double(), x.double()
    n, k = w.shape
    norms = [float(sum(x[r, j] ** 2 for r in range(x.shape[0])) ** 0.5) for j in range(k)]
    score = [[abs(float(w[i, j])) * norms[j] for j in range(k)] for i in range(n)]
    keep = torch.ones(n, k, dtype=torch.bool)
    if pattern == "unstructured":
        order = sorted(((score[i][j], i, j) for i in range(n) for j in range(k)))
        for _, i, j in order[:round(sparsity * n * k)]:
            keep[i, j] = False
    elif pattern == "channel":
        rows = sorted((sum(s * s for s in score[i]), i) for i in range(n))
        for _, i in rows[:round(sparsity * n)]:
            keep[i] = False
    else:
        nn_, m = map(int, pattern.split(":"))
        for i in range(n):
            for g in range(0, k, m):
                best = max(itertools.combinations(range(g, g + m), nn_), key=lambda c: sum(score[i][j] for j in c))
                for j in range(g, g + m):
                    keep[i, j] = j in best
    return keep


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", 0.5), ("1:3", 0.5), ("channel", 0.3)])
def test_wanda_masks_equal_brute_force(pattern, sparsity):
    k, n = 12, 7
    data = correlated(n, k, seed=4)
    batches = [data(9), data(5)]
    layer = nn.Linear(k, n)
    model = tz.compress(nn.Sequential(layer), [tz.Prune(sparsity=sparsity, pattern=pattern, score="wanda")],
                        progress=False, calibration=batches)
    mask = model[0].parametrizations.weight[0].mask
    assert torch.equal(mask, brute_force_wanda(layer.weight.detach(), torch.cat(batches), pattern, sparsity))
    assert torch.equal(model[0].parametrizations.weight.original, layer.weight)  # Wanda changes no kept weight


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude(pattern):
    k, n = 32, 11
    data = correlated(n, k, seed=5)
    batches = [data(96) for _ in range(2)]
    layer = nn.Linear(k, n)
    ref = nn.Sequential(layer)
    sgpt = tz.compress(ref, [tz.Prune(sparsity=0.5, pattern=pattern, score="sparsegpt")], progress=False,
                       calibration=batches)
    mag = tz.compress(ref, [tz.Prune(sparsity=0.5, pattern=pattern)], progress=False)
    weight = sgpt[0].weight.detach()
    assert int((weight == 0).sum()) == n * k // 2  # exactly the sparsity asked for
    if pattern == "2:4":
        assert bool(((weight.view(n, -1, 4) != 0).sum(-1) <= 2).all())
    for x in (torch.cat(batches), data(400)):  # the objective, and fresh inputs
        assert output_mse(sgpt, ref, x) < 0.7 * output_mse(mag, ref, x)
    frozen = tz.freeze(sgpt)
    x = data(5)
    assert torch.allclose(frozen(x), sgpt(x), atol=1e-5)


def reference_refit(w, h, keep, damp=0.01):
    """Each row's least-squares kept weights, one row at a time: minimise (w_i - v) H' (w_i - v)^T
    over v zero outside keep_i, by solving the normal equations on the kept columns (float64,
    H' = H + damp * mean(diag H) * I, as SparseGPT damps it)."""
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    out = torch.zeros(w.shape, dtype=torch.float64)
    for i in range(w.shape[0]):
        s = torch.nonzero(keep[i]).squeeze(1)
        if len(s):
            out[i, s] = torch.linalg.solve(h[s][:, s], h[s] @ w[i].double())
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_refit_is_the_least_squares_optimum_of_its_mask(pattern):
    from torchzip.passes.calibrated import output_error, refit_kept, sparsegpt

    n, k = 13, 40  # unstructured rows keep different counts (the padded path); 2:4 rows the same
    data = correlated(n, k, seed=11)
    h = second_moment([data(70) for _ in range(2)])
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(12))
    nm = (2, 4) if pattern == "2:4" else None
    plain, keep = sparsegpt(w, h, sparsity=0.55, nm=nm)
    refit, keep2 = sparsegpt(w, h, sparsity=0.55, nm=nm, refit=True)
    assert torch.equal(keep, keep2)  # refitting keeps the mask
    if nm is None:
        assert len(set(keep.sum(1).tolist())) > 1
    ref = reference_refit(w, h, keep)
    assert torch.allclose(refit, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    assert torch.equal(refit != 0, keep & (ref != 0))
    # The optimum of the (damped) objective: no worse than SparseGPT's own updates on any row.
    hd = h + 0.01 * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    assert bool((output_error(refit - w, hd) <= output_error(plain - w, hd) * (1 + 1e-9)).all())
    assert float(output_error(refit - w, hd).sum()) < 0.95 * float(output_error(plain - w, hd).sum())
    assert torch.equal(refit_kept(w, h, torch.zeros(n, k, dtype=torch.bool)), torch.zeros(n, k, dtype=torch.float64))


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 3)])
def test_sparsegpt_group_order_is_sparsegpt_on_permuted_groups(nm):
    from torchzip.passes.calibrated import sparsegpt

    n, k = 9, 48
    data = correlated(n, k, seed=14)
    h = second_moment([data(90)])
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(15))
    new, keep = sparsegpt(w, h, sparsity=0.5, nm=nm, group_order=True)
    m = nm[1] if nm else 1
    energy = torch.diagonal(h).view(-1, m).sum(1)
    order = [g * m + i for g in sorted(range(k // m), key=lambda g: -float(energy[g])) for i in range(m)]
    ref, ref_keep = sparsegpt(w[:, order], h[order][:, order], sparsity=0.5, nm=nm)
    assert torch.equal(keep[:, order], ref_keep) and torch.allclose(new[:, order], ref, rtol=0, atol=1e-12)
    assert order != list(range(k))  # the order does change something here
    if nm:
        assert bool((keep.view(n, -1, nm[1]).sum(-1) == nm[0]).all())  # groups of the original columns
    else:
        assert int((~keep).sum()) == n * k // 2


def test_prune_refit_option_reaches_the_layer():
    data = correlated(12, 32, seed=13)
    batches = [data(80)]
    layer = nn.Linear(32, 12)
    x = data(300)
    errors = {}
    for refit in (False, True):
        out = tz.compress(nn.Sequential(layer), [tz.Prune(pattern="2:4", score="sparsegpt", refit=refit)],
                          progress=False, calibration=batches)
        errors[refit] = output_mse(out, nn.Sequential(layer), x)
    assert errors[True] < errors[False]  # held-apart inputs of the same distribution
    assert tz.Prune().refit is True


def test_sparsegpt_then_gptq_int8_keeps_zeros_and_round_trips(tmp_path):
    data = correlated(16, 24, seed=6)
    batches = [data(64)]
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))
    out = tz.compress(model, [tz.Prune(pattern="2:4"), tz.Quantize()], progress=False, calibration=batches)
    assert out[0].parametrizations.weight[1].scales is not None  # auto chose GPTQ with data
    w = out[0].weight.detach()
    assert bool(((w.view(16, -1, 4) != 0).sum(-1) <= 2).all())
    frozen = tz.freeze(out)
    x = data(7)
    assert torch.equal(frozen(x), tz.freeze(out)(x))
    assert torch.allclose(frozen(x), out(x), atol=1e-5)
    path = tmp_path / "m.tzip"
    tz.export(out, path, progress=False)
    loaded = tz.load(path, nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8)), progress=False)
    assert torch.equal(loaded(x), frozen(x))


# ---- the sequential sweep ------------------------------------------------------------------


def test_sequential_calibration_feeds_compressed_outputs_forward(monkeypatch):
    data = correlated(0, 20, seed=7)
    batches = [data(50) for _ in range(3)]
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 25), nn.Tanh(), nn.Linear(25, 5))
    seen = []
    real = quantize_module.gptq
    monkeypatch.setattr(quantize_module, "gptq", lambda w, h, *a, **kw: (seen.append(h.clone()), real(w, h, *a, **kw))[1])
    out = tz.compress(model, [tz.Quantize(method="gptq")], progress=False, calibration=batches)
    assert len(seen) == 3

    def inputs_of(net, index):
        rows = []
        handle = net[index].register_forward_pre_hook(lambda m, args: rows.append(args[0].double()))
        with torch.no_grad():
            for b in batches:
                net(b)
        handle.remove()
        x = torch.cat(rows)
        return x.T @ x

    for index, h in zip((0, 2, 4), seen):
        compressed, original = inputs_of(out, index), inputs_of(model, index)
        assert torch.allclose(h, compressed, rtol=1e-5, atol=1e-5 * float(compressed.abs().max()))
        if index:  # what the compressed layers before it produce, not the float model's activations
            assert not torch.allclose(h, original, rtol=1e-5, atol=1e-5 * float(original.abs().max()))


class EmbedThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(40, 12), nn.Linear(12, 7)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_embeddings_come_first_then_the_sweep_sees_their_compressed_rows(monkeypatch):
    # The embedding has no input statistics: it is compressed first (on its output metric), so
    # the linear after it is calibrated on the compressed table's rows, not the float ones.
    torch.manual_seed(3)
    model = EmbedThenLinear()
    batches = [torch.randint(0, 40, (5, 9)) for _ in range(3)]
    seen = {}
    real = tz.Codebook.compress_calibrated
    monkeypatch.setattr(tz.Codebook, "compress_calibrated",
                        lambda self, name, module, h, group: (seen.setdefault(name, h.clone()), real(self, name, module, h, group))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows too short for per-channel codebooks: one warning says so
        out = tz.compress(model, [tz.Codebook(bits=2, method="gptq")], progress=False, calibration=batches)
    assert list(seen) == ["emb", "fc"]
    assert seen["emb"].shape == (12, 12)  # the metric of the table's columns
    with torch.no_grad():
        rows = lambda table: torch.cat([table(b).reshape(-1, 12).double() for b in batches])
        compressed, original = rows(out.emb), rows(model.emb)
    assert not torch.allclose(compressed, original, atol=1e-3)  # 2-bit rows differ from float ones
    ref = compressed.T @ compressed
    assert torch.allclose(seen["fc"], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


class TokensModel(nn.Module):
    """Embedding -> per-column gains -> tanh -> linear, called with a dict batch (HF style)."""

    def __init__(self, vocab=30, width=8, out=5, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb, self.fc = nn.Embedding(vocab, width), nn.Linear(width, out)
        # Columns that matter 30x more than others, as a LayerNorm's gains can make them.
        self.register_buffer("gain", torch.logspace(-1.0, 0.5, width)[torch.randperm(width, generator=gen)])

    def forward(self, input_ids, attention_mask):
        return self.fc(torch.tanh(self.emb(input_ids) * self.gain)) * attention_mask.unsqueeze(-1)


def reference_output_metric(model, batches):
    """sum over real tokens of J_t^T J_t, J_t the exact Jacobian of the token's output (float64)."""
    m = TokensModel(model.emb.num_embeddings, model.emb.embedding_dim, model.fc.out_features).double()
    m.load_state_dict(model.state_dict())
    total = torch.zeros(m.emb.embedding_dim, m.emb.embedding_dim, dtype=torch.float64)
    for b in batches:
        for e, keep in zip(m.emb(b["input_ids"]).detach().reshape(-1, total.shape[0]), b["attention_mask"].flatten()):
            if keep:  # each token's output depends on its own embedding row only
                j = torch.autograd.functional.jacobian(lambda r: m.fc(torch.tanh(r * m.gain)), e)
                total += j.T @ j
    return total


def test_output_metric_estimates_the_jacobian_gram_over_real_tokens():
    model = TokensModel(seed=int(torch.randint(0, 2**31, ())))
    batches = []
    for n in (3, 4):
        ids, mask = torch.randint(0, 30, (n, 7)), torch.ones(n, 7, dtype=torch.long)
        mask[:, 5:] = 0  # padding: its outputs are zero here and get no direction either way
        mask[0, 2:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    ref = reference_output_metric(model, batches)
    got, = calibrate.output_metrics(model, [model.emb], batches, probes=1500)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    # A random estimate: 1500 probes per batch put it within a few percent of the exact sum.
    assert float((got - ref).norm()) < 0.08 * float(ref.norm())
    assert float((got.diagonal() / ref.diagonal() - 1).abs().max()) < 0.15
    unused = nn.Embedding(3, 8)
    assert calibrate.output_metrics(model, [unused], batches, probes=2) == [None]


@pytest.mark.parametrize("recipe", [[tz.Prune(pattern="2:4")], [tz.Prune(sparsity=0.6, score="sparsegpt")],
                                    [tz.Codebook(bits=2, granularity="layer")]])
def test_embeddings_calibrated_on_their_output_metric_beat_weights_alone(recipe):
    # The gains make some columns matter far more than their magnitude says: the calibrated
    # table (scored on the output metric) has a lower output error than the data-free one.
    # Summed over a few random models: one 2-bit codebook in about 60 comes out worse calibrated.
    errors = [0.0, 0.0]
    for _ in range(4):
        model = TokensModel(vocab=48, width=16, out=6, seed=int(torch.randint(0, 2**31, ())))
        draw = lambda n: {"input_ids": torch.randint(0, 48, (n, 11)), "attention_mask": torch.ones(n, 11, dtype=torch.long)}
        batches, held = [draw(16) for _ in range(4)], draw(64)
        kwargs = {"targets": ["Embedding"]}
        calibrated_recipe = [type(p)(**{**p.__dict__, **kwargs}) for p in recipe]
        free_recipe = [type(p)(**{**p.__dict__, **kwargs, **({"score": "magnitude"} if isinstance(p, tz.Prune) else
                                                             {"method": "kmeans"})}) for p in recipe]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the embedding is calibrated: no "weights alone" warning
            calibrated = tz.compress(model, calibrated_recipe, progress=False, calibration=batches)
        free = tz.compress(model, free_recipe, progress=False)
        with torch.no_grad():
            ref = model(**held)
            for i, m in enumerate((calibrated, free)):
                errors[i] += float((m(**held) - ref).double().pow(2).mean())
            table = calibrated.emb.weight
        if isinstance(recipe[0], tz.Prune):
            assert int((table == 0).sum()) == round((0.5 if recipe[0].pattern == "2:4" else 0.6) * table.numel())
    # Measured over seeds, one model each: pruning about 0.07-0.27 of the data-free error, 2-bit
    # codebooks 0.6 on average (0.94 and 1.23 seen in 60).
    assert errors[0] < (0.5 if isinstance(recipe[0], tz.Prune) else 0.85) * errors[1]


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.out_calls = 0

    def forward(self, x):
        self.out_calls += 1
        return self.out(self.q(x) * self.k(x))


def test_sweep_groups_shared_inputs_and_stops_early(monkeypatch):
    made = []
    rows_of = calibrate._Accumulator.rows_of
    monkeypatch.setattr(calibrate._Accumulator, "rows_of", lambda self, *a: made.append(1) or rows_of(self, *a))
    model = Branches()
    layers = [("out", model.out), ("k", model.k), ("q", model.q)]
    batches = [torch.randn(4, 6) for _ in range(5)]
    order = []
    hs = {}

    def compress_layer(i, h):
        order.append(layers[i][0])
        hs[layers[i][0]] = h

    counted = []
    model.out.register_forward_pre_hook(lambda m, a: counted.append(1))
    missed = calibrate.sweep(model, layers, batches, compress_layer)
    assert missed == []
    assert order == ["q", "k", "out"]  # call order; q and k share one pass over the batches
    assert len(counted) == 1 + len(batches)  # the order-finding call, then only out's own group
    ref = second_moment(batches)
    assert torch.allclose(hs["q"], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(hs["q"], hs["k"]) and hs["q"] is not hs["k"]
    assert len(made) == 2 * len(batches)  # q and k read one tensor: its X^T X is made once a batch


def test_conv_statistics_are_unfolded_patches():
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 7, 5)
    rows = calibrate.input_rows(conv, x)
    # Each row times the flattened weight is one output pixel.
    out = (rows @ conv.weight.detach().reshape(4, -1).T + conv.bias.detach()).view(2, -1, 4).transpose(1, 2)
    assert torch.allclose(out.reshape(2, 4, 4, 3), conv(x).detach(), atol=1e-5)
    conv1 = nn.Conv1d(3, 4, 3, padding=2, dilation=2)
    x1 = torch.randn(2, 3, 9)
    rows = calibrate.input_rows(conv1, x1)
    out = (rows @ conv1.weight.detach().reshape(4, -1).T + conv1.bias.detach()).view(2, -1, 4).transpose(1, 2)
    assert torch.allclose(out, conv1(x1).detach(), atol=1e-5)


def test_calibrated_conv_net_beats_data_free():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 25, 4))
    batches = [torch.randn(8, 3, 7, 7) * torch.tensor([3.0, 0.1, 1.0]).view(1, 3, 1, 1) for _ in range(2)]
    x = torch.randn(16, 3, 7, 7) * torch.tensor([3.0, 0.1, 1.0]).view(1, 3, 1, 1)
    recipe = [tz.Codebook(bits=2, granularity="channel")]
    free = tz.compress(model, recipe, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is calibrated: no fallback warning
        cal = tz.compress(model, recipe, progress=False, calibration=batches)
    assert output_mse(cal, model, x) < output_mse(free, model, x)


# ---- bad input: named errors before anything changes ---------------------------------------


def untouched(model, state):
    return not any(hasattr(m, "parametrizations") for m in model.modules()) and all(
        torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("calibration, match", [
    ([], "empty"),
    (iter(()), "empty"),
    (torch.randn(4, 8), "iterable of batches"),
    (5, "iterable of batches"),
    ([torch.randn(4, 8), torch.randn(4, 7)], "batch #1 cannot run"),
    ([{"input": torch.randn(2, 8), "extra": 1}], "batch #0 cannot run"),
])
def test_bad_calibration_data_is_refused_before_any_change(calibration, match):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tz.CalibrationError, match=match):
        tz.compress(model, [tz.Prune(pattern="2:4"), tz.Quantize()], inplace=True, progress=False, calibration=calibration)
    assert untouched(model, state)


@pytest.mark.parametrize("recipe", [[tz.Prune(score="wanda")], [tz.Prune(pattern="2:4", score="sparsegpt")],
                                    [tz.Quantize(method="gptq")], [tz.Codebook(method="weighted")],
                                    {"passes": [{"codebook": {"bits": 3, "method": "gptq"}}]}])
def test_data_methods_without_calibration_are_refused(recipe):
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tz.CalibrationError, match=r"1 layer\(s\) need calibration data \('\w+' on 1\)"):
        tz.compress(model, recipe, inplace=True, progress=False)  # the embedding takes no data either way
    assert untouched(model, state)


@pytest.mark.parametrize("args, match", [
    ({"score": "wanda", "end_step": 10}, "end_step null"),
    ({"score": "sparsegpt", "pattern": "channel"}, "not channels"),
    ({"score": "sparsegpt", "scope": "global"}, "scope 'layer'"),
    ({"score": "best"}, "score must be one of"),
    ({"score": "sparsegpt", "refit": "yes"}, "refit must be true or false"),
])
def test_prune_score_arguments(args, match):
    with pytest.raises(tz.RecipeError, match=match):
        tz.Prune(**args)


def test_method_arguments():
    with pytest.raises(tz.RecipeError, match="method must be one of"):
        tz.Quantize(method="awq")
    with pytest.raises(tz.RecipeError, match="start_step 0"):
        tz.Codebook(method="gptq", start_step=5)
    with pytest.raises(tz.RecipeError, match="float_targets needs calibration"):
        tz.Codebook(method="kmeans", float_targets=True)
    with pytest.raises(tz.RecipeError, match="float_targets must be true or false"):
        tz.Codebook(float_targets="yes")
    assert tz.Recipe.from_yaml("passes:\n  - prune: {pattern: '2:4', score: sparsegpt}\n  - quantize: {method: gptq}\n"
                               ).passes[1].method == "gptq"


def test_unused_calibration_warns_and_data_free_choices_ignore_it():
    model = nn.Sequential(nn.Linear(8, 6))
    with pytest.warns(UserWarning, match="no pass of the recipe uses it"):
        out = tz.compress(model, [tz.Quantize(method="round")], progress=False, calibration=[torch.randn(3, 8)])
    assert out[0].parametrizations.weight[0].scales is None


class Block(nn.Module):
    """A transformer-like block: attention-ish mixing under a mask, then an MLP, with residuals."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, mask, scale=1.0):
        att = (self.q(x) @ self.k(x).transpose(1, 2)) * scale + mask
        x = x + self.o(att.softmax(-1) @ self.v(x))
        return (x + self.down(torch.tanh(self.up(x))),)  # a tuple, as Hugging Face layers return


class Stack(nn.Module):
    def __init__(self, d=12, depth=3):
        super().__init__()
        self.inp, self.blocks, self.head = nn.Linear(5, d), nn.ModuleList(Block(d) for _ in range(depth)), nn.Linear(d, 3)

    def forward(self, x, attention_mask):
        mask = (1.0 - attention_mask[:, None, :].float()) * -1e4
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, mask, scale=0.5)[0]
        return self.head(h)


def test_block_reuse_gives_the_same_statistics_with_fewer_model_runs():
    torch.manual_seed(11)
    model = Stack()
    batches = []
    for n in (5, 7, 6):
        lengths = torch.randint(3, n + 1, (4,))
        batches.append({"x": torch.randn(4, n, 5), "attention_mask": (torch.arange(n) < lengths[:, None]).long()})
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    runs = {}
    for reuse in (True, False):
        hs, calls = {}, []
        handle = model.inp.register_forward_pre_hook(lambda m, a: calls.append(1))

        def compress_layer(i, h):
            hs[i] = h
            layers[i][1].weight.data.mul_(0.9)  # a change the later layers must see

        saved = {k: v.clone() for k, v in model.state_dict().items()}
        calibrate.sweep(model, layers, batches, compress_layer, reuse_blocks=reuse)
        handle.remove()
        model.load_state_dict(saved)
        runs[reuse] = hs, len(calls)
    (fast, fast_calls), (slow, slow_calls) = runs[True], runs[False]
    assert sorted(fast) == sorted(slow) == list(range(len(layers)))
    for i in fast:
        assert torch.equal(fast[i], slow[i]), layers[i][0]
    # The plan run, then the model runs for inp's group, to capture the first block's inputs and
    # for the head; the blocks' own groups re-run their block alone.
    assert fast_calls == 1 + 3 * len(batches)
    assert slow_calls == 1 + len(batches) * 14  # inp, 4 groups in each of 3 blocks, head
    # Padding tokens are left out: the head's statistics are those of the real tokens only.
    rows = []
    handle = model.head.register_forward_pre_hook(lambda m, a: rows.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    x = torch.cat([r[b["attention_mask"].bool()] for r, b in zip(rows, batches)]).double()
    head = [i for i, (n, _) in enumerate(layers) if n == "head"][0]
    model_h = x.T @ x
    assert not torch.allclose(model_h, fast[head])  # the head saw the compressed blocks' outputs
    first = [i for i, (n, _) in enumerate(layers) if n == "inp"][0]
    x0 = torch.cat([b["x"][b["attention_mask"].bool()] for b in batches]).double()
    assert torch.allclose(fast[first], x0.T @ x0, rtol=1e-5, atol=1e-6)


class InPlace(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x.mul_(1.0)  # changes its input in place: it cannot be re-run on cached inputs
        return self.b(torch.relu(self.a(x)))


def test_block_reuse_is_refused_for_blocks_that_change_their_inputs():
    model = nn.Sequential(nn.Linear(4, 6), InPlace(), InPlace())
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = calibrate._Plan(model, layers, torch.randn(3, 4))
    assert plan.blocks is None and len(plan.groups) == 5
    ok = calibrate._Plan(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)),
                         [], torch.randn(3, 4))
    assert ok.blocks is None  # nothing to calibrate: no block list chosen


@pytest.mark.parametrize("k, n, books, rows", [(23, 7, 6, 3), (300, 45, 16, 1), (150, 37, 16, 5), (150, 6, 16, 6)])
def test_refit_codebook_matches_float64_normal_equations_for_groups_and_unassigned(cpu_route, k, n, books, rows,
                                                                                   monkeypatch):
    from torchzip.passes import calibrated
    from torchzip.passes.calibrated import refit_codebook

    monkeypatch.setattr(calibrated, "REFIT_CHUNK_BYTES", 8 * books * books * 4)  # rows four at a time

    # 7 rows in groups of 3 (the last group has one row); 45 rows of 300 inputs (more than one of
    # the C kernel's blocks of rows and tiles of columns, both ragged); groups of 5; one book for all.
    data = correlated(n, k, seed=5)
    h = second_moment([data(80 + k)])
    w = torch.randn(n, k, dtype=torch.float64)
    assign = torch.randint(0, books, (n, k))
    assign[torch.rand(n, k) < 0.2] = -1  # pruned weights take no centroid
    assign[:, torch.randperm(k)[:books]] = torch.arange(books)  # every centroid used in every row
    old = torch.randn(-(-n // rows), books, dtype=torch.float64)
    got = refit_codebook(w, h, assign, old, group_rows=rows)
    lhs = torch.zeros(old.shape[0], books, books, dtype=torch.float64)
    rhs = torch.zeros(old.shape[0], books, dtype=torch.float64)
    for i in range(n):
        a = torch.nn.functional.one_hot(assign[i].clamp(min=0), books).double() * (assign[i] >= 0).double().unsqueeze(1)
        lhs[i // rows] += a.T @ h @ a
        rhs[i // rows] += a.T @ h @ w[i]
    ref = torch.linalg.solve(lhs, rhs)
    # H is summed in float32 inside: compare by the normal equations' residual and the objective
    # (a one-row group's system can be ill-conditioned, so the centroids themselves may differ
    # by more than float32 rounding while solving the equations as well).
    residual = torch.einsum("gij,gj->gi", lhs, got) - rhs
    assert float(residual.norm()) <= 1e-5 * float(rhs.norm())
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))

    def objective(c):
        err = w - torch.where(assign >= 0, c.repeat_interleave(rows, 0)[:n].gather(1, assign.clamp(min=0)), 0)
        return float(torch.einsum("ik,kl,il->", err, h, err))
    assert objective(got) <= objective(ref) * (1 + 1e-6)


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    from torchzip.passes.calibrated import inverse_hessian_factor

    k = 37
    h = second_moment([correlated(5, k, seed=7)(60)])
    h[4, :] = h[:, 4] = 0  # an input that never fired: unit diagonal, no feedback
    u = inverse_hessian_factor(h)
    hd = h.clone()
    hd[4, 4] = 1.0
    hd += 0.01 * torch.diagonal(hd).mean() * torch.eye(k, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)  # float64, the textbook route
    assert torch.equal(u, torch.triu(u)) and bool((torch.diagonal(u) > 0).all())
    assert torch.allclose(u, ref, rtol=1e-8, atol=1e-10 * float(ref.abs().max()))


def test_blocked_gram_matrix_is_the_float64_product(monkeypatch):
    monkeypatch.setattr(calibrate, "GRAM_BLOCK", 16)
    for k in (20, 32, 45, 70):  # one block (plain product), two exactly, ragged last blocks
        x = torch.randn(53, k) * torch.logspace(-1, 1, k)
        got, ref = calibrate.gram(x), x.double().T @ x.double()
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_a_tied_embedding_is_compressed_from_its_weights_with_a_warning_saying_why():
    model = TiedLM()
    batches = [torch.randint(0, 20, (4, 6)) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"emb \(its weight is tied to another layer's\)"):
        out = tz.compress(model, [tz.Prune(pattern="2:4")], progress=False, calibration=batches)
    assert out.emb.weight is out.head.weight or torch.equal(out.emb.weight, out.head.weight)
    assert int((out.emb.weight == 0).sum()) == out.emb.weight.numel() // 2
