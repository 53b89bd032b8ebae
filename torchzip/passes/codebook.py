"""Non-uniform quantization: k-means weight sharing with ``2**bits`` centroids (Deep Compression).

Each weight is replaced by its nearest centroid, per layer or per output channel. While
fine-tuning, assignments are fixed and centroids are trainable: indexing the centroids with the
assignments makes autograd sum the gradients of all weights sharing a centroid into it. Weights
pruned before clustering take no centroid and stay zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchzip.errors import RecipeError, TorchzipError
from torchzip.export.artifact import trim_heap
from torchzip.kernels import cpu
from torchzip.packed.bits import pack_bits, packed_words, unpack_fields
from torchzip.packed.values import HALF_DTYPES, CodebookValues
from torchzip.passes.base import check_choice, check_int, register_pass, weight_before
from torchzip.packed.layers import WeightView
from torchzip.passes.layer import LayerPass, attach
from torchzip.passes.prune import masks_of
from torchzip.progress import bar

INITS = ("linear", "kmeans++")
GRANULARITIES = ("auto", "channel", "layer", "group")
METHODS = ("auto", "kmeans", "weighted", "gptq")
CENTROID_DTYPES = ("float32", "float16")


def _seed_linear(lo: torch.Tensor, hi: torch.Tensor, k: int) -> torch.Tensor:
    # Evenly spaced between each group's min and max, so large weights keep a centroid (Han et al.).
    return lo + (hi - lo) * torch.linspace(0, 1, k, device=lo.device)


def _seed_kmeanspp(x: torch.Tensor, valid: torch.Tensor, k: int, gen: torch.Generator, sample: int = 1 << 15) -> torch.Tensor:
    # k-means++ seeding on at most `sample` points per group (sampling keeps it cheap on big layers).
    g, n = x.shape
    if n > sample:
        cols = torch.randperm(n, generator=gen)[:sample].to(x.device)
        x, valid = x[:, cols], valid[:, cols]
    w = valid.float() + 1e-12  # groups with no valid point still sample something
    centroids = torch.empty(g, k, device=x.device)
    centroids[:, 0] = x.gather(1, torch.multinomial(w.cpu(), 1, generator=gen).to(x.device)).squeeze(1)
    d2 = (x - centroids[:, :1]) ** 2
    for i in range(1, k):
        pick = torch.multinomial((d2 * valid + 1e-30 * w).cpu(), 1, generator=gen).to(x.device)
        centroids[:, i] = x.gather(1, pick).squeeze(1)
        d2 = torch.minimum(d2, (x - centroids[:, i : i + 1]) ** 2)
    return centroids


def assign_nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value (1-D per group: binary search on midpoints).

    A value exactly on a midpoint goes to the smaller centroid; equal centroids resolve to the
    first of them (a stable order), so the result is deterministic.
    """
    order = centroids.argsort(dim=1, stable=True)
    sorted_c = centroids.gather(1, order)
    mids = ((sorted_c[:, 1:] + sorted_c[:, :-1]) / 2).contiguous()
    return order.gather(1, torch.searchsorted(mids, x.contiguous()))


def _count_at_most(keys: torch.Tensor, coarse: torch.Tensor, block: int, mids: torch.Tensor) -> torch.Tensor:
    # searchsorted(keys, mids, right=True) in two levels: the last key of every block (small enough
    # to stay in cache) finds the block, then one window of `block` keys is compared. A plain binary
    # search over long rows misses the cache at every step, which made it the slowest part of Lloyd's.
    g, n = keys.shape
    if n < block:
        return torch.searchsorted(keys, mids, right=True)
    full = torch.searchsorted(coarse, mids, right=True)  # blocks whose keys are all <= mid
    start = (full * block).clamp(max=n - block)  # keys before start are <= mid too
    pos = start.unsqueeze(-1) + torch.arange(block, device=keys.device)
    inside = keys.gather(1, pos.flatten(1)).view(pos.shape)
    return start + (inside <= mids.unsqueeze(-1)).sum(-1)


