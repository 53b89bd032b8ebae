"""Knowledge distillation: the KD loss, output containers, feature hooks, the recipe pass, bad input,
and a real task (scikit-learn's digits) where distillation lifts a heavily pruned student."""

import copy
import math
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchzip
from torchzip.train import Callback, DistillationCallback, extract_logits, finetune, kd_loss
from torchzip.errors import DistillationError, RecipeError
from torchzip.passes.distill import Distill
from torchzip.passes.prune import Prune, masks_of
from torchzip.recipe import Recipe


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batches(n=4, size=16, dim=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, dim, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The KD loss against a float64 reference


def reference_kd(s, t, T):
    """T² · mean over rows of Σ_c p_t (log p_t − log p_s), with softmax written out in float64."""
    s = s.double().reshape(-1, s.shape[-1]) / T
    t = t.double().reshape(-1, t.shape[-1]) / T
    log_ps = s - s.max(1, keepdim=True).values
    log_ps = log_ps - log_ps.exp().sum(1, keepdim=True).log()
    log_pt = t - t.max(1, keepdim=True).values
    log_pt = log_pt - log_pt.exp().sum(1, keepdim=True).log()
    kl_rows = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    return kl_rows.mean() * T * T


@pytest.mark.parametrize("shape", [(32, 10), (4, 7, 50), (1, 3)])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
def test_kd_loss_matches_float64_reference(shape, T):
    g = torch.Generator().manual_seed(hash((shape, T)) % 2**31)
    s = torch.randn(shape, generator=g) * 5
    t = torch.randn(shape, generator=g) * 5
    got = kd_loss(s, t, T)
    want = reference_kd(s, t, T)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), want.item(), rel_tol=2e-5, abs_tol=1e-6)
    # In float64 it is the reference to rounding.
    assert math.isclose(kd_loss(s.double(), t.double(), T).item(), want.item(), rel_tol=1e-12, abs_tol=1e-14)


def test_kd_loss_gradient_and_zero_at_match():
    s = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, dtype=torch.float64)
    T = 3.0
    kd_loss(s, t, T).backward()
    # d/ds of T²·KL/N is T·(softmax(s/T) − softmax(t/T))/N.
    want = T * (torch.softmax(s.detach() / T, 1) - torch.softmax(t / T, 1)) / s.shape[0]
    torch.testing.assert_close(s.grad, want, rtol=1e-12, atol=1e-14)
    assert kd_loss(t, t.clone(), T).item() == pytest.approx(0.0, abs=1e-12)


def test_loss_is_alpha_kd_plus_one_minus_alpha_task():
    teacher, student = mlp([8, 32, 4], 1), mlp([8, 16, 4], 2)
    x, y = batches(1)[0]
    for alpha in (0.0, 0.3, 1.0):
        cb = DistillationCallback(teacher, temperature=2.5, alpha=alpha, student=student)
        out = student(x)
        want = alpha * reference_kd(out, teacher(x), 2.5) + (1 - alpha) * F.cross_entropy(out.double(), y)
        assert cb.loss(out, y, x).item() == pytest.approx(want.item(), rel=1e-5)
    # alpha=1 is pure distillation: no targets needed.
    cb = DistillationCallback(teacher, alpha=1.0, student=student)
    assert cb.loss(student(x), None, x).item() == pytest.approx(kd_loss(student(x), teacher(x), 4.0).item())


# ---------------------------------------------------------------------------------------------
# Output containers


class HFOutput(OrderedDict):
    """Like transformers' ModelOutput: a dict whose fields are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class AttrOutput:
    """An output object with attributes only (not a mapping)."""

    def __init__(self, hidden, logits):
        self.hidden, self.logits = hidden, logits


class Wrapped(nn.Module):
    """Returns its MLP's logits in the container ``kind``, next to a hidden state."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        z = self.net(x)
        hidden = torch.zeros(x.shape[0], 3)
        return {
            "tensor": lambda: z,
            "tuple": lambda: (z, hidden),
            "tuple_later": lambda: (hidden.sum(), z),  # logits second: found by index
            "dict": lambda: {"hidden": hidden, "logits": z},
            "dict_other_name": lambda: {"scores": z, "hidden": hidden},
            "hf": lambda: HFOutput(loss=None, logits=z, hidden_states=hidden),
            "attr": lambda: AttrOutput(hidden, z),
        }[self.kind]()


