import copy

import pytest
import torch
from torch import nn

import torchzip as tz
from torchzip.packed import CsrWeight, Int8Weight, Sparse24Weight


@pytest.mark.parametrize("group_size", [0, 8, 16])
def test_int8_error_at_most_half_a_scale(group_size):
    layer = nn.Linear(48, 29)
    model = tz.compress(nn.Sequential(layer), [tz.Quantize(group_size=group_size)], progress=False)
    frozen = tz.freeze(model)
    packed = frozen[0].packed
    assert isinstance(packed, Int8Weight) and packed.qweight.dtype == torch.int8
    w = layer.weight.detach().double()
    g = group_size or 48
    scale = packed.scales.double().repeat_interleave(g, dim=1)
    # Reference scale in float64: max |w| of the group / 127.
    ref_scale = w.view(29, -1, g).abs().amax(-1).repeat_interleave(g, dim=1) / 127
    assert torch.allclose(scale, ref_scale, rtol=1e-6)
    err = (packed.dequantize().double() - w).abs()
    # Half a step, plus the float32 rounding of q * scale itself (relative to |w|).
    assert bool((err <= scale / 2 * (1 + 1e-6) + 2**-23 * w.abs()).all())
    assert packed.qweight.abs().max() <= 127
    assert packed.nbytes() == 29 * 48 + 4 * 29 * (48 // g)


def test_fake_quant_trains_with_straight_through_gradient():
    layer = nn.Linear(16, 8)
    model = tz.compress(nn.Sequential(layer), [tz.Quantize()], progress=False)
    x = torch.randn(5, 16)
    model(x).sum().backward()
    grad = model[0].parametrizations.weight.original.grad
    # STE: d(sum(x W^T))/dW = ones^T x, as if the rounding were the identity.
    assert torch.allclose(grad, torch.ones(5, 8).T @ x)


@pytest.mark.parametrize("recipe", [
    [tz.Quantize()],
    [tz.Quantize(group_size=4)],
    [tz.Prune(pattern="2:4"), tz.Quantize()],
    [tz.Prune(sparsity=0.9), tz.Quantize(group_size=8)],
    [tz.Prune(sparsity=0.3), tz.Quantize()],
])
def test_frozen_equals_trainable(recipe):
    net = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 7), nn.Conv1d(7, 12, 4))
    model = tz.compress(nn.Sequential(*net[:3]), recipe, progress=False)
    x = torch.randn(9, 24)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # outputs must also match after training moved the masters
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        expected = model(x)
    frozen = tz.freeze(model)
    assert torch.equal(frozen(x), expected)
    kinds = {type(m[1].packed) if hasattr(m[1], "packed") else None for m in frozen.named_children()}
    assert kinds & {Int8Weight, Sparse24Weight, CsrWeight}


def test_quantize_bias_is_int8_exact_and_survives_freeze_and_export(tmp_path):
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5, bias=False), nn.Linear(5, 40))
    with pytest.warns(UserWarning, match="has no bias"):  # the general rule skips the bias-less layer
        model = tz.compress(net, [tz.Prune(sparsity=0.7), tz.Codebook(bits=3), tz.QuantizeBias()], progress=False)
    b = model[0].bias.detach().double()
    scale = b.abs().max() / 127  # reference in float64
    assert torch.allclose(b, torch.round(b / scale) * scale, atol=1e-6)
    assert (b - net[0].bias.detach().double()).abs().max() <= scale / 2 + 1e-7
    x = torch.randn(6, 20)
    reference = tz.freeze(copy.deepcopy(model))  # the same function with a plain bias tensor
    reference[0].bias.requires_grad_(True)
    reference(x).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()  # straight-through: the master bias gets the plain gradient
    assert torch.allclose(model[0].parametrizations.bias.original.grad, reference[0].bias.grad)
    opt.step()
    with torch.no_grad():
        expected = model(x)
    frozen = tz.freeze(model)
    assert torch.equal(frozen(x), expected)
    tz.export(frozen, tmp_path / "b.tzip", progress=False)
    manifest, _ = tz.read_manifest(tmp_path / "b.tzip")
    scaled = {e["name"]: "scale" in e["tensors"].get("bias", {}) for e in manifest["layers"]}
    assert scaled == {"0": True, "2": False, "3": True}  # stored as int8 + one scale
    loaded = tz.load(tmp_path / "b.tzip", nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5, bias=False), nn.Linear(5, 40)),
                     progress=False)
    assert torch.equal(loaded[0].bias, frozen[0].bias) and torch.equal(loaded(x), expected)
    with pytest.raises(tz.UnsupportedLayerError, match="no bias"):
        tz.compress(net, [tz.QuantizeBias(overrides={"2": {}})], progress=False)