def _run_sums(prefix: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    # Sums of the runs edges[j] .. edges[j+1] from inclusive running sums (no leading zero column).
    at = prefix.gather(1, (edges - 1).clamp(min=0))
    return torch.where(edges > 0, at, torch.zeros((), dtype=at.dtype, device=at.device)).diff(dim=1)


def _lloyd_sorted(x: torch.Tensor, valid: torch.Tensor | None, weights: torch.Tensor | None,
                  centroids: torch.Tensor | int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Lloyd's on sorted values: one sort, then each iteration is k binary searches per group.
    g, n = x.shape
    if valid is not None:  # entries without a centroid sort last, as +inf, and count for nothing
        x = torch.where(valid, x, torch.full((), float("inf"), device=x.device))
    keys, order = x.sort(1)
    n_valid = torch.full((g, 1), n, device=x.device) if valid is None else valid.sum(1, keepdim=True)
    live = None if valid is None else torch.arange(n, device=x.device) < n_valid
    if isinstance(centroids, int):  # linear seeds: the sorted row's first and last valid value
        lo, hi = keys[:, :1], keys.gather(1, (n_valid - 1).clamp(min=0))
        empty = n_valid == 0  # a group with no weight gets zeros
        lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
        centroids = _seed_linear(lo, hi, centroids)
    # The same iterations in C where it builds, a row per thread: the torch loop below runs ~30
    # small ops per iteration that do not spread over threads (the sort before them does), and
    # binary searches start from the last iteration's edges. Unweighted, C sums the keys itself.
    compiled = x.device.type == "cpu" and cpu.available()
    if compiled and weights is None:
        return cpu.lloyd_sorted(keys, order, n_valid, None, None, centroids, iterations)
    values = keys if live is None else torch.where(live, keys, torch.zeros((), device=x.device))
    sum_w = None
    if weights is not None:
        w = weights.gather(1, order)
        sum_w, values = w.cumsum(1, dtype=torch.float64), values * w
        del w
    sum_x = values.cumsum(1, dtype=torch.float64)
    del values
    if compiled:
        return cpu.lloyd_sorted(keys, order, n_valid, sum_x, sum_w, centroids, iterations)
    block = 16
    coarse = keys[:, block - 1::block].contiguous()
    zero, edges = torch.zeros_like(n_valid), None
    for _ in range(iterations):
        mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        # Cluster j holds the sorted values in (mids[j-1], mids[j]]: positions edges[j] .. edges[j+1].
        new = torch.cat([zero, _count_at_most(keys, coarse, block, mids).clamp(max=n_valid), n_valid], 1)
        if edges is not None and torch.equal(new, edges):
            break  # assignments settled: the centroids are already their means
        edges = new
        sums = _run_sums(sum_x, edges)
        counts = edges.diff(dim=1).double() if sum_w is None else _run_sums(sum_w, edges)
        centroids = torch.where(counts > 0, (sums / counts.clamp(min=1e-300)).float(), centroids)
    del sum_x, sum_w
    # Final assignment by the same midpoints: mark each cluster's first sorted position, count
    # marks (a cluster index per sorted position), and put the indices back in the input's order.
    mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    starts = _count_at_most(keys, coarse, block, mids)
    del keys
    marks = torch.zeros(g, n + 1, dtype=torch.int16, device=x.device)
    marks.scatter_add_(1, starts, torch.ones_like(starts, dtype=torch.int16))
    index = marks[:, :n].cumsum(1, dtype=torch.int16)
    del marks
    if live is not None:
        index.masked_fill_(~live, -1)
    return centroids, torch.empty_like(index).scatter_(1, order, index)


def kmeans_1d(x: torch.Tensor, valid: torch.Tensor, k: int, *, init: str = "linear", iterations: int = 25,
              seed: int = 0, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched 1-D k-means (Lloyd's) over rows of ``x`` ``[G, n]``, using only entries where ``valid``.

    ``weights`` (``[G, n]``, >= 0, optional): each point's weight in the squared error the
    clustering minimises (e.g. its input's second moment, for activation-aware codebooks).
    Returns ``(centroids [G, k], assign [G, n])``; ``assign`` is -1 where not ``valid``.
    Deterministic for a given ``seed`` (so every DDP rank computes the same codebook).

    In 1-D each cluster is a run of sorted values between two midpoints, so after one sort per
    group an iteration costs ``k`` binary searches and ``k`` prefix-sum differences per group
    instead of a pass over every value: the whole clustering costs about one sort. Ties: a value
    on a midpoint joins the smaller centroid; a centroid that loses all its points stays put.
    """
    centroids = torch.empty(x.shape[0], k, device=x.device)
    assign = torch.empty(x.shape, dtype=torch.long, device=x.device)
    for lo, hi, c, a in kmeans_blocks(x, valid, k, init=init, iterations=iterations, seed=seed, weights=weights):
        centroids[lo:hi], assign[lo:hi] = c, a
    return centroids, assign


def kmeans_blocks(w: torch.Tensor, valid: torch.Tensor | None, k: int, *, group_rows: int = 1, init: str = "linear",
                  iterations: int = 25, seed: int = 0, weights: torch.Tensor | None = None
                  ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """:func:`kmeans_1d` of each group of ``group_rows`` rows of ``w`` ``[N, K]`` (the last group
    may be shorter), a block of groups at a time, so its workspace is a block's, not the matrix's.

    ``valid`` None: every entry takes a centroid. Yields ``(start, stop, centroids, assign)`` for
    the rows ``start:stop`` of ``w``: ``centroids`` ``[groups in the block, k]`` and ``assign``
    ``[stop - start, K]`` int16, -1 where not valid. Rows are independent (a settled row stays
    settled), so the blocks give what one call over the whole matrix would. One codebook per
    layer is one block of the whole layer: its sort needs the layer's keys and order.
    """
    if not 1 <= k <= _MAX_K:  # assignments are int16 (the C kernel's and the torch path's alike)
        raise ValueError(f"k must be in 1..{_MAX_K} (int16 assignments), got {k}")
    n, cols = w.shape
    g = group_rows
    groups = -(-n // g)
    step = max(1, _CHUNK // max(1, g * cols))
    if valid is not None and not bool(valid.any()):  # e.g. a layer global pruning emptied: nothing to cluster
        for a in range(0, groups, step):
            lo, hi = a * g, min(n, (a + step) * g)
            yield lo, hi, torch.zeros(min(step, groups - a), k, device=w.device), \
                torch.full((hi - lo, cols), -1, dtype=torch.int16, device=w.device)
        return
    seeds = None
    if init != "linear":  # k-means++ samples over every group at once (one random stream)
        v = torch.ones_like(w, dtype=torch.bool) if valid is None else valid
        seeds = _seed_kmeanspp(grouped(w.float(), g), grouped(v, g), k, torch.Generator().manual_seed(seed))
        del v
        # Lloyd's keeps 1-D centroids in order, so sorted seeds make the midpoints adjacent pairs.
        seeds = seeds.sort(dim=1, stable=True).values.contiguous()
    for a in range(0, groups, step):
        b = min(groups, a + step)
        lo, hi = a * g, min(n, b * g)
        x, v = grouped(w[lo:hi].float(), g), None
        if valid is not None or (b - a) * g > hi - lo:  # a short last group is padded with invalid entries
            v = grouped(torch.ones_like(w[lo:hi], dtype=torch.bool) if valid is None else valid[lo:hi], g)
            v = None if bool(v.all()) else v
        wt = None
        if weights is not None:
            wt = weights[lo:hi].float()
            wt = grouped(wt if valid is None else torch.where(valid[lo:hi], wt, torch.zeros((), device=w.device)), g)
        c, assign = _lloyd_sorted(x, v, wt, k if seeds is None else seeds[a:b], iterations)
        del x, v, wt
        yield lo, hi, c, ungrouped(assign, hi - lo, cols)


_MAX_K = (1 << 15) - 1  # clusters an int16 assignment can name, besides -1
_CHUNK = 1 << 19  # values per block of rows (one row may be longer): the sort's workspace is ~30 bytes a value


def grouped(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` ``[N, K]`` as ``[ceil(N / rows), rows * K]``: one line per group of ``rows`` rows (the
    last group padded with False for a bool ``x``, 0 otherwise; pad with an invalid mask)."""
    n, k = x.shape
    groups = -(-n // rows)
    pad = groups * rows - n
    if pad:
        x = torch.cat([x, torch.zeros(pad, k, dtype=x.dtype, device=x.device)])
    return x.reshape(groups, rows * k)


def ungrouped(x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`grouped`: ``[G, rows * K]`` back to ``[n, K]``."""
    return x.reshape(-1, k)[:n]


def row_books(centroids: torch.Tensor, group_rows: int, n: int) -> torch.Tensor:
    """Per-row codebooks ``[n, k]`` from one codebook per group of ``group_rows`` rows."""
    return centroids.repeat_interleave(group_rows, 0)[:n]


REFITS = 2  # rounds of (GPTQ assignment, least-squares codebook) after weighted k-means


def _gptq_assign(w: torch.Tensor, h: torch.Tensor, centroids: torch.Tensor, keep: torch.Tensor | None,
                 order: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Assignments ``[N, K]`` (-1 outside ``keep``) chosen column by column with GPTQ's error
    feedback (columns in ``order``; ``factor``: the inverse Hessian factor in that order), each
    weight taking the centroid nearest to its updated value."""
    from torchzip.kernels import cpu
    from torchzip.passes.calibrated import gptq, nearest_centroid

    book = centroids.double()
    if w.device.type == "cpu" and cpu.available():
        return _gptq_assign_compiled(w, book, keep, order, factor)
    assign = torch.zeros(w.shape, dtype=torch.long, device=w.device)

    def nearest(j: int, col: torch.Tensor) -> torch.Tensor:
        idx = nearest_centroid(col, book)
        assign[:, j] = idx
        return book.gather(1, idx.unsqueeze(1)).squeeze(1) if book.shape[0] > 1 else book[0][idx]

    gptq(w, h, nearest, keep=keep, order=order, factor=factor)
    return assign if keep is None else torch.where(keep, assign, -1)


def _gptq_assign_compiled(w: torch.Tensor, book: torch.Tensor, keep: torch.Tensor | None, order: torch.Tensor,
                          factor: torch.Tensor) -> torch.Tensor:
    """:func:`_gptq_assign` with each block's column loop in C (rows run alone inside a block:
    no per-column torch calls), the updates between blocks as the same matmuls; bit for bit."""
    from torchzip.kernels import cpu
    from torchzip.passes.calibrated import _block, one_thread

    n, k = w.shape
    w = w[:, order].double()  # a copy, in visiting order
    keep = None if keep is None else keep[:, order]
    if keep is not None:
        w = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    assign = torch.empty(n, k, dtype=torch.long)
    block = _block(k, 1)
    with one_thread():  # as gptq: small steps, on a busy machine threads wait for each other
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            w1, err1 = w[:, i1:i2].clone(), torch.empty(n, i2 - i1, dtype=w.dtype)
            codes = torch.empty(n, i2 - i1, dtype=torch.long)
            cpu.gptq_codebook_block(w1, factor[i1:i2, i1:i2], book, None if keep is None else keep[:, i1:i2],
                                             codes, err1)
            assign[:, i1:i2] = codes
            w[:, i2:] -= err1 @ factor[i1:i2, i2:]
    back = torch.argsort(order)
    assign = assign[:, back]
    return assign if keep is None else torch.where(keep[:, back], assign, -1)


class CodebookQuant(nn.Module):
    """Parametrization: each weight becomes ``centroids[group, assign]`` (0 where pruned).

    The assignments are held bit-packed, ``bits`` wide in int32 words (the layout of
    :func:`~torchzip.packed.bits.pack_bits`): ``bits / 8`` bytes a weight, and ``freeze`` takes
    them as they are. A layer with a pruning mask also holds ``kept``, one bit a weight (0: no
    centroid). Until it is clustered (at ``start_step``) it passes the weight through unchanged.
    """

    role, key, schedule_key = "quantized", "codebook", "codebook"

    def __init__(self, weight: torch.Tensor, *, bits: int, granularity: str, init: str, iterations: int,
                 start_step: int, seed: int, view: WeightView | None = None, tensor: str = "weight",
                 centroid_dtype: str = "float32", group_rows: int = 1, masked: bool = False) -> None:
        super().__init__()
        self.centroid_dtype = centroid_dtype
        self.view, self.tensor = view or WeightView(), tensor
        rows, cols = self.view.matrix_shape(weight.shape)
        self.cols = cols
        # Rows sharing one codebook: 1 per channel, all for a layer, group_rows for groups.
        self.group_rows = {"channel": 1, "layer": rows}.get(granularity, min(group_rows, rows))
        groups = -(-rows // self.group_rows)
        self.bits, self.granularity, self.init, self.iterations = bits, granularity, init, iterations
        self.start_step, self.seed = start_step, seed
        self.centroids = nn.Parameter(torch.zeros(groups, 2**bits, device=weight.device))
        words = packed_words(cols, bits)
        self.register_buffer("assign", torch.zeros(rows, words, dtype=torch.int32, device=weight.device))
        # masked (a pruning mask comes before): which weights take a centroid, sized now so that
        # clustering later (start_step) fills buffers DDP already broadcasts, in place.
        self.register_buffer("kept", torch.zeros(rows, packed_words(cols, 1), dtype=torch.int32, device=weight.device)
                             if masked else None)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("clustered", torch.zeros((), dtype=torch.bool))
        self.latent = False  # see start_latent: assignments follow the master weight

    def fixes_at(self) -> int:
        return self.start_step

    @torch.no_grad()
    def cluster(self, w: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Run k-means on ``w`` (entries where ``keep`` is False take no centroid), a block of rows
        at a time, packing each block's assignments as it comes."""
        w2 = self.view.matrix(w.detach())
        valid = None if keep is None else self.view.matrix(keep)
        g = self.group_rows
        for lo, hi, centroids, assign in kmeans_blocks(w2, valid, 2**self.bits, group_rows=g, init=self.init,
                                                       iterations=self.iterations, seed=self.seed):
            self._store_centroids(lo // g, centroids)
            self._store(lo, assign)
        self.clustered.fill_(True)
        # The blocks' freed workspace sits between the layers' packed buffers: give it back, or
        # a big model's compress keeps a heap of it (glibc's mmap threshold rises past its size).
        trim_heap()

    @torch.no_grad()
    def set_codes(self, centroids: torch.Tensor, assign: torch.Tensor) -> None:
        """Fix the codebook (``[groups, 2**bits]``) and assignments (``[N, K]``, -1: no centroid)."""
        self._store_centroids(0, centroids)
        self._store_rows(assign)
        self.clustered.fill_(True)

    def _store_centroids(self, start: int, centroids: torch.Tensor) -> None:
        c = centroids.half().float() if self.centroid_dtype == "float16" else centroids
        self.centroids[start:start + c.shape[0]] = c

    def _store_rows(self, assign: torch.Tensor) -> None:
        # All [N, K] assignments, a block of rows at a time (their temporaries stay a block's).
        rows = max(1, (1 << 20) // max(1, self.cols))
        for r in range(0, assign.shape[0], rows):
            self._store(r, assign[r:r + rows].to(self.assign.device))

    def _store(self, start: int, assign: torch.Tensor) -> None:
        # Rows start.. of the [N, K] assignments (-1: no centroid), packed into the buffers in place.
        stop = start + assign.shape[0]
        kept = assign >= 0
        if self.kept is None and not bool(kept.all()):  # set_codes with -1 on a layer without a mask
            self.register_buffer("kept", torch.full_like(self.assign[:, :packed_words(self.cols, 1)], -1))
        self.assign[start:stop] = pack_bits(assign.clamp(min=0), self.bits)
        if self.kept is not None:
            self.kept[start:stop] = pack_bits(kept, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A state_dict saved before assignments were packed holds them as int8/int16 [N, K] (-1:
        # no centroid): pack them into this layer's buffers, then load the rest as usual.
        # Not yet clustered (start_step ahead: all -1), there is nothing to pack, and packing the
        # -1s would give an unmasked layer a `kept` buffer a freshly built one lacks.
        old = state_dict.get(prefix + "assign")
        if old is not None and old.dtype in (torch.int8, torch.int16) and tuple(old.shape) == (self.assign.shape[0], self.cols):
            saved_clustered = state_dict.get(prefix + "clustered")
            with torch.no_grad():
                if saved_clustered is not None and not bool(saved_clustered):
                    self.assign.zero_()
                    if self.kept is not None:
                        self.kept.zero_()
                else:
                    self._store_rows(old)
            state_dict = {**state_dict, prefix + "assign": self.assign.clone()}
            if self.kept is not None:
                state_dict[prefix + "kept"] = self.kept.clone()
        elif self.kept is None and isinstance(state_dict.get(prefix + "kept"), torch.Tensor):
            # Saved from a layer that set_codes gave -1 assignments without a pruning mask (so it
            # registered `kept` then): this freshly built layer takes those bits too.
            self.register_buffer("kept", torch.zeros(self.assign.shape[0], packed_words(self.cols, 1), dtype=torch.int32,
                                                     device=self.assign.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def indices(self) -> torch.Tensor:
        """The ``[N, K]`` assignments (int64), -1 where a weight takes no centroid."""
        idx = unpack_fields(self.assign, self.bits, self.cols, torch.int64)
        return idx if self.kept is None else idx.masked_fill_(~unpack_fields(self.kept, 1, self.cols, torch.bool), -1)

    def _book(self) -> torch.Tensor:
        book = self.centroids
        if self.centroid_dtype == "float16":  # what the file stores, with a straight-through gradient
            book = book + (book.detach().half().float() - book.detach())
        return book

    @torch.no_grad()
    def nearest(self, w: torch.Tensor) -> torch.Tensor:
        """For each weight of ``w`` (this layer's master weight), the index ``[N, K]`` of the
        nearest centroid of its row's codebook (as stored: fp16 with ``centroid_dtype``); -1
        where the layer keeps no weight."""
        m = self.view.matrix(w.detach()).float()
        n, k = m.shape
        idx = ungrouped(assign_nearest(grouped(m, self.group_rows), self._book().detach().float()), n, k)
        if self.kept is not None:
            idx.masked_fill_(~unpack_fields(self.kept, 1, self.cols, torch.bool), -1)
        return idx

    @torch.no_grad()
    def start_latent(self, module: nn.Module) -> None:
        """Latent weights: quantization-aware training that may move weights between centroids.

        The master weight (``module.parametrizations.<tensor>.original``) becomes the dequantized
        weight, so the layer computes what it did; from then on the forward gives every weight
        the centroid nearest to its master value, the gradient reaching the master weight
        straight through and the centroids summed over the weights that take them. Only the
        master weight or a pruning mask of it may come before the codebook. :meth:`settle`
        (``freeze`` and ``export`` call it) fixes the nearest assignments again."""
        if not bool(self.clustered):
            raise TorchzipError("latent weights need a clustered codebook (start_step not reached yet)")
        original = module.parametrizations[self.tensor].original
        values = self.view.tensor(self._lookup(self._book(), self.indices().clamp(min=0)), original.shape)
        original.copy_(values.to(original.dtype))
        if not torch.equal(self.nearest(weight_before(module, self, self.tensor)), self.indices()):
            # Equal centroids pick the first of them: same values, other indices. Anything else
            # means the codebook does not read the master weight as it is.
            same = torch.equal(self._lookup(self._book(), self.nearest(original).clamp(min=0)),
                               self._lookup(self._book(), self.indices().clamp(min=0)))
            if not same:
                raise TorchzipError(f"latent weights: the codebook on '{self.tensor}' does not read the master weight "
                                    "(only a pruning mask may come before it)")
        self.latent = True

    @torch.no_grad()
    def settle(self, w: torch.Tensor) -> None:
        """Leave latent mode: store each weight's nearest centroid to ``w`` (the master weight) as
        the fixed assignment."""
        if self.latent:
            self._store_rows(self.nearest(w))
            self.latent = False

    def _lookup(self, book: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # [N, K] values of the [N, K] indices into the row's table (row r reads r // group_rows);
        # 0 where the layer keeps no weight.
        if book.shape[0] > 1:
            first = torch.arange(idx.shape[0], dtype=idx.dtype, device=idx.device) // self.group_rows * 2**self.bits
            idx = idx + first.unsqueeze(1)
        values = book.reshape(-1).index_select(0, idx.reshape(-1)).view(idx.shape)
        if self.kept is not None:
            values = torch.where(unpack_fields(self.kept, 1, self.cols, torch.bool), values,
                                 torch.zeros((), device=values.device))
        return values

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.clustered):
            # The exact zero keeps the centroids in the graph, so DDP needs no unused-parameter search.
            return w + 0.0 * self.centroids.sum()
        book = self._book()
        if self.latent:  # nearest centroids of the master weight; its gradient goes straight through
            values = self._lookup(book, self.nearest(w).clamp(min=0)).to(w.dtype)
            return (self.view.tensor(values, w.shape) + (w - w.detach())).contiguous()
        # int32 indices into the flattened tables (row r reads table r // group_rows): index_select
        # takes them as they are, where gather would need int64 (twice the temporary).
        idx = unpack_fields(self.assign, self.bits, self.cols)
        if book.shape[0] > 1:
            first = torch.arange(idx.shape[0], dtype=torch.int32, device=idx.device) // self.group_rows * 2**self.bits
            idx += first.unsqueeze(1)
        values = book.reshape(-1).index_select(0, idx.view(-1)).view(idx.shape)
        del idx
        if self.kept is not None:
            values = torch.where(unpack_fields(self.kept, 1, self.cols, torch.bool), values,
                                 torch.zeros((), device=values.device))
        values = values.to(w.dtype)
        # + an exact zero that keeps the master weight in the graph, so DDP sees every parameter used.
        # contiguous: a transposed view (HF Conv1D) must reach the layer in the layout it stores.
        return (self.view.tensor(values, w.shape) + (w - w.detach())).contiguous()

    def describe(self, state, w: torch.Tensor) -> None:
        """For ``freeze``: the packed indices and codebook; weights without a centroid join the mask."""
        self.settle(w)
        if not bool(self.clustered):
            warnings.warn(f"freezing a codebook layer before its start_step ({self.start_step}, now at step "
                          f"{int(self.step)}): it is stored as float, not clustered", stacklevel=4)
            return
        kept = None
        if self.kept is not None:
            mask = unpack_fields(self.kept, 1, self.cols, torch.bool)
            if not bool(mask.all()):
                state.mask = mask if state.mask is None else state.mask & mask
                kept = self.kept
            del mask
        book = self.centroids.detach().float()
        half = self.centroid_dtype == "float16"
        if half:
            book = book.half().float()
        if state.dtype in HALF_DTYPES:  # what the layer computes anyway; the file then stores 16 bits
            book = book.to(state.dtype).float()
        rows, n = 1, self.assign.shape[0]
        if 1 < book.shape[0] < n:  # groups: per-row tables in memory, one per group in the file
            book, rows = row_books(book, self.group_rows, n), self.group_rows
        state.values = CodebookValues(self.assign, book, self.bits, (n, self.cols), kept=kept, half_table=half,
                                      group_rows=rows)

    @classmethod
    @torch.no_grad()
    def advance(cls, members: list[tuple[nn.Module, "CodebookQuant"]], to_end: bool = False) -> None:
        """One optimizer step (or, ``to_end``, to ``start_step``); cluster those whose time has come."""
        for module, quant in members:
            if to_end:
                quant.step.fill_(max(int(quant.step), quant.start_step))
            else:
                quant.step.add_(1)
            if not bool(quant.clustered) and int(quant.step) >= quant.start_step:
                quant.cluster(weight_before(module, quant, quant.tensor), _keep_mask(module, quant.tensor))


def codebook_of(module: nn.Module, tensor: str = "weight") -> CodebookQuant | None:
    """The :class:`CodebookQuant` parametrization on ``module.<tensor>``, if any."""
    if not parametrize.is_parametrized(module, tensor):
        return None
    return next((p for p in module.parametrizations[tensor] if isinstance(p, CodebookQuant)), None)


def clustered_codebooks(model: nn.Module) -> Iterator[tuple[nn.Module, str, CodebookQuant]]:
    """``(module, tensor name, codebook)`` for every clustered codebook in ``model``."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor in list(module.parametrizations.keys()):
                quant = codebook_of(module, tensor)
                if quant is not None and bool(quant.clustered):
                    yield module, tensor, quant


def latent_codebooks(model: nn.Module, on: bool = True) -> int:
    """Put every clustered codebook of ``model`` in latent mode (``on``; see
    :meth:`CodebookQuant.start_latent`) or settle them back onto fixed assignments; returns how
    many codebooks it changed."""
    count = 0
    for module, tensor, quant in clustered_codebooks(model):
        if quant.latent == on:
            continue
        if on:
            quant.start_latent(module)
        else:
            quant.settle(weight_before(module, quant, tensor))
        count += 1
    return count


def _keep_mask(module: nn.Module, tensor: str = "weight") -> torch.Tensor | None:
    mask = masks_of(module, tensor)
    return None if mask is None else mask.mask


def tables_outweigh(k: int, bits: int, dtype: torch.dtype) -> bool:
    """Whether a row of ``k`` weights stores fewer index bits than its own codebook would take
    (``2**bits`` centroids, 16 bits each for fp16/bf16 weights, else 32)."""
    return k * bits < 2**bits * (16 if dtype in HALF_DTYPES else 32)


@register_pass
@dataclass
class Codebook(LayerPass):
    """k-means weight sharing with ``2**bits`` centroids (``bits`` 1..8), one codebook per output
    channel (``granularity: channel``) or per layer. ``init``: ``linear`` (evenly spaced between
    min and max) or ``kmeans++``. ``start_step`` > 0 clusters later in fine-tuning (e.g. after a
    gradual prune has finished), the weight staying float until then."""

    key = "codebook"
    role = "quantized"
    bits: int = 4
    granularity: str = "auto"
    init: str = "linear"
    iterations: int = 25
    start_step: int = 0
    seed: int = 0
    method: str = "auto"
    centroid_dtype: str = "float32"
    group_rows: int = 16
    float_targets: bool = False
    block_tune: int = 0
    block_tune_lr: float = 1e-4

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` for argument values that cannot work."""
        if type(self.bits) is not int or not 1 <= self.bits <= 8:
            raise RecipeError(f"codebook bits must be an integer in 1..8, got {self.bits!r} in {where}")
        check_choice(where, "granularity", self.granularity, GRANULARITIES)
        check_choice(where, "init", self.init, INITS)
        check_int(where, "iterations", self.iterations, low=1)
        for key in ("start_step", "seed"):
            check_int(where, key, getattr(self, key))
        check_choice(where, "method", self.method, METHODS)
        check_choice(where, "centroid_dtype", self.centroid_dtype, CENTROID_DTYPES)
        check_int(where, "group_rows", self.group_rows, low=1)
        if not isinstance(self.float_targets, bool):
            raise RecipeError(f"codebook float_targets must be true or false, got {self.float_targets!r} in {where}")
        if self.float_targets and self.method == "kmeans":
            raise RecipeError(f"codebook float_targets needs calibration: it cannot go with method 'kmeans' in {where}")
        check_int(where, "block_tune", self.block_tune)
        if isinstance(self.block_tune_lr, bool) or not isinstance(self.block_tune_lr, (int, float)) or not 0 < self.block_tune_lr < float("inf"):
            raise RecipeError(f"codebook block_tune_lr must be a positive finite number, got {self.block_tune_lr!r} in {where}")
        if self.block_tune and (self.method == "kmeans" or self.start_step):
            raise RecipeError(f"codebook block_tune tunes codebooks clustered on calibration data when compressing: it "
                              f"cannot go with method 'kmeans' or a start_step in {where}")
        if self.needs_calibration() and self.start_step:
            raise RecipeError(f"codebook method '{self.method}' clusters on calibration data when compressing: it needs "
                              f"start_step 0 in {where}")

    def fixes_at(self) -> int:
        return self.start_step

    def needs_calibration(self) -> bool:
        """Activation-weighted k-means and GPTQ need calibration data."""
        return self.method in ("weighted", "gptq")

    def uses_calibration(self) -> bool:
        """Uses data when given, for codebooks clustered at once, unless ``method`` is ``kmeans``."""
        return self.method != "kmeans" and self.start_step == 0

    def fits_float_outputs(self) -> bool:
        """``float_targets``: each layer fits the float model's outputs (see :func:`float_target_weight`)."""
        return self.float_targets and self.uses_calibration()

    def block_tuning(self) -> tuple[int, float]:
        """``block_tune`` Adam steps at ``block_tune_lr`` per block (with calibration data)."""
        return self.block_tune, float(self.block_tune_lr)

    def _quant(self, module: nn.Module, tensor: str, view: WeightView) -> tuple[CodebookQuant, bool]:
        """An unclustered codebook for one tensor, and whether ``auto`` chose one per layer."""
        w = getattr(module, tensor)
        opts = {k: getattr(self, k) for k in ("bits", "granularity", "init", "iterations", "start_step", "seed",
                                              "centroid_dtype", "group_rows")}
        short = False
        if self.granularity == "auto":
            short = tables_outweigh(view.matrix_shape(w.shape)[1], self.bits,
                                    torch.float16 if self.centroid_dtype == "float16" else w.dtype)
            opts["granularity"] = "layer" if short else "channel"
        masked = _keep_mask(module, tensor) is not None
        return CodebookQuant(w, view=view, tensor=tensor, masked=masked, **opts), short

    def apply_calibrated(self, model: nn.Module, plan: list, group: str, progress: bool, batches: list) -> None:
        """As :meth:`LayerPass.apply_calibrated`, with one warning for rows too short (``auto``)."""
        super().apply_calibrated(model, plan, group, progress, batches)
        short = [name for name, m, _ in plan if getattr(codebook_of(m), "auto_layer", False)]
        if short:
            warnings.warn(f"codebook (granularity auto): {len(short)} tensor(s) have rows too short for per-channel "
                          f"codebooks, clustered per layer: {', '.join(short[:8])}" + (" ..." if len(short) > 8 else ""),
                          stacklevel=4)

    def compress_calibrated(self, name: str, module: nn.Module, h: torch.Tensor, group: str,
                            cross: torch.Tensor | None = None) -> None:
        """Cluster one layer by k-means weighted by its inputs' second moments (the diagonal of
        ``h``), then (``gptq``) assign columns in order with error feedback onto that codebook.
        ``cross`` (with ``float_targets``): the cross moment of the layer's float and compressed
        inputs; what is clustered is then the weight that best fits the float outputs."""
        from torchzip.passes.calibrated import act_order, float_target_weight, inverse_hessian_factor, refit_codebook

        (tensor, view), = self.tensors(module)
        quant, short = self._quant(module, tensor, view)
        quant.auto_layer = short  # for apply_calibrated's one warning
        w = view.matrix(getattr(module, tensor).detach()).float()
        if cross is not None and self.float_targets:
            w = float_target_weight(w, h, cross).float()
        keep = _keep_mask(module, tensor)
        valid = torch.ones_like(w, dtype=torch.bool) if keep is None else view.matrix(keep)
        weights = torch.diagonal(h).float().clamp(min=0).expand_as(w)
        k = 2**self.bits
        g, n = quant.group_rows, w.shape[0]
        centroids, flat = kmeans_1d(grouped(w, g), grouped(valid, g), k, init=self.init, iterations=self.iterations,
                                    seed=self.seed, weights=grouped(weights.contiguous(), g))
        assign = ungrouped(flat, n, w.shape[1])
        if self.method != "weighted":  # auto and gptq: error feedback onto the codebook, then refit it
            order = act_order(h)
            factor = inverse_hessian_factor(h[order][:, order])  # one factorisation for every round
            for _ in range(REFITS):
                books = centroids if centroids.shape[0] == 1 else row_books(centroids, g, n)
                assign = _gptq_assign(w, h, books, valid if keep is not None else None, order, factor)
                centroids = refit_codebook(w, h, assign, centroids, group_rows=g)
        quant.set_codes(centroids, assign)
        attach([(name, module, self)], lambda own, mod, t, v: quant)

    def apply(self, model: nn.Module, plan: list, group: str, progress: bool = False) -> None:
        """Attach codebooks to the planned layers, clustering now unless ``start_step`` > 0."""
        progress_bar = bar(None, progress, total=sum(len(own.tensors(m)) for _, m, own in plan), desc="k-means",
                           leave=False)
        short: list[str] = []

        def make(own: "Codebook", module: nn.Module, tensor: str, view: WeightView) -> CodebookQuant:
            w = getattr(module, tensor)
            quant, is_short = own._quant(module, tensor, view)
            if is_short:
                k = view.matrix_shape(w.shape)[1]
                short.append(f"{next(n for n, m, _ in plan if m is module)}.{tensor} ({k})")
            if own.start_step == 0:
                quant.cluster(w, _keep_mask(module, tensor))
            progress_bar.update()
            return quant

        attach(plan, make)
        progress_bar.close()
        if short:
            warnings.warn(f"codebook (granularity auto): {len(short)} tensor(s) have rows too short for per-channel "
                          f"codebooks (the {2**self.bits} centroids of a row would outweigh its indices), clustered "
                          f"per layer: {', '.join(short[:8])}" + (" ..." if len(short) > 8 else ""), stacklevel=4)
