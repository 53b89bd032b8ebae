"""A pass and a packed format defined here, outside the package, work end to end: YAML recipe,
compress, freeze, export, load, inspect and summary. Registration is explicit."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchzip as tz
from torchzip.cli import main
from torchzip.packed.base import FORMATS
from torchzip.passes.base import PASSES


@dataclass
class HalfValues:
    """What the pass tells ``freeze``: the weight, rounded to fp16."""

    half: torch.Tensor


class HalfRound(nn.Module):
    """Parametrization: round to fp16 and back, with a straight-through gradient."""

    role, key = "quantized", "half"

    def forward(self, w):
        return w.half().to(w.dtype) + (w - w.detach())

    def describe(self, state, w):
        state.values = HalfValues(w.detach().reshape(state.shape).half())


@dataclass
class Half(tz.LayerPass):
    """fp16 weights: a new pass, outside the package."""

    key = "half"
    role = "quantized"
    scale: float = 1.0  # an argument of its own, to be read from YAML and validated

    def validate(self, where):
        if not isinstance(self.scale, float) or self.scale != 1.0:
            raise tz.RecipeError(f"scale must be 1.0 in {where}")

    def apply(self, model, plan, group, progress=False):
        for _, module, _ in plan:
            parametrize.register_parametrization(module, "weight", HalfRound())


class Fp16Weight(tz.PackedWeight):
    """A toy packed format: the weight stored as fp16."""

    format_name = "fp16"
    priority = 50

    def __init__(self, half, dtype):
        super().__init__(tuple(half.shape), dtype)
        self.register_buffer("weight16", half)

    @classmethod
    def pack(cls, state):
        if not isinstance(state.values, HalfValues) or state.mask is not None:
            return None
        return cls(state.values.half, state.dtype)

    def dequantize(self):
        return self.weight16.to(self.dtype)

    def encode(self, out):
        return {"tensors": {"weight16": out.raw(self.weight16)}}

    @classmethod
    def decode(cls, entry, src, shape, dtype):
        half = src.raw(entry["tensors"].get("weight16"), "weight16")
        src.need(half.dtype == torch.float16 and tuple(half.shape) == shape, f"weight16 must be fp16 {list(shape)}")
        return cls(half, dtype)


@pytest.fixture
def plugins():
    tz.register_pass(Half)
    tz.register_format(Fp16Weight)
    yield
    del PASSES["half"], FORMATS["fp16"]


def net():
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 7), nn.LayerNorm(7))


def test_new_pass_and_format_end_to_end(plugins, tmp_path, capsys):
    recipe = tz.Recipe.from_yaml("passes:\n  - half: {scale: 1.0, exclude: ['2']}\n  - quantize: {targets: [Linear], exclude: ['0']}\n")
    assert tz.Recipe.from_yaml(recipe.to_yaml()) == recipe
    model = net()
    small = tz.compress(model, recipe, progress=False)
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = small(x)
        assert torch.equal(small[0].weight, model[0].weight.half().float())
    frozen = tz.freeze(small)
    assert isinstance(frozen[0].packed, Fp16Weight) and frozen[2].packed.format_name == "int8"
    assert torch.equal(frozen(x), expected)
    rows = {r.name: r for r in tz.summary(frozen, print_table=False).rows}
    assert rows["0"].format == "fp16" and rows["0"].bytes == 2 * 24 * 40 + 4 * 40
    path = tmp_path / "half.tzip"
    tz.export(frozen, path, progress=False)
    loaded = tz.load(path, net(), progress=False)
    assert isinstance(loaded[0].packed, Fp16Weight) and torch.equal(loaded[0].packed.weight16, frozen[0].packed.weight16)
    assert torch.equal(loaded(x), expected)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["codec"] for r in report["rows"][:2]] == ["fp16", "int8"]


def test_conflicts_and_bad_arguments_of_a_plugin_pass(plugins):
    with pytest.raises(tz.RecipeError, match="already quantized by an earlier 'half' pass"):
        tz.compress(net(), [Half(), tz.Quantize()], progress=False)
    with pytest.raises(tz.RecipeError, match="prune before quantizing"):
        tz.compress(net(), [Half(), tz.Prune()], progress=False)
    with pytest.raises(tz.RecipeError, match="scale must be 1.0"):
        tz.Recipe.from_yaml("passes: [{half: {scale: 2.0}}]")
    with pytest.raises(tz.RecipeError, match=r"override for layer '0'.*scale must be 1.0"):
        tz.compress(net(), [Half(overrides={"0": {"scale": 3.0}})], progress=False)


def test_a_format_not_registered_in_the_reader_is_a_format_error(plugins, tmp_path):
    tz.export(tz.compress(net(), [Half()], progress=False), tmp_path / "h.tzip", progress=False)
    del FORMATS["fp16"]
    try:
        with pytest.raises(tz.FormatError, match=r"unknown packed format 'fp16'; allowed: codebook, csr, int8, sparse24"):
            tz.load(tmp_path / "h.tzip", net(), progress=False)
    finally:
        FORMATS["fp16"] = Fp16Weight


def test_registration_is_explicit():
    class MyPrune(tz.Prune):
        pass

    # A subclass does not take over its parent's name...
    assert type(tz.Recipe.from_yaml("passes: [prune: {}]").passes[0]) is tz.Prune
    # ...cannot be registered under it...
    with pytest.raises(tz.RecipeError, match="needs a 'key' of its own.*inherits 'prune'"):
        tz.register_pass(dataclass(MyPrune))
    # ...and cannot be written to YAML as if it were the parent.
    with pytest.raises(tz.RecipeError, match="not the pass registered as 'prune'"):
        tz.Recipe([MyPrune()]).to_yaml()
    # It still works as an object in a Python recipe.
    out = tz.compress(net(), [MyPrune(sparsity=0.5)], progress=False)
    assert float((out[0].weight == 0).float().mean()) == 0.5

    @dataclass
    class Other(tz.LayerPass):
        key = "prune"

    with pytest.raises(tz.RecipeError, match="already registered by torchzip.passes.prune.Prune"):
        tz.register_pass(Other)
    with pytest.raises(ValueError, match="already registered"):
        tz.register_format(type("Int8Again", (tz.PackedWeight,), {"format_name": "int8"}))
