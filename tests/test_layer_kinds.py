"""Every layer kind through every kind of recipe: the frozen model computes exactly what the
trainable one did, a loaded model exactly what the frozen one does, in fp32 and in bf16; a frozen
model follows ``.to(dtype)``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import torchzip as tz
from conftest import plain_attention
from torchzip.packed.layers import PackedLayer


class Attention(nn.Module):
    """Self-attention, batch first, no weights returned (what transformer blocks do)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, **kwargs)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class CrossAttention(nn.Module):
    """Sequence-first cross-attention with both masks, returning the head-averaged weights too."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4)

    def forward(self, x):
        q, kv = x[:3], x  # 3 queries over 7 keys
        pad = torch.zeros(x.shape[1], x.shape[0], dtype=torch.bool)
        pad[0, -2:] = True
        causal = torch.triu(torch.ones(3, x.shape[0], dtype=torch.bool), diagonal=5)
        out, weights = self.attn(q, kv, kv, key_padding_mask=pad, attn_mask=causal)
        return out.sum() + weights.sum(), out, weights


class KvDims(nn.Module):
    """Attention whose keys and values are narrower: separate q/k/v projection weights."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, kdim=20, vdim=24, batch_first=True)

    def forward(self, x):
        return self.attn(x, x[..., :20], x[..., 8:], need_weights=True, average_attn_weights=False)


class ConvTransposes(nn.Module):
    def __init__(self):
        super().__init__()
        self.up2 = nn.ConvTranspose2d(8, 12, 3, stride=2, padding=1, output_padding=1)
        self.up1 = nn.ConvTranspose1d(4, 6, 4, stride=2, groups=2)
        self.up3 = nn.ConvTranspose3d(4, 4, 2, stride=2)

    def forward(self, x):
        y = self.up2(x, output_size=[2 * x.shape[-2], 2 * x.shape[-1]])
        z = self.up1(x[:, :4].flatten(2))
        w = self.up3(x[:, :4, None, :2])
        return y.sum() + z.sum() + w.sum(), y, z, w


class Recurrent(nn.Module):
    """A two-layer bidirectional LSTM and a GRU: every weight matrix packed, biases dense."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(32, 8, bias=False)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        z, hz = self.gru(y.transpose(0, 1))
        return y.sum() + z.sum(), y, h, c, z, hz


class Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 40, padding_idx=0)
        self.norm_emb = nn.Embedding(30, 40, max_norm=1.0)

    def forward(self, idx):
        return self.emb(idx) + self.norm_emb(idx % 30)


# kind -> (model factory, input factory)
KINDS = {
    "linear": (lambda: nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 12, bias=False)),
               lambda: torch.randn(5, 40)),
    "hf_conv1d": (lambda: nn.Sequential(Conv1D(24, 40), nn.GELU(), Conv1D(12, 24)), lambda: torch.randn(2, 3, 40)),
    "attention": (Attention, lambda: torch.randn(2, 7, 32)),
    "cross_attention": (CrossAttention, lambda: torch.randn(7, 2, 32)),
    "kv_dims": (KvDims, lambda: torch.randn(2, 5, 32)),
    "convs": (lambda: Convs(), lambda: torch.randn(2, 4, 4, 7, 7)),
    "conv_transpose": (ConvTransposes, lambda: torch.randn(2, 8, 5, 6)),
    "embedding": (Embeddings, lambda: torch.randint(0, 50, (3, 9))),
    "recurrent": (Recurrent, lambda: torch.randn(3, 5, 12)),
    "encoder_layer": (lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                      lambda: torch.randn(2, 6, 32)),
}


class Convs(nn.Module):
    """Conv3d, a grouped and a depthwise Conv2d (reflect padding), a Conv1d (circular, "same")."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(4, 8, 2)
        self.grouped = nn.Conv2d(24, 16, 2, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 2, groups=16, padding=1, padding_mode="reflect")
        self.c1 = nn.Conv1d(16, 8, 4, padding="same", padding_mode="circular")

    def forward(self, x):
        y = self.c3(x).flatten(1, 2)
        y = self.depthwise(self.grouped(y))
        return self.c1(y.flatten(2))


RECIPES = {
    "int8": [tz.Quantize()],
    "codebook": [tz.Codebook(bits=3, granularity="channel")],
    "sparse24_int8": [tz.Prune(pattern="2:4"), tz.Quantize(group_size=4)],
    "csr_codebook": [tz.Prune(sparsity=0.9), tz.Codebook(bits=4, granularity="layer")],
}


def outputs(model, x):
    with torch.no_grad(), plain_attention():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b) if u is not None) and len(a) == len(b)


