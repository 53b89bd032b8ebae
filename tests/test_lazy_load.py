"""load into a meta-device skeleton, from a memory-mapped file: the same model, bit for bit."""

import warnings

import pytest
import torch
from torch import nn

import torchzip as tz
from torchzip.export import container


def build():
    return nn.Sequential(nn.Embedding(300, 96), nn.Linear(96, 700), nn.LayerNorm(700), nn.GELU(),
                         nn.Linear(700, 333), nn.Linear(333, 5))


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].device.type == "cpu" and sb[k].device.type == "cpu", k
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


def test_meta_skeleton_equals_ordinary_load(tmp_path, monkeypatch):
    model = tz.compress(build(), [tz.Quantize(targets=["Linear"], exclude=["5"]), tz.Codebook(bits=4, targets=["Embedding"])],
                        progress=False)
    path = tmp_path / "m.tzip"
    size = tz.export(model, path, progress=False)
    for mapped in (True, False):  # a file over MAP_AT_LEAST is memory-mapped
        monkeypatch.setattr(container, "MAP_AT_LEAST", 1024 if mapped else size + 1)
        ordinary = tz.load(path, build(), progress=False)
        with torch.device("meta"):
            skeleton = build()
        lazy = tz.load(path, skeleton, progress=False)
        same_state(ordinary, lazy)
        idx = torch.randint(0, 300, (3, 7))
        with torch.no_grad():
            assert torch.equal(lazy(idx), ordinary(idx))
            assert torch.equal(lazy(idx), tz.freeze(model)(idx))
        _, sections = container.read(path)
        assert isinstance(sections[0].obj, container.mmap.mmap) == mapped