@pytest.mark.parametrize(
    "kind, spec",
    [("tensor", None), ("tuple", None), ("tuple", 0), ("tuple_later", 1), ("dict", None), ("dict", "logits"),
     ("dict_other_name", "scores"), ("dict_other_name", None), ("hf", None), ("hf", 0), ("hf", "logits"), ("attr", None)],
)
def test_every_output_container_gives_the_same_loss(kind, spec):
    teacher_net, student_net = mlp([8, 32, 4], 1), mlp([8, 16, 4], 2)
    x, y = batches(1)[0]
    plain = DistillationCallback(teacher_net, alpha=0.6, student=student_net).loss(student_net(x), y, x)
    student, teacher = Wrapped(student_net, kind), Wrapped(teacher_net, kind)
    cb = DistillationCallback(teacher, alpha=0.6, logits=spec, loss_fn=lambda out, y: F.cross_entropy(extract_logits(out, spec), y), student=student)
    assert cb.loss(student(x), y, x).item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["dict", "hf", "attr", "tuple"])
def test_finetune_with_container_outputs(kind):
    teacher, student = Wrapped(mlp([8, 32, 4], 1), kind), Wrapped(mlp([8, 16, 4], 2), kind)
    before = snapshot(student)
    history = finetune(student, batches(), callbacks=[DistillationCallback(teacher)], progress=False)
    assert history[0]["steps"] == 4 and not same(before, snapshot(student))


def test_bad_logits_field_is_named():
    teacher, student = Wrapped(mlp([8, 32, 4], 1), "dict"), Wrapped(mlp([8, 16, 4], 2), "dict")
    cb = DistillationCallback(teacher, logits="nope", student=student)
    with pytest.raises(DistillationError, match="nope.*keys \\['hidden', 'logits'\\]"):
        finetune(student, batches(), callbacks=[cb], loss_fn=lambda out, y: F.cross_entropy(out["logits"], y), progress=False)


# ---------------------------------------------------------------------------------------------
# Feature distillation


def test_feature_distillation_trains_the_width_projection():
    teacher, student = mlp([8, 48, 48, 4], 1), mlp([8, 16, 16, 4], 2)
    cb = DistillationCallback(teacher, alpha=0.5, features={"2": "2"}, feature_weight=1.0)
    data = batches(8)
    finetune(student, data[:1], callbacks=[cb], epochs=1, lr=0.0, progress=False)  # builds the projection
    proj = cb.projections["2"]
    assert (proj.in_features, proj.out_features, proj.dim) == (16, 48, 1)
    w0 = proj.weight.detach().clone()

    def feature_mse():
        with torch.no_grad():
            s = proj(student[:3](data[0][0]))
            return F.mse_loss(s, teacher[:3](data[0][0])).item()

    start = feature_mse()
    finetune(student, data, callbacks=[cb], epochs=15, lr=1e-2, progress=False)
    assert not torch.equal(proj.weight, w0)
    assert feature_mse() < 0.5 * start
    assert len(list(cb.parameters())) == 2  # the projection only: the teacher is not the callback's


def test_conv_features_project_along_channels_and_same_width_needs_none():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 36, 5))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    data = [(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))) for _ in range(3)]
    cb = DistillationCallback(teacher, features={"0": "0", "3": "3"})
    finetune(student, data, callbacks=[cb], progress=False)
    assert list(cb.projections) == ["0"]  # logits layers have equal shapes
    assert (cb.projections["0"].in_features, cb.projections["0"].out_features, cb.projections["0"].dim) == (4, 12, 1)