def build(kind: str, dtype: torch.dtype):
    make, data = KINDS[kind]
    model = make().to(dtype).eval()
    return model, data().to(dtype) if data().is_floating_point() else data()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_equals_trainable_and_loaded_equals_frozen(kind, recipe, dtype, tmp_path, fresh_seed):
    model, x = build(kind, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers a pattern cannot take are skipped with a warning
        small = tz.compress(model, RECIPES[recipe], progress=False)
    expected = outputs(small, x)
    frozen = tz.freeze(small)
    packed = [m for m in frozen.modules() if isinstance(m, PackedLayer)]
    assert packed or recipe != "int8", "int8 always pays"
    assert same(outputs(frozen, x), expected), f"frozen differs from trainable (seed {fresh_seed})"
    tz.export(frozen, tmp_path / "m.tzip", progress=False)
    skeleton, _ = build(kind, dtype)
    loaded = tz.load(tmp_path / "m.tzip", skeleton, progress=False)
    assert same(outputs(loaded, x), expected), f"loaded differs from frozen (seed {fresh_seed})"
    assert {type(m).__name__ for m in loaded.modules()} == {type(m).__name__ for m in frozen.modules()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_model_follows_to_dtype(kind):
    model, x = build(kind, torch.float32)
    frozen = tz.freeze(tz.compress(model, [tz.Quantize()], progress=False))
    reference = outputs(frozen, x)
    kept = {n: b.clone() for n, b in frozen.named_buffers() if not b.is_floating_point() or n.endswith("scales")}
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16)):
        low = cast(frozen)
        for n, b in low.named_buffers():
            if n in kept:  # packed integers untouched; the kernels' fp32 side tables not rounded
                assert b.dtype == kept[n].dtype and torch.equal(b, kept[n]), n
        xi = x.to(dtype) if x.is_floating_point() else x
        got = outputs(low, xi)
        for g, r in zip(got, reference):
            if g is not None:
                assert g.dtype == dtype
                if r.dim() == 0:  # a signed sum cancels: its relative error says nothing about the layers
                    continue
                err = ((g.float() - r).norm() / r.norm().clamp_min(1e-6)).item()
                assert err < 2e-2, (kind, dtype, err)


def test_encoder_layer_runs_the_packed_path_not_the_fused_fast_path(monkeypatch):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    frozen = tz.freeze(tz.compress(layer, [tz.Quantize()], progress=False))
    calls = []
    real = tz.packed.Int8Weight.linear
    monkeypatch.setattr(tz.packed.Int8Weight, "linear", lambda self, x, b=None: calls.append(self.shape) or real(self, x, b))
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        got = frozen(x)
        dense = layer(x)  # the dense layer takes its fused fast path here
    assert sorted(calls) == sorted([(96, 32), (32, 32), (64, 32), (32, 64)])  # qkv, out_proj, linear1, linear2
    assert ((got - dense).norm() / dense.norm()).item() < 2e-2  # int8 error only


def test_unsupported_layer_named_in_overrides_is_a_named_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GRU(8, 8))
    with pytest.raises(tz.UnsupportedLayerError, match=r"override '1' names layer '1' \(LayerNorm\).*kinds: \["):
        tz.compress(model, [tz.Quantize(overrides={"1": {"group_size": 4}})], progress=False)
    with pytest.raises(tz.UnsupportedLayerError, match=r"'0' \(Linear\).*'Linear' is not among this pass's targets"):
        tz.compress(model, [tz.Quantize(targets=["Conv2d"], overrides={"0": {}})], progress=False)


def test_a_layer_kind_added_from_outside_can_be_targeted():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class PackedScaled(tz.packed.PackedLinear):
        def forward(self, x):
            return 2 * super().forward(x)

    kind = tz.register_layer_kind(tz.LayerKind("Scaled", Scaled, lambda m, p, b: PackedScaled(p["weight"], b["weight"],
                                                                                              "Scaled")))
    try:
        model = nn.Sequential(Scaled(16, 8))
        with pytest.raises(tz.RecipeError, match="no layer of the model is targeted"):
            tz.compress(model, [tz.Quantize()], progress=False)  # exact types: a Linear subclass is not a Linear
        small = tz.compress(model, [tz.Quantize(targets=["Scaled"])], progress=False)
        x = torch.randn(3, 16)
        with torch.no_grad():
            assert torch.equal(tz.freeze(small)(x), small(x))
    finally:
        del tz.packed.LAYER_KINDS[kind.name]


class RecurrentAttention(nn.Module):
    """An LSTM feeding attention with learned key/value biases (``add_bias_kv``: dense extras)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(12, 32, batch_first=True)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True)

    def forward(self, x):
        y = self.lstm(x)[0]
        return self.attn(y, y, y)[0]


def tiny_vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=24)


# Kinds whose biases the skeleton's own init may leave at zero (MHA's in_proj_bias, Conv1D): a
# skeleton that happens to hold the right bias cannot tell a dropped bias from a restored one.
BIAS_KINDS = {**KINDS, "recurrent_attention": (RecurrentAttention, lambda: torch.randn(2, 5, 12)),
              "vit": (tiny_vit, lambda: torch.randn(2, 3, 16, 16))}


@pytest.mark.parametrize("recipe", ["int8", "codebook"])
@pytest.mark.parametrize("kind", list(BIAS_KINDS))
def test_loaded_restores_every_bias_bit_for_bit(kind, recipe, tmp_path, fresh_seed):
    make, data = BIAS_KINDS[kind]
    model, x = make().eval(), data()
    with torch.no_grad():
        biases = [p for n, p in model.named_parameters() if "bias" in n.rpartition(".")[2]]
        assert biases or kind == "embedding"
        for p in biases:
            p.normal_()  # non-zero, and unlike any skeleton's init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows too short for per-channel codebooks: clustered per layer
        frozen = tz.freeze(tz.compress(model, RECIPES[recipe], progress=False))
    tz.export(frozen, tmp_path / "m.tzip", progress=False)
    want, expected = frozen.state_dict(), outputs(frozen, x)
    for skeleton in (make(), make):  # an ordinary skeleton, and a build function (built on meta)
        loaded = tz.load(tmp_path / "m.tzip", skeleton, progress=False).eval()
        got = loaded.state_dict()
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert not got[key].is_meta and torch.equal(got[key], value), f"{kind}: {key} (seed {fresh_seed})"
        assert same(outputs(loaded, x), expected), f"{kind}: loaded differs from frozen (seed {fresh_seed})"
