"""Latent-weight codebook training (assignments follow float master weights), per-rate parameter
groups in finetune, and the standardized feature loss."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchzip as tz
from torchzip.passes.codebook import codebook_of, latent_codebooks


def _student(bits=3, granularity="channel", prune=False, **kw):
    teacher = nn.Sequential(nn.Linear(29, 19), nn.Tanh(), nn.Linear(19, 7))
    recipe = ([tz.Prune(sparsity=0.4)] if prune else []) + [tz.Codebook(bits=bits, granularity=granularity, **kw)]
    return teacher, tz.compress(teacher, recipe, progress=False)


def _brute_nearest(w, book, group_rows, kept):
    # Index of the nearest centroid of each weight's row table, by trying every centroid.
    rows = torch.arange(w.shape[0]) // group_rows
    tables = book[rows] if book.shape[0] > 1 else book.expand(w.shape[0], -1)
    idx = (w.double().unsqueeze(-1) - tables.double().unsqueeze(1)).abs().argmin(-1)
    return idx if kept is None else torch.where(kept, idx, -1)


@pytest.mark.parametrize("granularity,centroid_dtype,prune", [("channel", "float32", False), ("layer", "float16", False),
                                                              ("group", "float16", True)])
def test_latent_mode_keeps_outputs_then_reassigns_to_the_nearest_centroid(granularity, centroid_dtype, prune):
    _, student = _student(granularity=granularity, centroid_dtype=centroid_dtype, group_rows=4, prune=prune)
    x = torch.randn(11, 29)
    with torch.no_grad():
        before = student(x)
    assert latent_codebooks(student, True) == 2
    with torch.no_grad():
        assert torch.equal(student(x), before)  # master weights start at the dequantized weights
        layer = student[0]
        quant = codebook_of(layer)
        original = layer.parametrizations.weight.original
        original.add_(0.05 * torch.randn_like(original))  # move weights across midpoints
        book = quant.centroids.half().float() if centroid_dtype == "float16" else quant.centroids
        kept = None if quant.kept is None else quant.indices() >= 0
        ref = _brute_nearest(original * (1 if kept is None else kept), book, quant.group_rows, kept)
        latent_out = student(x)
    assert latent_codebooks(student, False) == 2
    assert torch.equal(quant.indices(), ref)
    with torch.no_grad():
        assert torch.allclose(student(x), latent_out, atol=1e-6)  # the fixed codes compute what latent did


def test_latent_gradients_are_straight_through_and_summed_into_centroids():
    _, student = _student(bits=2, granularity="channel")
    latent_codebooks(student, True)
    layer = student[0]
    quant, original = codebook_of(layer), layer.parametrizations.weight.original
    with torch.no_grad():
        original.add_(0.03 * torch.randn_like(original))
    x = torch.randn(6, 29)
    target = torch.randn(6, 19)
    F.mse_loss(layer(x), target, reduction="sum").backward()
    # float64 reference: the loss of the dequantized weight, differentiated by hand.
    idx = _brute_nearest(original.detach(), quant.centroids.detach(), 1, None)
    wq = quant.centroids.detach().double().gather(1, idx)
    x64 = x.double()
    grad_wq = 2 * (x64 @ wq.T + layer.bias.detach().double() - target.double()).T @ x64
    assert torch.allclose(original.grad.double(), grad_wq, rtol=1e-4, atol=1e-6)
    grad_book = torch.zeros_like(quant.centroids, dtype=torch.float64).scatter_add_(1, idx, grad_wq)
    assert torch.allclose(quant.centroids.grad.double(), grad_book, rtol=1e-4, atol=1e-6)


def test_latent_distillation_moves_assignments_and_exports_what_it_computes(tmp_path):
    teacher, student = _student(bits=2, granularity="layer")
    assign = [codebook_of(m).indices().clone() for m in (student[0], student[2])]
    batches = [(torch.randn(16, 29), None) for _ in range(6)]
    cb = tz.DistillationCallback(teacher, features={"": ""}, features_only=True, latent_weights=True)
    tz.finetune(student, batches, callbacks=[cb], epochs=3, lr=1e-3, param_lrs={"*.original": 3e-2}, progress=False)
    moved = [int((codebook_of(m).indices() != a).sum()) for m, a in zip((student[0], student[2]), assign)]
    assert all(n > 0 for n in moved)
    assert not any(codebook_of(m).latent for m in (student[0], student[2]))  # settled at the end
    x = torch.randn(9, 29)
    path = tmp_path / "m.tzip"
    tz.export(student, path, progress=False)
    with torch.no_grad():
        assert torch.allclose(tz.load(path, copy.deepcopy(teacher))(x), student(x), atol=1e-5)


def test_param_lrs_give_each_pattern_its_rate():
    _, student = _student()
    from torchzip.train.loop import _optimizer

    opt = _optimizer(student, [], None, 1e-3, {"*.original": 0.5, "2.bias": 0.25})
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in student.named_parameters():
        want = 0.5 if name.endswith(".original") else 0.25 if name == "2.bias" else 1e-3
        assert rate[id(p)] == want, name
    batches = [(torch.randn(4, 29), torch.randn(4, 7))]
    loss = lambda out, y: F.mse_loss(out, y)  # noqa: E731
    with pytest.raises(tz.TorchzipError, match="match no trainable parameter"):
        tz.finetune(student, batches, loss_fn=loss, param_lrs={"nothing.*": 1.0}, progress=False)
    with pytest.raises(tz.TorchzipError, match="learning rates"):
        tz.finetune(student, batches, loss_fn=loss, param_lrs={"*": -1.0}, progress=False)
    with pytest.raises(tz.TorchzipError, match="not both"):
        tz.finetune(student, batches, loss_fn=loss, param_lrs={"*": 1.0}, optimizer=torch.optim.SGD(student.parameters(), 0.1),
                    progress=False)


def test_latent_weights_arguments():
    with pytest.raises(tz.RecipeError, match="latent_weights"):
        tz.Recipe.from_yaml("passes:\n  - distill: {latent_weights: 1, features: [''], features_only: true}\n")
    teacher = nn.Linear(4, 3)
    student = nn.Linear(4, 3)
    cb = tz.DistillationCallback(teacher, features={"": ""}, features_only=True, latent_weights=True)
    with pytest.raises(tz.DistillationError, match="no clustered codebook"):
        tz.finetune(student, [(torch.randn(2, 4), None)], callbacks=[cb], progress=False)


def test_standardized_feature_loss_matches_a_float64_reference():
    teacher = nn.Sequential(nn.Linear(6, 5))
    with torch.no_grad():
        teacher[0].weight[2] *= 40  # an outlier channel
    student = tz.compress(teacher, [tz.Codebook(bits=2, granularity="layer")], progress=False)
    cb = tz.DistillationCallback(teacher, features={"": ""}, features_only=True, feature_loss="standardized",
                                 student=student)
    x = torch.randn(3, 7, 6)
    loss = cb.loss(student(x), None, x)
    with torch.no_grad():
        s, t = student(x).double(), teacher(x).double()
    flat = t.reshape(-1, 5)
    std = ((flat - flat.mean(0)) ** 2).sum(0).div(flat.shape[0]).sqrt()
    ref = (((s - t) / std.clamp(min=0.1 * std.mean())) ** 2).mean()  # the outlier can lift the floor over others
    assert torch.allclose(loss.detach().double(), ref, rtol=1e-5)
    with torch.no_grad():  # a constant channel: its scale is floored at a tenth of the mean std
        teacher[0].weight[4] = 0.0
        student[0].parametrizations.weight.original[4] = 0.0
    loss = cb.loss(student(x), None, x)
    with torch.no_grad():
        s, t = student(x).double(), teacher(x).double()
    flat = t.reshape(-1, 5)
    std = ((flat - flat.mean(0)) ** 2).sum(0).div(flat.shape[0]).sqrt()
    assert std[4] < 1e-6 < 0.1 * std.mean()
    ref = (((s - t) / std.clamp(min=0.1 * std.mean())) ** 2).mean()
    assert torch.allclose(loss.detach().double(), ref, rtol=1e-5)

    # One sample: no spread per channel, so every channel is scaled by the whole feature's spread.
    x1 = torch.randn(1, 6)
    loss = cb.loss(student(x1), None, x1)
    with torch.no_grad():
        s, t = student(x1).double(), teacher(x1).double()
    ref = (((s - t) / ((t - t.mean()) ** 2).mean().sqrt()) ** 2).mean()
    assert torch.isfinite(loss) and torch.allclose(loss.detach().double(), ref, rtol=1e-5)


def test_latent_distillation_that_fails_before_training_changes_nothing():
    teacher = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5))
    student = tz.compress(teacher, [tz.Codebook(bits=2, granularity="layer")], progress=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    batches = [(torch.randn(4, 12), None) for _ in range(3)]
    cb = tz.DistillationCallback(teacher, features={"0": "0"}, features_only=True, latent_weights=True)
    with pytest.raises(tz.TorchzipError, match="match no trainable parameter"):
        tz.finetune(student, batches, callbacks=[cb], param_lrs={"*.orignal": 3e-4}, progress=False)
    after = student.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "latent", False) for m in student.modules())
    # The same callback then trains (latent mode on, then settled) and leaves no hooks behind.
    tz.finetune(student, batches, callbacks=[cb], param_lrs={"*.original": 1e-2}, progress=False)
    assert not any(getattr(m, "latent", False) for m in student.modules())
    assert not any(m._forward_hooks for m in (*student.modules(), *teacher.modules()))
    student.train()
    student(torch.randn(2, 12)).sum().backward()
    copy.deepcopy(student)  # a captured activation with its graph would make this raise
