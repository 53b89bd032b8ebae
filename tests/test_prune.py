import copy

import pytest
import torch
from torch import nn

import torchzip as tz
from torchzip.passes.prune import Mask, cubic_sparsity, masks_of


def mlp():
    return nn.Sequential(nn.Linear(37, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97])
def test_unstructured_reaches_exact_sparsity(sparsity):
    model = tz.compress(mlp(), [tz.Prune(sparsity=sparsity)], progress=False)
    for layer in model:
        if isinstance(layer, nn.Linear):
            zeros = int((layer.weight == 0).sum())
            assert zeros == round(sparsity * layer.weight.numel())
            # The kept weights are the largest in magnitude.
            w = layer.parametrizations.weight.original.detach().abs()
            kept, pruned = w[layer.weight != 0], w[layer.weight == 0]
            if len(kept) and len(pruned):
                assert kept.min() >= pruned.max()


def test_global_scope_one_threshold():
    model = tz.compress(mlp(), [tz.Prune(sparsity=0.8, scope="global")], progress=False)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    assert zeros == round(0.8 * total)
    kept = torch.cat([m.weight[m.weight != 0].abs() for m in layers])
    pruned = torch.cat([m.parametrizations.weight.original[m.weight == 0].abs() for m in layers])
    assert kept.min() >= pruned.max()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_nm_pattern_holds_in_every_group(n, m):
    net = nn.Sequential(nn.Linear(64, 33), nn.Conv2d(8, 5, 3))  # conv: 8*3*3 = 72 inputs
    model = tz.compress(net, [tz.Prune(pattern=f"{n}:{m}")], progress=False)
    for layer in model:
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((groups == n).all())
        # Kept entries are the n largest of their group.
        orig = layer.parametrizations.weight.original.detach().abs().reshape(w.shape[0], -1, m)
        keep = (w != 0).reshape_as(orig)
        smallest_kept = orig.masked_fill(~keep, float("inf")).amin(-1)
        largest_pruned = orig.masked_fill(keep, -1).amax(-1)
        assert bool((smallest_kept >= largest_pruned).all())


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_channel_pruning_removes_weakest_rows(norm):
    conv = nn.Conv2d(6, 20, 3)
    model = tz.compress(nn.Sequential(conv), [tz.Prune(sparsity=0.25, pattern="channel", norm=norm)], progress=False)
    w = model[0].weight.reshape(20, -1)
    dead = (w == 0).all(1)
    assert int(dead.sum()) == 5
    orig = conv.weight.detach().reshape(20, -1).double()
    score = orig.abs().sum(1) if norm == "l1" else orig.norm(dim=1)
    assert set(torch.nonzero(dead).flatten().tolist()) == set(score.argsort()[:5].tolist())
    assert bool((w[~dead] == orig[~dead].float()).all())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "channel"])
def test_masked_weights_stay_zero_through_momentum_and_weight_decay(pattern):
    model = tz.compress(mlp()[:3], [tz.Prune(sparsity=0.6, pattern=pattern, exclude=["0"] if pattern == "2:4" else [])],
                        progress=False)
    zeros_before = [(m.weight == 0).clone() for m in model if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(50):
        loss = model(torch.randn(16, 37)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for before, m in zip(zeros_before, [m for m in model if isinstance(m, nn.Linear)]):
        assert bool((m.weight[before] == 0).all())
        assert not bool((m.weight[~before] == 0).any())  # kept weights moved off zero


def test_cubic_schedule_values():
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, in float64 by hand.
    for t in range(0, 120, 7):
        expect = 0.9 if t >= 100 else 0.1 if t <= 20 else 0.9 + (0.1 - 0.9) * (1 - (t - 20) / 80) ** 3
        assert cubic_sparsity(t, 0.9, 0.1, 20, 100) == pytest.approx(expect, abs=1e-12)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gradual_schedule_grows_masks_and_ends_exactly(scope):
    model = tz.compress(mlp(), [tz.Prune(sparsity=0.9, scope=scope, initial_sparsity=0.1, start_step=3, end_step=23, frequency=4)],
                        progress=False)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for m in layers)
    prev = None
    for step in range(1, 30):
        tz.step(model)
        zeros = torch.cat([(m.weight == 0).flatten() for m in layers])
        pruned = torch.cat([(~masks_of(m).mask).flatten() for m in layers])
        if prev is not None:
            assert bool((pruned | ~prev).all()), "a pruned weight came back"
        prev = pruned
        mask = masks_of(layers[0])
        expected = mask.target(step) if (step - 3) % 4 == 0 or step >= 23 or step < 3 else None
        if step >= 23:
            assert int(zeros.sum()) == round(0.9 * total) if scope == "global" else all(
                int((m.weight == 0).sum()) == round(0.9 * m.weight.numel()) for m in layers)
        elif expected is not None and scope == "layer" and step >= 3:
            assert int((layers[1].weight == 0).sum()) == round(expected * layers[1].weight.numel())
    assert int(masks_of(layers[0]).step) == 29


def test_state_dict_round_trip_keeps_masks():
    model = tz.compress(mlp(), [tz.Prune(sparsity=0.7)], progress=False)
    clone = tz.compress(mlp(), [tz.Prune(sparsity=0.1)], progress=False)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(4, 37)
    assert torch.equal(clone(x), model(x))
    assert isinstance(model[0].parametrizations.weight[0], Mask)


def test_initial_sparsity_above_final_is_rejected():
    with pytest.raises(tz.RecipeError, match="masks only grow"):
        tz.Prune(sparsity=0.2, initial_sparsity=0.8, end_step=10)


def test_second_compress_call_keeps_its_own_schedule():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Conv1d(1, 4, 3))

    first = tz.Prune(sparsity=0.8, scope="global", end_step=10, targets=["Linear"])
    second = tz.Prune(sparsity=0.5, end_step=10, targets=["Conv1d"])
    one = tz.compress(net(), [first, second], progress=False)
    two = tz.compress(tz.compress(net(), [first], progress=False), [second], progress=False)
    for _ in range(10):
        tz.step(one)
        tz.step(two)
    for a, b in zip(one, two):
        if hasattr(a, "weight"):
            assert torch.equal(a.weight, b.weight)
    assert int((two[3].weight == 0).sum()) == round(0.5 * two[3].weight.numel())


def test_finish_jumps_to_the_end_state_in_one_recomputation(monkeypatch):
    """`torchzip compress` replays schedules with `finish`: the end state of stepping, one top-k per layer."""
    recipe = [tz.Prune(sparsity=0.85, end_step=2500, frequency=1), tz.Codebook(bits=3, start_step=2500)]
    base = nn.Sequential(nn.Linear(48, 31), nn.ReLU(), nn.Linear(31, 9))
    stepped = tz.compress(copy.deepcopy(base), recipe, progress=False)
    jumped = tz.compress(copy.deepcopy(base), recipe, progress=False)
    calls = []
    real = Mask.recompute
    monkeypatch.setattr(Mask, "recompute", lambda self, *a: (calls.append(1), real(self, *a))[1])
    tz.schedule.finish(jumped, progress=False)
    assert len(calls) == 2  # one per layer, not one per step
    monkeypatch.setattr(Mask, "recompute", real)
    for _ in range(2500):
        tz.step(stepped)
    for a, b in zip(stepped.state_dict().values(), jumped.state_dict().values()):
        assert torch.equal(a, b)