def test_own_loop_prepare_builds_projection_before_the_optimizer():
    teacher, student = mlp([8, 48, 4], 1), mlp([8, 16, 4], 2)
    data = batches()
    cb = DistillationCallback(teacher, features={"0": "0"}, student=student)
    cb.prepare(data[0][0], data[0][1])
    opt = torch.optim.SGD(list(student.parameters()) + list(cb.parameters()), lr=0.1)
    w0 = cb.projections["0"].weight.detach().clone()
    for x, y in data:
        loss = cb.loss(student(x), y, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cb.step()
    assert not torch.equal(cb.projections["0"].weight, w0)


def test_lazy_projection_in_own_loop_warns():
    teacher, student = mlp([8, 48, 4], 1), mlp([8, 16, 4], 2)
    x, y = batches(1)[0]
    cb = DistillationCallback(teacher, features={"0": "0"}, student=student)
    with pytest.warns(UserWarning, match="prepare"):
        cb.loss(student(x), y, x)


# ---------------------------------------------------------------------------------------------
# The teacher is never updated


def test_teacher_unchanged_bitwise_after_training():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    teacher.train()  # left in training mode by its owner: distillation must still not touch it
    student = mlp([8, 16, 4], 2)
    before = snapshot(teacher)
    cb = DistillationCallback(teacher, alpha=0.7, features={"0": "0"})
    finetune(student, batches(6), callbacks=[cb], epochs=3, lr=1e-2, progress=False)
    assert same(before, snapshot(teacher))  # weights and BatchNorm statistics
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_teacher_sharing_parameters_with_student_is_refused():
    model = mlp([8, 16, 4])
    with pytest.raises(DistillationError, match="shares parameters"):
        DistillationCallback(model, student=model)
    with pytest.raises(DistillationError, match="shares parameters"):
        Recipe([Distill()]).callbacks(torchzip.compress(model, [Prune()], inplace=True, progress=False), teacher=model)


# ---------------------------------------------------------------------------------------------
# The recipe pass


def test_distill_pass_yields_a_callback_that_finetune_uses():
    teacher, student = mlp([8, 32, 4], 1), mlp([8, 32, 4], 2)
    recipe = Recipe.from_dict({"passes": [{"prune": {"sparsity": 0.5}}, {"distill": {"temperature": 2.0, "alpha": 0.9, "features": {"0": "0"}}}]})
    assert recipe.to_dict()["passes"][1] == {"distill": {"temperature": 2.0, "alpha": 0.9, "features": {"0": "0"}}}
    assert Recipe.from_yaml(recipe.to_yaml()).to_dict() == recipe.to_dict()
    model = torchzip.compress(student, recipe, progress=False)
    (cb,) = recipe.callbacks(model, teacher=teacher)
    assert isinstance(cb, DistillationCallback) and cb.student is model and cb.teacher is teacher
    assert (cb.temperature, cb.alpha, cb.features) == (2.0, 0.9, {"0": "0"})
    assert model.state_dict().keys() == torchzip.compress(student, [Prune(sparsity=0.5)], progress=False).state_dict().keys()

    seen = []

    class Spy(Callback):
        def on_loss(self, loss, outputs, targets=None, inputs=None):
            seen.append(loss.item())
            return loss

    # Callbacks run in the order given; the spy, first, sees the task loss only.
    history = finetune(model, batches(), callbacks=[Spy(), cb], progress=False)
    assert len(seen) == 5  # dry run + 4 steps
    assert history[0]["loss"] != pytest.approx(sum(seen[1:]) / 4)  # the distillation loss was added


def test_the_student_holds_no_teacher():
    """Distillation state lives in the callback: copies, pickles, freeze and export of the student
    never touch the teacher."""
    teacher, student = mlp([8, 32, 4], 1), mlp([8, 32, 4], 2)
    recipe = Recipe([Prune(sparsity=0.5), Distill(features={"0": "0"})])
    model = torchzip.compress(student, recipe, progress=False)
    (cb,) = recipe.callbacks(model, teacher=teacher)
    finetune(model, batches(), callbacks=[cb], progress=False)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(v) in teacher_ids or v is teacher for v in vars(model).values())
    copied = copy.deepcopy(model)
    assert not {id(p) for p in copied.parameters()} & teacher_ids
    blob = pickle.dumps(torchzip.freeze(copy.deepcopy(model)))  # the packed student pickles without the teacher
    assert teacher[0].weight.detach().numpy().tobytes()[:64] not in blob


def test_own_loop_with_recipe_callback_in_two_lines():
    teacher, student = mlp([8, 32, 4], 1), mlp([8, 32, 4], 2)
    recipe = Recipe([Prune(sparsity=0.8, end_step=4), Distill(alpha=0.5)])
    model = torchzip.compress(student, recipe, progress=False)
    (cb,) = recipe.callbacks(model, teacher=teacher)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for x, y in batches(4):
        loss = cb.loss(model(x), y, x)  # line 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        cb.step()  # line 2
    mask = masks_of(model[0])
    assert int(mask.step) == 4 and int((~mask.mask).sum()) == round(0.8 * mask.mask.numel())


def test_distill_pass_without_teacher_is_a_recipe_error():
    recipe = Recipe([Distill()])
    model = torchzip.compress(mlp([8, 16, 4]), [Prune()], progress=False)
    with pytest.raises(RecipeError, match="needs a teacher"):
        recipe.callbacks(model)


