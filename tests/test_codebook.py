import numpy as np
import pytest
import torch
from torch import nn

import torchzip as tz
from torchzip.packed import CodebookWeight, CsrWeight, Sparse24Weight
from torchzip.passes.codebook import codebook_of, kmeans_1d


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_at_most_2_pow_bits_values_per_group(bits, granularity):
    layer = nn.Linear(1500, 13)  # rows long enough that 8-bit per-channel tables still pay
    model = tz.compress(nn.Sequential(layer), [tz.Codebook(bits=bits, granularity=granularity)], progress=False)
    w = model[0].weight.detach()
    groups = w if granularity == "channel" else w.reshape(1, -1)
    for row in groups:
        assert row.unique().numel() <= 2**bits
    frozen = tz.freeze(model)
    assert isinstance(frozen[0].packed, CodebookWeight)
    assert torch.equal(frozen[0].packed.dequantize(), w)


@pytest.mark.parametrize("init", ["linear", "kmeans++"])
def test_kmeans_beats_uniform_grid_on_gaussian(init):
    x = torch.randn(4, 5000, dtype=torch.float64)
    for bits in (2, 3, 4):
        k = 2**bits
        centroids, assign = kmeans_1d(x.float(), torch.ones_like(x, dtype=torch.bool), k, init=init, iterations=50)
        km = ((centroids.double().gather(1, assign) - x) ** 2).mean()
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        grid = lo + (hi - lo) * torch.linspace(0, 1, k, dtype=torch.float64)
        uni = ((x.unsqueeze(-1) - grid.unsqueeze(1)) ** 2).amin(-1).mean()
        assert km < 0.8 * uni, (bits, float(km), float(uni))
        # Every point sits at its nearest centroid (a fixed point of Lloyd's assignment step).
        nearest = (x.unsqueeze(-1) - centroids.double().unsqueeze(1)).abs().argmin(-1)
        d_assigned = (x - centroids.double().gather(1, assign)).abs()
        d_best = (x - centroids.double().gather(1, nearest)).abs()
        assert torch.allclose(d_assigned, d_best)


def test_centroid_gradient_is_sum_of_shared_weight_gradients():
    layer = nn.Linear(20, 6)
    model = tz.compress(nn.Sequential(layer), [tz.Codebook(bits=2, granularity="channel")], progress=False)
    quant = codebook_of(model[0])
    x = torch.randn(7, 20, dtype=torch.float64)
    model(x.float()).sum().backward()
    dw = (torch.ones(7, 6, dtype=torch.float64).T @ x)  # dL/dW in float64
    ref = torch.zeros(6, 4, dtype=torch.float64).scatter_add_(1, quant.indices(), dw)
    assert torch.allclose(quant.centroids.grad.double(), ref, rtol=1e-5, atol=1e-5)


def test_pruned_zeros_take_no_centroid_and_stay_zero():
    model = tz.compress(nn.Sequential(nn.Linear(64, 32)), [tz.Prune(sparsity=0.75), tz.Codebook(bits=4, granularity="channel")],
                        progress=False)
    pruned = model[0].weight == 0
    quant = codebook_of(model[0])
    assign = quant.indices()
    assert bool((assign[pruned] == -1).all()) and bool((assign[~pruned] >= 0).all())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(20):
        opt.zero_grad()
        model(torch.randn(8, 64)).pow(2).sum().backward()
        opt.step()
    assert bool((model[0].weight[pruned] == 0).all())
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    frozen = tz.freeze(model)
    assert isinstance(frozen[0].packed, CsrWeight) and frozen[0].packed.kind == "codebook"
    assert frozen[0].packed.values.numel() == int((~pruned).sum())
    assert torch.equal(frozen(x), expected)


def test_24_codebook_packs_semi_structured():
    model = tz.compress(nn.Sequential(nn.Linear(32, 16)), [tz.Prune(pattern="2:4"), tz.Codebook(bits=3)], progress=False)
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = model(x)
    frozen = tz.freeze(model)
    assert isinstance(frozen[0].packed, Sparse24Weight)
    assert torch.equal(frozen(x), expected)


def test_delayed_clustering_after_gradual_prune():
    recipe = [tz.Prune(sparsity=0.8, end_step=10, frequency=2), tz.Codebook(bits=4, start_step=12)]
    model = tz.compress(nn.Sequential(nn.Linear(40, 24)), recipe, progress=False)
    quant = codebook_of(model[0])
    for step in range(1, 15):
        tz.step(model)
        assert bool(quant.clustered) == (step >= 12)
    w = model[0].weight
    assert int((w == 0).sum()) == round(0.8 * w.numel())
    assert w[w != 0].reshape(-1).unique().numel() <= 16 * 24
    for row in w:
        assert row[row != 0].unique().numel() <= 16


