"""``finetune`` and the callback protocol: history, schedules driven step by step, batch and output
kinds, optimizers, progress bars, and errors raised before anything trains."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchzip
from torchzip.train import Callback, DistillationCallback, finetune
from torchzip.errors import TorchzipError
from torchzip.passes.codebook import codebook_of
from torchzip.passes.distill import Distill
from torchzip.passes.prune import Prune, masks_of


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def batches(n=5, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(size, 8, generator=g)
        out.append((x, (x @ w).argmax(1)))  # a learnable rule
    return out


def sparsity(module):
    mask = masks_of(module).mask
    return int((~mask).sum()) / mask.numel()


class Recorder(Callback):
    def __init__(self, student=None):
        super().__init__(student)
        self.events = []

    def on_train_begin(self, model):
        super().on_train_begin(model)
        self.events.append("train_begin")

    def on_step_begin(self, model):
        self.events.append(("step_begin", model.training))

    def on_loss(self, loss, outputs, targets=None, inputs=None):
        self.events.append(("loss", torch.is_grad_enabled()))
        return loss

    def on_step_end(self, model):
        self.events.append("step_end")

    def on_epoch_end(self, model, epoch, logs):
        self.events.append(("epoch_end", epoch, logs["steps"]))

    def on_train_end(self, model):
        self.events.append("train_end")


def test_history_and_learning():
    model = mlp()
    data = batches(5)
    history = finetune(model, data, epochs=4, lr=1e-2, progress=False)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert all(h["steps"] == 5 and h["samples"] == 80 and h["seconds"] >= 0 and h["lr"] == 1e-2 for h in history)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]


def test_callback_protocol_order():
    rec = Recorder()
    model = mlp()
    model.eval()
    finetune(model, batches(2), callbacks=[rec], epochs=2, progress=False)
    step = [("step_begin", True), ("loss", True), "step_end"]
    assert rec.events == ["train_begin", ("loss", False)] + step * 2 + [("epoch_end", 0, 2)] + step * 2 + [("epoch_end", 1, 2), "train_end"]
    assert not model.training  # the caller's mode is restored


@pytest.mark.parametrize("frequency", [1, 3])
def test_gradual_schedule_reaches_final_sparsity_exactly_at_end_step(frequency):
    end, n = 10, 8 * 512
    model = torchzip.compress(mlp(hidden=512), [Prune(sparsity=0.8, initial_sparsity=0.1, end_step=end, frequency=frequency)], progress=False)
    seen = []

    class Watch(Callback):
        def on_step_end(self, m):
            seen.append(sparsity(m[0]))

    def expected(step):  # Zhu & Gupta, recomputed every `frequency` steps and at the end
        due = min(step, end) if step >= end else step - step % frequency
        return round((0.8 + (0.1 - 0.8) * (1 - due / end) ** 3) * n) / n

    assert sparsity(model[0]) == expected(0)
    finetune(model, batches(4), callbacks=[Watch()], epochs=3, progress=False)  # 12 steps
    assert seen == [expected(k) for k in range(1, 13)]
    assert seen[end - 1] == round(0.8 * n) / n > seen[end - 2]  # final exactly at step `end`, not before
    assert seen[-1] == seen[end - 1]


def test_gradual_schedule_in_own_loop_with_plain_callback():
    model = torchzip.compress(mlp(), [Prune(sparsity=0.5, end_step=6)], progress=False)
    cb = Callback(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    levels = []
    for x, y in batches(8):
        loss = cb.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cb.step()
        levels.append(sparsity(model[0]))
    assert levels[5] == 0.5 and levels[4] < 0.5 and levels[-1] == 0.5


def test_schedules_step_once_per_optimizer_step_with_many_callbacks():
    teacher = mlp(1)
    recipe = torchzip.Recipe([Prune(sparsity=0.5, end_step=100), Distill()])
    model = torchzip.compress(mlp(), recipe, progress=False)
    cbs = [Recorder(), Callback(), DistillationCallback(teacher, alpha=0.2)] + recipe.callbacks(model, teacher=teacher)
    finetune(model, batches(5), callbacks=cbs, epochs=2, progress=False)
    assert int(masks_of(model[0]).step) == 10 and int(masks_of(model[2]).step) == 10


def test_codebook_clusters_at_its_start_step():
    model = torchzip.compress(mlp(), [Prune(sparsity=0.5, end_step=4), torchzip.Codebook(bits=2, start_step=4)], progress=False)
    quant = codebook_of(model[0])
    finetune(model, batches(3), epochs=1, progress=False)
    assert not bool(quant.clustered)
    finetune(model, batches(3), epochs=1, progress=False)
    assert bool(quant.clustered) and len(torch.unique(model[0].weight[0])) <= 4 + 1  # 4 centroids + pruned zeros


class HFModel(nn.Module):
    """Hugging Face style: keyword inputs, labels in, an output object with loss and logits out."""

    def __init__(self, seed=0, hidden=32):
        super().__init__()
        self.net = mlp(seed, hidden)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.net(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def test_dict_batches_and_model_loss():
    model, teacher = HFModel(0), HFModel(1, 64)
    data = [{"input_ids": x, "attention_mask": torch.ones(len(x)), "labels": y} for x, y in batches(4)]
    history = finetune(model, data, callbacks=[DistillationCallback(teacher, alpha=0.5)], epochs=2, lr=1e-2, progress=False)
    assert history[0]["samples"] == 64 and history[1]["loss"] < history[0]["loss"]


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(3, 4)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def test_tuple_inputs_are_positional_arguments():
    data = [((x, torch.randn(len(x), 3)), y) for x, y in batches(3)]
    history = finetune(TwoInputs(), data, callbacks=[DistillationCallback(TwoInputs())], progress=False)
    assert history[0]["steps"] == 3 and history[0]["samples"] == 48


def test_given_optimizer_gets_the_projection():
    teacher, model = mlp(1, 64), mlp(0, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = DistillationCallback(teacher, features={"0": "0"})
    finetune(model, batches(3), callbacks=[cb], optimizer=opt, progress=False)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == list(cb.parameters())
    finetune(model, batches(3), callbacks=[cb], optimizer=opt, progress=False)
    assert len(opt.param_groups) == 2  # not added twice


def test_frozen_parameters_are_left_out_and_device_argument():
    model = mlp()
    model[0].requires_grad_(False)
    before = model[0].weight.clone()
    finetune(model, batches(2), device="cpu", lr=0.1, progress=False)
    assert torch.equal(before, model[0].weight)


def test_progress_bars_show_loss(capsys):
    finetune(mlp(), batches(3), epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "finetune" in err and "loss=" in err
    finetune(mlp(), batches(3), progress=False)
    assert capsys.readouterr().err == ""
    finetune(mlp(), batches(3))  # the default: bars only when stderr is a terminal, and it is not here
    assert capsys.readouterr().err == ""


def test_sampler_epoch_is_set():
    class Sampler(torch.utils.data.Sampler):
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(32))

        def __len__(self):
            return 32

    x, y = batches(1, size=32)[0]
    sampler = Sampler()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, sampler=sampler)
    history = finetune(mlp(), loader, epochs=3, progress=False)
    assert sampler.epochs == [0, 1, 2] and [h["steps"] for h in history] == [4, 4, 4]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("data, kwargs, match", [
    ([], {}, "no batch"),
    ([torch.randn(4, 8)], {}, r"\(inputs, targets\) pairs"),
    ([(torch.randn(4, 8), None)], {}, "no loss"),
    ([(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))], {"epochs": -1}, "epochs"),
])
def test_bad_loops_raise_before_training(data, kwargs, match):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(TorchzipError, match=match):
        finetune(model, data, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_callback_misuse():
    with pytest.raises(TorchzipError, match="student=model"):
        Callback().step()
    with pytest.raises(TorchzipError, match="another model"):
        finetune(mlp(), batches(1), callbacks=[Callback(mlp())], progress=False)


def test_cosine_lr_schedule_follows_half_a_cosine():
    import math

    model = mlp()
    lrs = []

    class LrProbe(Callback):
        def on_step_end(self, m):
            lrs.append(self.optimizer.param_groups[0]["lr"])

    probe = LrProbe()
    probe.optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    finetune(model, batches(5), epochs=2, optimizer=probe.optimizer, callbacks=[probe], progress=False)
    assert lrs == [0.2] * 10  # constant: the start value throughout
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    finetune(model, batches(5), epochs=2, optimizer=opt, lr_schedule="cosine", progress=False)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 after all 10 steps
    lrs.clear()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    probe.optimizer = opt
    finetune(model, batches(5), epochs=2, optimizer=opt, callbacks=[probe], lr_schedule="cosine", progress=False)
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 10)) for t in range(1, 11)])
    with pytest.raises(TorchzipError, match="lr_schedule"):
        finetune(model, batches(2), lr_schedule="linear", progress=False)