class WithPositions(nn.Module):
    """Like BERT's position_ids: a buffer outside the state_dict, so not in the file."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("positions", torch.arange(8.0), persistent=False)

    def forward(self, x):
        return self.fc(x + self.positions)


def test_meta_skeleton_tensors_the_file_cannot_fill_are_named_in_a_warning(tmp_path):
    path = tmp_path / "m.tzip"
    tz.export(tz.compress(WithPositions(), [tz.Quantize()], progress=False), path, progress=False)
    with torch.device("meta"):
        skeleton = WithPositions()
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) of the skeleton are not in the file and stay on the meta device \(positions\)"):
        loaded = tz.load(path, skeleton, progress=False)
    assert loaded.positions.is_meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary skeleton: nothing to say
        tz.load(path, WithPositions(), progress=False)


class Buffers(nn.Module):
    """Tensors a meta skeleton cannot get back from a file: a non-persistent buffer computed in
    __init__ (one in a child, as BERT's embeddings hold theirs), beside a persistent one, a frozen
    parameter and one parameter registered under two names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.register_buffer("positions", torch.linspace(-1, 1, 24).exp(), persistent=False)
        self.norm = nn.LayerNorm(24)
        self.norm.register_buffer("offsets", torch.arange(24.0).sin(), persistent=False)
        self.register_buffer("counts", torch.zeros(24))
        self.scale = nn.Parameter(torch.ones(24), requires_grad=False)
        shared = nn.Parameter(torch.randn(37, 24))
        self.a, self.b = nn.Linear(24, 37), nn.Linear(24, 37)
        self.a.weight = shared
        self.b.weight = shared
        self.head = nn.Linear(37, 5)

    def forward(self, idx):
        x = self.norm(self.embed(idx) * self.positions) * self.scale + self.norm.offsets + self.counts
        return self.head(self.a(x) - self.b(x).relu())


def test_a_function_builds_the_skeleton_with_empty_weights_and_real_buffers(tmp_path):
    model = Buffers()
    with torch.no_grad():
        model.counts.uniform_()
        model.scale.uniform_()
    path = tmp_path / "m.tzip"
    tz.export(tz.compress(model, [tz.Quantize(targets=["Linear"], exclude=["head"]),
                                  tz.Codebook(bits=3, targets=["Embedding"], granularity="layer")], progress=False),
              path, progress=False)
    register = nn.Module.register_parameter
    with tz.empty_weights():
        empty = Buffers()
        assert all(p.is_meta for p in empty.parameters()) and not any(b.is_meta for b in empty.buffers())
        assert empty.a.weight is empty.b.weight and not empty.scale.requires_grad and empty.a.bias.requires_grad
    assert nn.Module.register_parameter is register and not nn.Linear(2, 2).weight.is_meta
    with pytest.raises(KeyError), tz.empty_weights():  # an error while building: the patch is undone
        raise KeyError("x")
    assert nn.Module.register_parameter is register
    ordinary = tz.load(path, Buffers(), progress=False)
    idx = torch.randint(0, 50, (3, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left on meta: nothing to say
        loaded = [tz.load(path, empty, progress=False), tz.load(path, Buffers, progress=False),
                  tz.load(path, lambda: Buffers(), device="cpu", progress=False)]
    with torch.no_grad():
        expected = ordinary(idx)
        for m in loaded:
            same_state(m, ordinary)
            for (n, b), (n2, b2) in zip(m.named_buffers(), ordinary.named_buffers()):
                assert n == n2 and torch.equal(b, b2), n
            assert m.a.packed is m.b.packed  # the shared parameter is one packed weight
            assert not any(t.is_meta for t in (*m.parameters(), *m.buffers()))
            grads = [(n, p.requires_grad) for n, p in m.named_parameters()]
            assert grads == [(n, p.requires_grad) for n, p in ordinary.named_parameters()]
            assert torch.equal(m(idx), expected)


def test_running_a_model_with_tensors_left_on_meta_raises_naming_them(tmp_path):
    path = tmp_path / "m.tzip"
    tz.export(tz.compress(Buffers(), [tz.Quantize()], progress=False), path, progress=False)
    ordinary = tz.load(path, Buffers(), progress=False)
    idx = torch.randint(0, 50, (2, 5))
    for device in (None, "cpu"):  # Module.to cannot copy out of meta: what is left there stays
        with torch.device("meta"):
            skeleton = Buffers()
        with pytest.warns(UserWarning, match=r"2 tensor\(s\) .* \(positions, norm\.offsets\); running the model raises "
                                             "MetaTensorError") as record:
            loaded = tz.load(path, skeleton, device=device, progress=False)
        assert record[0].filename == __file__  # it points at the caller
        assert loaded.positions.is_meta and loaded.norm.offsets.is_meta and not loaded.head.weight.is_meta
        with pytest.raises(tz.MetaTensorError, match=r"2 tensor\(s\) of Buffers are still on the meta device.*"
                                                     r"positions, norm\.offsets"):
            loaded(idx)
        with pytest.raises(tz.MetaTensorError, match=r"1 tensor\(s\) of LayerNorm .*: offsets\."):
            loaded.norm(torch.randn(3, 24))  # a submodule run alone
        loaded.positions = ordinary.positions.clone()
        with pytest.raises(tz.MetaTensorError, match=r"1 tensor\(s\) of Buffers .*: norm\.offsets\."):
            loaded(idx)
        loaded.norm.offsets = ordinary.norm.offsets.clone()
        with torch.no_grad():
            assert torch.equal(loaded(idx), ordinary(idx))
        assert not loaded._forward_pre_hooks and not loaded.norm._forward_pre_hooks  # the guards are gone


def test_a_failed_load_changes_nothing_it_was_given(tmp_path):
    path = tmp_path / "m.tzip"
    tz.export(tz.compress(Buffers(), [tz.Quantize()], progress=False), path, progress=False)
    bad = tmp_path / "bad.tzip"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # the dense section: its CRC fails
    bad.write_bytes(bytes(data))
    with torch.device("meta"):
        meta = Buffers()
    with tz.empty_weights():
        empty = Buffers()
    for skeleton in (meta, empty):
        before = {k: v for k, v in (*skeleton.named_parameters(), *skeleton.named_buffers())}
        modules = list(skeleton.modules())
        with pytest.raises(tz.FormatError):
            tz.load(bad, skeleton, progress=False)
        assert list(skeleton.modules()) == modules and not skeleton._forward_pre_hooks
        assert all(v is before[k] for k, v in (*skeleton.named_parameters(), *skeleton.named_buffers()))
    with pytest.raises(tz.FormatError):
        tz.load(bad, Buffers, progress=False)
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is undone
    with pytest.raises(tz.TorchzipError, match="must return the model .* got dict"):
        tz.load(path, dict, progress=False)
    with pytest.raises(tz.TorchzipError, match="an nn.Module.* or a function of no arguments .* got str"):
        tz.load(path, "Buffers", progress=False)


def test_each_layer_goes_to_the_target_device_as_it_is_decoded(tmp_path, monkeypatch):
    # No GPU here: the meta device stands in for "cuda". What matters is the order: a layer's
    # tensors leave the CPU before the next layer is decoded, so the CPU never holds the model.
    from torchzip.export import artifact

    model = tz.compress(build(), [tz.Quantize(targets=["Linear"], exclude=["5"]), tz.Codebook(bits=4, targets=["Embedding"])],
                        progress=False)
    path = tmp_path / "m.tzip"
    tz.export(model, path, progress=False)
    returned, seen = [], []
    real = artifact.decode_layer

    def spy(*args, **kwargs):
        seen.append([b.device.type for p in returned for b in p.buffers()])  # the layers decoded before this one
        out = real(*args, **kwargs)
        returned.append(out[0])
        return out

    monkeypatch.setattr(artifact, "decode_layer", spy)
    with torch.device("meta"):
        skeleton = build()
    plan = artifact._plan_load(path, skeleton, None, False, torch.device("meta"))  # what load(device=...) runs
    assert len(seen) == 3 and all(d == "meta" for devices in seen for d in devices) and len(seen[-1]) == 4
    assert all(t.is_meta for layer in plan.modules.values() for t in layer.state_dict().values())
    assert all(t.is_meta for t in plan.tensors.values())
    # The same plan on the CPU holds the same tensors.
    cpu = artifact._plan_load(path, build(), None, False)
    assert plan.modules.keys() == cpu.modules.keys() and plan.tensors.keys() == cpu.tensors.keys()
    for name, layer in plan.modules.items():
        for (k, a), (k2, b) in zip(layer.state_dict().items(), cpu.modules[name].state_dict().items()):
            assert k == k2 and a.shape == b.shape and a.dtype == b.dtype, (name, k)


def force_groups(monkeypatch, alphabet: int, groups: dict[int, int]) -> None:
    """Make export code a stream of ``alphabet`` symbols ``groups[its length]`` to a code (the
    encoder would pick the group that codes smallest)."""
    from torchzip.export import huffman

    real = huffman.encode

    def forced(symbols, alphabet_size=None, **kw):
        if alphabet_size == alphabet and symbols.size in groups:
            kw["group"] = groups[symbols.size]
        return real(symbols, alphabet_size, **kw)

    real_packed = huffman.encode_packed

    def forced_packed(data, bits, **kw):  # export codes 4-bit rows of whole words from their bytes
        if 2**bits == alphabet and data.size * (8 // bits) in groups:
            kw["group"] = groups[data.size * (8 // bits)]
        return real_packed(data, bits, **kw)

    monkeypatch.setattr(huffman, "encode", forced)
    monkeypatch.setattr(huffman, "encode_packed", forced_packed)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codebook_indices_decode_straight_into_packed_rows_bit_for_bit(tmp_path, monkeypatch, fresh_seed, bits):
    # Rows of whole words (K a multiple of 32 // bits) whose stream codes 8 // bits indices a code
    # decode straight into the packed words; other rows (padding fields in their last word) and
    # streams of one index a code take the byte-an-index route. Both give what freeze packed.
    from torchzip.export import codec, huffman

    torch.manual_seed(fresh_seed)
    per = 32 // bits
    shapes = [(67, 8 * per), (41, 5 * per + 3), (29, 4 * per)]  # (N, K)
    build_it = lambda: nn.Sequential(*[nn.Linear(k, n) for n, k in shapes])  # noqa: E731
    frozen = tz.freeze(tz.compress(build_it(), [tz.Codebook(bits=bits, granularity="layer")], progress=False))
    force_groups(monkeypatch, 2**bits, {n * k: g for (n, k), g in zip(shapes, (8 // bits, 8 // bits, 1))})
    path = tmp_path / "m.tzip"
    tz.export(frozen, path, progress=False)
    manifest, _ = container.read(path)
    assert {e["name"]: e["tensors"]["indices"]["group"] for e in manifest["layers"]} == {"0": 8 // bits, "1": 8 // bits, "2": 1}
    # Many small slabs of lanes, so slab boundaries fall inside rows.
    monkeypatch.setattr(huffman, "_DECODE_LANES", 1)
    monkeypatch.setattr(huffman, "_DECODE_BYTES", 7)
    direct = []
    real_codes = codec.StreamReader.codes_into
    monkeypatch.setattr(codec.StreamReader, "codes_into", lambda self, *a: direct.append(self.where) or real_codes(self, *a))
    for mapped in (True, False):
        monkeypatch.setattr(container, "MAP_AT_LEAST", 1024 if mapped else 1 << 40)
        with torch.device("meta"):
            skeleton = build_it()
        for loaded in (tz.load(path, skeleton, progress=False), tz.load(path, build_it(), progress=False)):
            same_state(loaded, frozen)
    straight = ["layer '0'"] + (["layer '2'"] if bits == 8 else [])  # 8-bit: one index a code is a byte
    assert direct == straight * 4, direct  # in each of the 4 loads


def test_codebook_straight_decode_rejects_a_corrupt_stream(tmp_path, monkeypatch):
    import hostile

    model = tz.freeze(tz.compress(nn.Sequential(nn.Linear(64, 40)), [tz.Codebook(bits=4, granularity="layer")],
                                  progress=False))
    force_groups(monkeypatch, 16, {64 * 40: 2})  # so the stream decodes straight into the packed rows
    path = tmp_path / "m.tzip"
    tz.export(model, path, progress=False)
    manifest, _ = hostile.split(path.read_bytes())
    spec = manifest["layers"][0]["tensors"]["indices"]
    assert spec["group"] == 2
    off, length = spec["payload"]
    cases = {"lane ends": lambda m, s: m["layers"][0]["tensors"]["indices"].update(chunk_median=spec["chunk_median"] + 1),
             "all ones": lambda m, s: s[0].__setitem__(slice(off, off + length), b"\xff" * length)}
    for name, corrupt in cases.items():
        m, s = hostile.split(path.read_bytes())
        corrupt(m, s)
        bad = tmp_path / f"{name}.tzip"
        bad.write_bytes(hostile.assemble(m, s))
        with pytest.raises(tz.FormatError, match="layer '0'.*indices"):
            tz.load(bad, nn.Sequential(nn.Linear(64, 40)), progress=False)