# ---------------------------------------------------------------------------------------------
# Bad input: named errors, raised before anything changes


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"feature_weight": -1.0}, "feature_weight"), ({"logits": 1.5}, "logits"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(DistillationError, match=match):
        DistillationCallback(mlp([8, 4]), **kwargs)
    with pytest.raises(DistillationError, match=match):
        Distill(**kwargs)
    with pytest.raises(DistillationError, match=match):  # a recipe file fails when read
        Recipe.from_dict({"passes": [{"distill": kwargs}]})
    assert issubclass(DistillationError, ValueError)


def test_missing_feature_names_list_close_and_valid_names():
    teacher, student = mlp([8, 32, 32, 4], 1), mlp([8, 16, 16, 4], 2)
    with pytest.raises(DistillationError, match=r"teacher has no layer named 'fc1'.*valid names: \['0', '1', '2'"):
        DistillationCallback(teacher, features={"0": "fc1"})
    with pytest.raises(DistillationError, match=r"student has no layer named '22'; close matches: \['2'"):
        DistillationCallback(teacher, features={"22": "2"}, student=student)
    cb = DistillationCallback(teacher, features={"22": "2"})
    before = snapshot(student)
    with pytest.raises(DistillationError, match="student has no layer named '22'"):
        finetune(student, batches(), callbacks=[cb], progress=False)
    assert same(before, snapshot(student))
    with pytest.raises(DistillationError, match="no layer named"):
        torchzip.compress(student, [Prune(), Distill(features={"x": "2"})], progress=False)


def model_with_bn(out):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, out))


def reshaping_teacher():
    # Its layer "1" outputs [batch, 4, 8]: no single projection maps a [batch, 16] feature onto it.
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 32), nn.Unflatten(1, (4, 8)), nn.Flatten(), nn.Linear(32, 4))


@pytest.mark.parametrize("make_teacher, features, match", [
    (lambda: mlp([8, 32, 5], 1), None, r"teacher output shape \(16, 5\) does not match the student's \(16, 4\)"),
    (reshaping_teacher, {"1": "1"}, r"student feature '1' has shape \(16, 16\) and teacher feature '1' \(16, 4, 8\)"),
])
def test_shape_mismatch_raises_before_any_change(make_teacher, features, match):
    student = model_with_bn(4)
    before = snapshot(student)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    cb = DistillationCallback(make_teacher(), features=features)
    with pytest.raises(DistillationError, match=match):
        finetune(student, batches(), callbacks=[cb], optimizer=opt, progress=False)
    assert same(before, snapshot(student))  # weights and BatchNorm running statistics
    assert student.training  # modes restored
    assert all(p.grad is None for p in student.parameters())


def test_shape_mismatch_in_own_loop_raises_before_backward():
    cb = DistillationCallback(mlp([8, 32, 5], 1), student=mlp([8, 16, 4], 2))
    x, y = batches(1)[0]
    with pytest.raises(DistillationError, match="does not match"):
        cb.loss(cb.student(x), y, x)
    with pytest.raises(DistillationError, match="inputs"):
        cb.loss(cb.student(x), y)


# ---------------------------------------------------------------------------------------------
# A real task: distillation lifts a heavily pruned student on held-out digits


def test_distillation_lifts_pruned_student_on_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.5, random_state=0, stratify=y)
    Xtr, Xte = (torch.tensor(a, dtype=torch.float32) / 16 for a in (Xtr, Xte))
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)

    def accuracy(model):
        with torch.no_grad():
            return (model(Xte).argmax(1) == yte).float().mean().item()

    # The teacher learns from the whole training half.
    teacher = mlp([64, 128, 128, 10], 0)
    opt = torch.optim.Adam(teacher.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        i = torch.randint(0, len(Xtr), (64,), generator=g)
        loss = F.cross_entropy(teacher(Xtr[i]), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher_acc = accuracy(teacher)
    assert teacher_acc > 0.93
    teacher_state = snapshot(teacher)

    # Its copy, 95% pruned, recovers on 50 labelled samples, with and without the teacher.
    few = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(1))[:50]
    data = torch.utils.data.TensorDataset(Xtr[few], ytr[few])
    results = {}
    for name, recipe in [("plain", [Prune(sparsity=0.95)]), ("distilled", [Prune(sparsity=0.95), Distill(alpha=0.9, temperature=4.0)])]:
        torch.manual_seed(0)
        student = torchzip.compress(teacher, recipe, progress=False)
        pruned_acc = accuracy(student)
        loader = torch.utils.data.DataLoader(data, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(2))
        finetune(student, loader, epochs=40, lr=1e-2, callbacks=Recipe(recipe).callbacks(student, teacher=teacher),
                 progress=False)
        assert masks_of(student[0]).mask.float().mean().item() == pytest.approx(0.05, abs=1e-3)
        results[name] = accuracy(student)
    assert pruned_acc < 0.5  # the pruning really hurt
    assert results["distilled"] >= results["plain"] + 0.02, results
    assert same(teacher_state, snapshot(teacher))