def test_codebook_before_prune_end_is_rejected():
    with pytest.raises(tz.RecipeError, match="start_step"):
        tz.compress(nn.Linear(8, 8), [tz.Prune(sparsity=0.5, end_step=10), tz.Codebook(start_step=5)], progress=False)


def test_weighted_kmeans_pulls_centroids_to_heavy_points():
    """With one centroid, k-means puts it at the (weighted) mean: the float64 reference."""
    x = torch.randn(3, 200, dtype=torch.float64)
    w = torch.rand(3, 200, dtype=torch.float64) ** 4
    valid = torch.rand(3, 200) > 0.2
    centroids, assign = kmeans_1d(x.float(), valid, 1, weights=w.float())
    want = (x * w * valid).sum(1) / (w * valid).sum(1)
    assert torch.allclose(centroids[:, 0].double(), want, rtol=1e-4, atol=1e-5)
    assert bool((assign[~valid] == -1).all()) and bool((assign[valid] == 0).all())


def test_pack_in_place_matches_pack_bits():
    # Loading packs decoded indices in their own buffer; it must equal packing a separate copy.
    from torchzip.packed.bits import pack_bits
    from torchzip.packed.codebook import _pack_in_place, _pack_in_place_ok

    gen = np.random.default_rng()
    for bits in range(1, 9):
        for n, k in [(1, 37), (7, 33), (300, 4099), (5, 8)]:
            ref = gen.integers(0, 2**bits, size=(n, k), dtype=np.uint8)
            buf = np.empty(n * k + int(gen.integers(0, 3)), np.uint8)  # decoders may pad the tail
            buf[:n * k] = ref.reshape(-1)
            if not _pack_in_place_ok(buf, n, k, bits):
                assert 4 * -(-k // (32 // bits)) > k  # only rows that would grow are refused
                continue
            got = _pack_in_place(buf, n, k, bits)
            assert torch.equal(got, pack_bits(torch.from_numpy(ref), bits))
            assert buf.nbytes == got.numel() * 4  # the index bytes past the packed words are handed back
    assert not _pack_in_place_ok(np.zeros(12, np.uint8), 4, 3, 4)  # 3 indices pack to a 4-byte word
    assert not _pack_in_place_ok(np.zeros(100, np.uint8)[10:], 2, 40, 4)  # a view: not its own memory


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_trainable_assignments_take_bits_over_8_bytes_a_weight(bits):
    """The trainable layer holds its indices packed: bits / 8 bytes a weight for rows that fill
    whole words (32 // bits fields a word: 3.2 bits for 3, 6.4 for 5), no second copy; its weight
    is the k-means result, and the frozen layer reuses the same words."""
    per = 32 // bits
    for rows, cols in [(24, per * 300), (5, per * 300 + 1)]:  # rows long enough that per-row tables pay
        layer = nn.Linear(cols, rows)
        w = layer.weight.detach().clone()
        model = tz.compress(nn.Sequential(layer), [tz.Codebook(bits=bits, granularity="channel")], progress=False)
        quant = codebook_of(model[0])
        assert quant.assign.dtype == torch.int32 and quant.kept is None
        assert quant.assign.numel() * 4 == rows * -(-cols // per) * 4
        if cols % per == 0 and 32 % bits == 0:
            assert quant.assign.numel() * 4 == rows * cols * bits // 8
        stored = {n: b for n, b in model.state_dict().items() if not n.endswith(("original", "centroids", "bias"))}
        assert sum(b.numel() * b.element_size() for b in stored.values()) == quant.assign.numel() * 4 + 8 + 1  # + step, clustered
        centroids, assign = kmeans_1d(w, torch.ones_like(w, dtype=torch.bool), 2**bits)
        assert torch.equal(quant.indices(), assign)
        assert torch.equal(model[0].weight.detach(), centroids.gather(1, assign))
        x = torch.randn(3, cols)
        with torch.no_grad():
            expected = model(x)
        words = quant.assign
        frozen = tz.freeze(model)
        assert frozen[0].packed.packed.data_ptr() == words.data_ptr()  # taken as it is, not copied
        assert torch.equal(frozen(x), expected)


def test_pruned_codebook_keeps_one_bit_a_weight_and_trains_its_centroids():
    layer = nn.Linear(96, 10)
    model = tz.compress(nn.Sequential(layer), [tz.Prune(sparsity=0.6), tz.Codebook(bits=3, granularity="group", group_rows=4)],
                        progress=False)
    quant = codebook_of(model[0])
    assert quant.kept.numel() * 4 == 10 * 96 // 8 and quant.assign.numel() * 4 == 10 * 10 * 4  # 10 indices a word
    pruned = model[0].weight.detach() == 0
    idx = quant.indices()
    assert torch.equal(idx == -1, pruned)
    book = quant.centroids.detach().repeat_interleave(4, 0)[:10]
    assert torch.equal(model[0].weight.detach(), torch.where(pruned, 0.0, book.gather(1, idx.clamp(min=0))))
    # The gradient of a centroid is the sum of the gradients of the kept weights sharing it (float64).
    x = torch.randn(7, 96, dtype=torch.float64)
    model(x.float()).sum().backward()
    dw = (torch.ones(7, 10, dtype=torch.float64).T @ x) * ~pruned
    per_row = torch.zeros(10, 8, dtype=torch.float64).scatter_add_(1, idx.clamp(min=0), dw)
    ref = torch.zeros(3, 8, dtype=torch.float64).index_add_(0, torch.arange(10) // 4, per_row)
    assert torch.allclose(quant.centroids.grad.double(), ref, rtol=1e-5, atol=1e-5)


def test_unpack_fields_matches_unpack_bits():
    from torchzip.packed.bits import pack_bits, unpack_bits, unpack_fields

    for bits in range(1, 9):
        for n, k in [(1, 1), (3, 37), (6, 64), (2, 0)]:
            idx = torch.randint(0, 2**bits, (n, k))
            packed = pack_bits(idx, bits)
            for dtype in (torch.int32, torch.int16, torch.uint8, torch.int64):
                got = unpack_fields(packed, bits, k, dtype)
                assert got.dtype == dtype and got.is_contiguous() and torch.equal(got.long(), unpack_bits(packed, bits, k))
            if bits == 1:
                assert torch.equal(unpack_fields(packed, 1, k, torch.bool), idx.bool())
            assert torch.equal(unpack_fields(packed[:, None].expand(n, 2, -1)[:, 1], bits, k), idx.int())  # strided rows


def test_state_dict_with_unpacked_assignments_still_loads():
    """A trainable checkpoint from before the packing (int8 [N, K] assignments, -1 where pruned)
    loads into today's layer with the same weights."""
    recipe = [tz.Prune(sparsity=0.5), tz.Codebook(bits=4, granularity="channel")]
    model = tz.compress(nn.Sequential(nn.Linear(70, 12)), recipe, progress=False)
    quant = codebook_of(model[0])
    legacy = {k: v for k, v in model.state_dict().items() if not k.endswith(".kept")}
    legacy["0.parametrizations.weight.1.assign"] = quant.indices().to(torch.int8)
    fresh = tz.compress(nn.Sequential(nn.Linear(70, 12)), recipe, progress=False)
    fresh.load_state_dict(legacy)
    assert torch.equal(codebook_of(fresh[0]).indices(), quant.indices())
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_state_dicts_with_kept_bits_load_into_freshly_compressed_layers():
    """A layer without a pruning mask that set_codes gave -1 assignments (it then holds `kept`),
    and a pre-packing checkpoint of a layer not yet clustered (all -1): both load into a freshly
    compressed model, whose own state_dict a third fresh one loads in turn."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 8))

    model = tz.compress(build(), [tz.Codebook(bits=4, granularity="layer")], progress=False)
    quant = codebook_of(model[0])
    idx = quant.indices()
    idx[0, :3] = -1
    quant.set_codes(quant.centroids.detach().clone(), idx)
    fresh = tz.compress(build(), [tz.Codebook(bits=4, granularity="layer")], progress=False)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(codebook_of(fresh[0]).indices(), idx)
    assert torch.equal(fresh[0].weight, model[0].weight) and bool((fresh[0].weight[0, :3] == 0).all())

    recipe = [tz.Codebook(bits=4, granularity="layer", start_step=2)]
    late = tz.compress(build(), recipe, progress=False)
    legacy = dict(late.state_dict())
    legacy["0.parametrizations.weight.0.assign"] = torch.full((8, 16), -1, dtype=torch.int8)  # what 4f5b47b saved
    loaded = tz.compress(build(), recipe, progress=False)
    loaded.load_state_dict(legacy)
    assert codebook_of(loaded[0]).kept is None
    tz.compress(build(), recipe, progress=False).load_state_dict(loaded.state_dict())
    for _ in range(2):
        tz.step(loaded)
    assert bool(codebook_of(loaded[0]).clustered) and bool((codebook_of(loaded[0]).indices() >= 0).all())
