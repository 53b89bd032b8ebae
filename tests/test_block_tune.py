"""Block tuning (BRECQ-style block reconstruction) after each block is calibrated."""

import copy
import warnings

import pytest
import torch
from torch import nn

import torchzip as tz
from torchzip import calibrate
from torchzip.errors import RecipeError
from torchzip.passes.codebook import codebook_of


class NormBlock(nn.Module):
    """A transformer-like block with a LayerNorm: masked attention-ish mixing, then an MLP."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, mask):
        att = (self.q(x) @ self.k(x).transpose(1, 2)) * 0.5 + mask
        x = x + att.softmax(-1) @ self.v(x)
        return (self.norm(x + self.down(torch.tanh(self.up(x)))),)  # a tuple, as Hugging Face layers return


class Chain(nn.Module):
    def __init__(self, d=10, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(NormBlock(d) for _ in range(depth))

    def forward(self, x, attention_mask):
        mask = (1.0 - attention_mask[:, None, :].float()) * -1e4
        for block in self.blocks:
            x = block(x, mask)[0]
        return x


def padded_batches(d, count=3):
    out = []
    for n in torch.randint(4, 9, (count,)).tolist():
        lengths = torch.randint(2, n + 1, (5,))
        out.append({"x": torch.randn(5, n, d), "attention_mask": (torch.arange(n) < lengths[:, None]).long()})
    return out


def compressed_block(d=10):
    """A float block and a copy of it with 2-bit codebooks (data-free), plus inputs and masks."""
    block = NormBlock(d)
    with torch.no_grad():  # LayerNorm and biases away from their defaults, so every parameter matters
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.normal_()
        block.norm.weight[0] = block.norm.bias[0] = 0.0  # a dimension always 0: its weight is floored
    small = tz.compress(block, [tz.Codebook(bits=2, method="kmeans")], progress=False)
    batches = padded_batches(d)
    inputs = [((b["x"], (1.0 - b["attention_mask"][:, None, :].float()) * -1e4), {}) for b in batches]
    tokens = [b["attention_mask"].bool() for b in batches]
    with torch.no_grad():
        targets = [block(*a)[0] for a, _ in inputs]
    return block, small, inputs, tokens, targets


def reference_error(block64, inputs, targets, tokens):
    """The normalised block error per real token, in float64, written out from its definition."""
    real_t = torch.cat([t.double()[m] for t, m in zip(targets, tokens)])
    square = (real_t**2).mean(0)  # each output dimension divided by its mean square target, floored
    weight = 1.0 / torch.maximum(square, calibrate.NORM_FLOOR * square.mean())
    total, count = 0.0, 0
    for (args, _), t, m in zip(inputs, targets, tokens):
        out = block64(args[0].double(), args[1].double())[0]
        keep = m.unsqueeze(-1).double()  # padding tokens count for nothing
        total = total + (keep * weight * (out - t.double()) ** 2).sum()
        count += int(m.sum())
    return total / count


def test_tunable_parameters_are_centroids_biases_and_norms():
    _, small, *_ = compressed_block()
    names = {n for n, p in small.named_parameters() if any(p is q for q in calibrate.tunable(small))}
    assert names == {f"{m}.parametrizations.weight.0.centroids" for m in ("q", "k", "v", "up", "down")} | \
        {f"{m}.bias" for m in ("q", "k", "v", "up", "down")} | {"norm.weight", "norm.bias"}


def test_error_and_first_adam_step_match_a_float64_reference():
    _, small, inputs, tokens, targets = compressed_block()
    params = calibrate.tunable(small)
    ref = copy.deepcopy(small).double()
    ref_params = calibrate.tunable(ref)
    loss = reference_error(ref, inputs, targets, tokens)
    grads = torch.autograd.grad(loss, ref_params)
    # One batch, one step: the error it reports before the step is the reference's, and Adam's
    # first step moves each parameter by lr * g / (|g| + eps) against the gradient g.
    # Over all batches (the normalisation pooled over them), before any step: the reference's error.
    got, same = calibrate.tune_block(small, inputs, targets, tokens, 0, tuple_out=True)
    assert got == same == pytest.approx(loss.item(), rel=1e-5)
    lr = 1e-3
    old = [p.detach().clone() for p in params]
    before, after = calibrate.tune_block(small, inputs[:1], targets[:1], tokens[:1], 1, lr, tuple_out=True)
    one = reference_error(ref, inputs[:1], targets[:1], tokens[:1])
    assert before == pytest.approx(one.item(), rel=1e-5)
    assert after < before
    g1 = torch.autograd.grad(one, ref_params)
    top = max(float(g.abs().max()) for g in g1)
    for p, o, g in zip(params, old, g1):
        # Adam scales every gradient to about 1: where float32 rounding noise is most of it (k's
        # bias: attention is blind to it), its sign is noise too.
        big = g.abs() > 1e-4 * top
        step = (p.detach() - o).double()
        assert torch.allclose(step[big], (-lr * g / (g.abs() + 1e-8))[big].to(step.dtype), rtol=1e-3, atol=1e-7)
    assert all(torch.isfinite(g).all() for g in grads)


def test_tuning_lowers_the_block_error_and_leaves_codes_and_weights_alone():
    block, small, inputs, tokens, targets = compressed_block()
    codes = {n: codebook_of(m).indices().clone() for n, m in small.named_modules() if codebook_of(m) is not None}
    weights = {n: p.detach().clone() for n, p in small.named_parameters() if n.endswith("original")}
    before, after = calibrate.tune_block(small, inputs, targets, tokens, 150, 3e-3, tuple_out=True)
    assert after < 0.8 * before
    untuned = tz.compress(block, [tz.Codebook(bits=2, method="kmeans")], progress=False)
    assert before == pytest.approx(calibrate.tune_block(untuned, inputs, targets, tokens, 0, tuple_out=True)[0], rel=1e-6)
    for n, m in small.named_modules():
        if n in codes:
            assert torch.equal(codebook_of(m).indices(), codes[n])
    for n, p in small.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n])
        assert p.requires_grad  # restored after tuning


def test_next_block_is_calibrated_on_the_tuned_blocks_outputs(monkeypatch):
    model = Chain()
    batches = padded_batches(10)
    watched = [None]
    seen = []  # what blocks[1].q sees while it is still uncompressed: its calibration inputs

    def record(m, args):
        # Only the model's own layer (the float copy that float_targets makes carries the hook too).
        if m is watched[0] and codebook_of(m) is None:
            seen.append(args[0].detach().clone())

    real = calibrate.sweep

    def compress(steps, target):
        m = copy.deepcopy(model)
        seen.clear()
        watched[0] = m.blocks[1].q
        handle = m.blocks[1].q.register_forward_pre_hook(record)
        log = []
        monkeypatch.setattr(calibrate, "sweep", lambda *a, **k: real(*a, **dict(k, tune_log=log, tune_target=target)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tz.compress(m, [tz.Codebook(bits=2, method="gptq", block_tune=steps, block_tune_lr=3e-3,
                                        float_targets=target == "model")],
                        progress=False, calibration=batches, inplace=True)
        handle.remove()
        return m, [s for s in seen[-len(batches):]], log

    tuned, tuned_seen, log = compress(60, "model")
    plain, plain_seen, plain_log = compress(0, "model")
    assert [b for b, *_ in log] == [0, 1, 2] and plain_log == []
    assert all(after < before for _, before, after in log)
    masks = [(1.0 - b["attention_mask"][:, None, :].float()) * -1e4 for b in batches]
    with torch.no_grad():
        out_tuned = [tuned.blocks[0](b["x"], m)[0] for b, m in zip(batches, masks)]
        out_plain = [plain.blocks[0](b["x"], m)[0] for b, m in zip(batches, masks)]
    for s, t, p in zip(tuned_seen, out_tuned, out_plain):
        assert torch.allclose(s, t, atol=1e-5)  # the tuned block's outputs, not the untuned one's
        assert not torch.allclose(s, p, atol=1e-3)
    for s, p in zip(plain_seen, out_plain):
        assert torch.allclose(s, p, atol=1e-5)

    # Without a float copy of the model, each block is tuned to the float block on its compressed inputs.
    _, _, block_log = compress(30, "block")
    assert [b for b, *_ in block_log] == [0, 1, 2] and all(after < before for _, before, after in block_log)


def test_block_tune_arguments_are_checked():
    for bad in ({"block_tune": -1}, {"block_tune": 1.5}, {"block_tune_lr": 0}, {"block_tune_lr": "fast"}, {"block_tune_lr": float("inf")},
                {"block_tune": 10, "method": "kmeans"}, {"block_tune": 10, "start_step": 5}):
        with pytest.raises(RecipeError, match="block_tune"):
            tz.Codebook(**bad)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_block_tune_warns_without_a_chain_of_blocks():
    model = Branches()
    with pytest.warns(UserWarning, match="block tuning needs"):
        tz.compress(model, [tz.Codebook(bits=2, method="gptq", block_tune=5)], progress=False,
                    calibration=[torch.randn(20, 6)])

    with pytest.warns(UserWarning, match="needs calibration data"):  # method auto, no data: k-means; said, not silently ignored
        tz.compress(model, [tz.Codebook(bits=2, block_tune=5)], progress=False)


def test_block_tune_lr_in_yaml_takes_exponents_without_a_dot():
    # PyYAML alone reads 3e-4 as the string '3e-4' (YAML 1.1 wants 3.0e-4).
    recipe = tz.Recipe.from_yaml("passes:\n  - codebook: {bits: 4, block_tune: 5, block_tune_lr: 3e-4}\n")
    assert recipe.passes[0].block_tune_lr == 3e-4
    assert tz.Recipe.from_yaml(recipe.to_yaml()).passes[0].block_tune_lr == 3e-4
    with pytest.raises(RecipeError, match="block_tune_lr"):
        tz.Recipe.from_yaml("passes:\n  - codebook: {block_tune_lr: 3e-4x}\n")
