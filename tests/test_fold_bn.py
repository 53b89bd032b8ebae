"""BatchNorm folding: exact in eval mode (float64), refused where it cannot be exact."""

import pytest
import torch
from torch import nn

import torchzip as tz


def randomize_norms(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=m.running_var.dtype) * 2 + 0.05)
            if m.weight is not None:
                m.weight.data.copy_(torch.randn(c, generator=gen, dtype=m.weight.dtype))
                m.bias.data.copy_(torch.randn(c, generator=gen, dtype=m.bias.dtype))
    return model


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 5, 3, bias=False), nn.BatchNorm1d(5)
        self.c3, self.b3 = nn.Conv3d(5, 4, (1, 2, 2), groups=1), nn.BatchNorm3d(4, affine=False)
        self.fc, self.b4 = nn.Linear(4 * 7, 6), nn.BatchNorm1d(6, eps=1e-3)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))            # [B, 5, 9]
        h = self.b3(self.c3(h.view(-1, 5, 1, 3, 3)))    # [B, 4, 1, 2, 2]
        return self.b4(self.fc(torch.cat([h.flatten(1), h.flatten(1)[:, :12]], 1)))


def test_folding_is_exact_in_float64_on_resnet():
    torchvision = pytest.importorskip("torchvision")
    model = randomize_norms(torchvision.models.resnet18(num_classes=7)).double().eval()
    x = torch.randn(2, 3, 33, 29, dtype=torch.float64)
    ref = model(x)
    folded = tz.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), ref, rtol=1e-10, atol=1e-10)


def test_folding_conv1d_conv3d_linear_with_and_without_bias_and_affine():
    model = randomize_norms(Mixed(), seed=1).double().eval()
    x = torch.randn(4, 3, 11, dtype=torch.float64)
    ref = model(x)
    with pytest.raises(tz.RecipeError, match="BatchNorm 'b4' follows a Linear.*example input"):
        tz.fold_batchnorm(model)  # a trace cannot show that b4 sees 2-D input
    tz.fold_batchnorm(model, example=x[:1])
    assert model.c1.bias is not None and isinstance(model.b4, nn.Identity)
    assert torch.allclose(model(x), ref, rtol=1e-10, atol=1e-10)


class TokensNorm(nn.Module):
    """BatchNorm1d over dim 1 of a Linear's [B, T, F] output: it normalises tokens, not features."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_then_batchnorm1d_on_3d_input_is_refused_and_2d_folds_through_compress():
    model = randomize_norms(TokensNorm(), seed=3).eval()
    tokens = torch.randn(2, 5, 4)  # T == out_features: shapes alone cannot tell the two apart
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tz.RecipeError, match=r"BatchNorm 'bn' after a Linear sees \[3\]-D input"):
        tz.compress(model, [tz.FoldBatchNorm(), tz.Quantize()], calibration=[tokens], inplace=True, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    rows = torch.randn(6, 4, dtype=torch.float64)
    model = model.double()
    ref = model(rows)
    folded = tz.compress(model, [tz.FoldBatchNorm()], calibration=[rows[:3]], progress=False)
    assert isinstance(folded.bn, nn.Identity) and torch.allclose(folded(rows), ref, rtol=1e-10, atol=1e-10)


class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class AfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.a(x)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.a(x)
        return self.bn(h) + h


@pytest.mark.parametrize("model, match", [(SharedNorm(), "called 2 times"), (AfterRelu(), "does not directly follow"),
                                          (Residual(), "also used elsewhere")])
def test_refusals_change_nothing(model, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tz.RecipeError, match=match):
        tz.compress(model, [tz.FoldBatchNorm(), tz.Quantize()], inplace=True, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.Identity) for m in model.modules())
    tz.fold_batchnorm(model, exclude=["bn"])  # excluded: left as it is
    assert isinstance(model.bn, nn.BatchNorm1d)


def test_fold_then_quantize_freeze_export_load(tmp_path):
    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))

    model = randomize_norms(build(), seed=2).eval()
    recipe = tz.Recipe.from_yaml("passes:\n  - fold_batchnorm: {}\n  - quantize: {}\n")
    student = tz.compress(model, recipe, progress=False)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    frozen = tz.freeze(student)
    assert isinstance(frozen[1], nn.Identity)  # the frozen model skips the BatchNorm
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(frozen(x), model(x), atol=0.05 * float(model(x).abs().max()))
    path = tmp_path / "m.tzip"
    tz.export(student, path, progress=False)
    loaded = tz.load(path, tz.fold_batchnorm(build()), progress=False)  # a folded skeleton
    assert torch.equal(loaded(x), frozen(x))
    lazy = tz.load(path, lambda: tz.fold_batchnorm(build()), progress=False)  # folded with empty weights
    assert torch.equal(lazy.eval()(x), frozen(x))
    with pytest.raises(tz.FormatError, match="folded skeleton"):  # an unfolded skeleton: told why
        tz.load(path, build, progress=False)
    with pytest.raises(tz.RecipeError, match="before every pass"):
        tz.compress(model, [tz.Quantize(), tz.FoldBatchNorm()], progress=False)
