import pytest
import torch
from torch import nn

import torchzip as tz
import torchvision
from torchzip.packed import PackedConv, PackedLinear


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def check_totals(model_before, frozen):
    report = tz.summary(frozen, print_table=False)
    assert report.bytes == sum(r.bytes for r in report.rows)
    # Every float tensor of the original model is counted once, as fp32.
    fp32 = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in model_before.state_dict().values())
    assert report.fp32_bytes == fp32
    assert report.params == sum(t.numel() for t in model_before.state_dict().values() if t.is_floating_point())
    # Bytes of packed layers are the bytes of their tensors.
    for name, m in frozen.named_modules():
        if isinstance(m, (PackedLinear, PackedConv)):
            row = next(r for r in report.rows if r.name == name)
            assert row.bytes == sum(b.numel() * b.element_size() for b in m.buffers()) + \
                sum(p.numel() * p.element_size() for p in m.parameters())
    return report


RECIPES = {
    "int8": [tz.Quantize()],
    "codebook4": [tz.Codebook(bits=4)],
    "prune90_codebook": [tz.Prune(sparsity=0.9), tz.Codebook(bits=5, granularity="layer")],
    "sparse24_int8": [tz.Prune(pattern="2:4"), tz.Quantize()],
    "channel_int8": [tz.Prune(sparsity=0.5, pattern="channel"), tz.Quantize(group_size=8, targets=["Linear"])],
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_mlp_and_cnn(recipe):
    for model, x in ((nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10)), torch.randn(6, 40)),
                     (small_cnn().eval(), torch.randn(2, 3, 12, 12))):
        out = tz.compress(model, RECIPES[recipe], progress=False)
        with torch.no_grad():
            expected = out(x)
        frozen = tz.freeze(out)
        assert torch.equal(frozen(x), expected)
        report = check_totals(model, frozen)
        assert report.ratio > 1.2


@pytest.mark.parametrize("recipe,min_ratio", [("int8", 3.9), ("sparse24_int8", 5.0), ("prune90_codebook", 10.0)])
def test_resnet18(recipe, min_ratio):
    model = torchvision.models.resnet18(num_classes=10).eval()
    out = tz.compress(model, RECIPES[recipe], progress=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = out(x)
        frozen = tz.freeze(out)
        assert torch.allclose(frozen(x), expected, rtol=1e-4, atol=1e-5)
    report = check_totals(model, frozen)
    assert report.ratio > min_ratio
    packed = [m for m in frozen.modules() if isinstance(m, (PackedLinear, PackedConv))]
    assert len(packed) >= 20


def test_summary_and_freeze_of_a_copy_leave_the_trainable_model_working():
    import copy

    model = tz.compress(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), [tz.Prune(sparsity=0.9), tz.Quantize()], progress=False)
    x = torch.randn(2, 8)
    before = model(x)
    tz.summary(model, print_table=False)
    tz.freeze(copy.deepcopy(model))
    assert torch.equal(model(x), before)
    assert hasattr(model[0], "parametrizations")


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv1d(6, 12, 5, padding="same", groups=3, padding_mode="reflect"),
    lambda: nn.Conv2d(6, 12, 3, padding="same", dilation=2, padding_mode="circular"),
    lambda: nn.Conv2d(4, 8, (3, 2), stride=2, padding=(1, 2), padding_mode="replicate"),
    lambda: nn.Conv1d(4, 8, 3, padding="valid", padding_mode="reflect"),
])
def test_conv_variants_freeze_export_and_load(conv, tmp_path):
    layer = conv()
    x = torch.randn(2, layer.in_channels, *([9] * (layer.weight.dim() - 2)))
    model = tz.compress(nn.Sequential(layer), [tz.Codebook(bits=3)], progress=False)
    with torch.no_grad():
        expected = model(x)
    frozen = tz.freeze(model)
    assert torch.equal(frozen(x), expected)
    tz.export(frozen, tmp_path / "c.tzip", progress=False)
    skeleton = nn.Sequential(conv())
    assert torch.equal(tz.load(tmp_path / "c.tzip", skeleton, progress=False)(x), expected)


def test_freezing_before_a_delayed_codebook_clusters_warns():
    model = tz.compress(nn.Sequential(nn.Linear(8, 8)), [tz.Codebook(start_step=5)], progress=False)
    with pytest.warns(UserWarning, match="before its start_step"):
        tz.freeze(model)
