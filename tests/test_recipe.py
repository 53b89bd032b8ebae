import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchzip as tz
from conftest import plain_attention
from torchzip.errors import RecipeError, UnsupportedLayerError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def net():
    return nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(48, 37), nn.ReLU(), nn.Linear(37, 12))


def test_yaml_round_trip_exact():
    recipe = tz.Recipe([
        tz.Prune(sparsity=0.85, scope="layer", initial_sparsity=0.2, start_step=5, end_step=50, frequency=5,
                 exclude=["head*"], overrides={"features.*": {"sparsity": 0.5}}),
        tz.Codebook(bits=3, granularity="layer", init="kmeans++", targets=["Linear", "Conv2d"], start_step=60),
    ])
    text = recipe.to_yaml()
    back = tz.Recipe.from_yaml(text)
    assert back == recipe
    assert back.to_yaml() == text
    assert tz.Recipe.from_dict(recipe.to_dict()) == recipe


def test_recipe_accepts_every_spelling(tmp_path):
    passes = [tz.Prune(pattern="2:4"), tz.Quantize()]
    path = tmp_path / "r.yaml"
    tz.Recipe(passes).save(path)
    model = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(3, 16)
    outs = [tz.compress(model, r, progress=False)(x) for r in
            (passes, tz.Recipe(passes), str(path), path, {"passes": [{"prune": {"pattern": "2:4"}}, {"quantize": None}]})]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("name", ["int8", "codebook4", "sparse24_int8"])
def test_shipped_recipes_work_on_any_model(name):
    model = net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tz.compress(model, str(RECIPES / f"{name}.yaml"), progress=False)
    idx = torch.randint(0, 50, (4, 3))
    with torch.no_grad():
        expected = out(idx)
    frozen = tz.freeze(out)
    assert torch.equal(frozen(idx), expected)
    if name == "sparse24_int8":  # the 37-wide input cannot take 2:4: one warning names it
        msgs = [str(w.message) for w in caught if "skipped" in str(w.message)]
        assert len(msgs) == 1 and "'4'" in msgs[0] and "37" in msgs[0]
    assert tz.summary(frozen, print_table=False).ratio > 1.5


@pytest.mark.parametrize("data,match", [
    ({"passes": [{"prun": {}}]}, r"unknown pass 'prun'.*allowed: \['codebook'.*'prune'"),
    ({"passes": [{"prune": {"sparsty": 0.5}}]}, r"unknown argument\(s\) \['sparsty'\].*allowed"),
    ({"pases": []}, r"unknown recipe key\(s\) \['pases'\]; allowed: \['passes'\]"),
    ({"passes": [{"prune": {"sparsity": 1.0}}]}, r"sparsity must be in \[0, 1\)"),
    ({"passes": [{"prune": {"sparsity": -0.1}}]}, r"sparsity must be in \[0, 1\)"),
    ({"passes": [{"codebook": {"bits": 9}}]}, r"bits must be an integer in 1..8"),
    ({"passes": [{"codebook": {"bits": 0}}]}, r"bits must be an integer in 1..8"),
    ({"passes": [{"quantize": {"bits": 4}}]}, r"bits=8 only"),
    ({"passes": [{"prune": {"pattern": "3:2"}}]}, r"0 < N < M"),
    ({"passes": [{"prune": {"pattern": "diagonal"}}]}, r"unknown pruning pattern"),
    ({"passes": [{"prune": {"targets": ["LayerNorm"]}}]}, r"unknown target layer type 'LayerNorm'"),
    ({"passes": [{"prune": {"overrides": {"fc": {"bits": 3}}}}]}, r"unknown argument\(s\) \['bits'\] in override 'fc'"),
])
def test_bad_recipes_raise_named_errors(data, match):
    with pytest.raises(RecipeError, match=match):
        tz.Recipe.from_dict(data)
    assert issubclass(RecipeError, ValueError)


@pytest.mark.parametrize("text", ["", "passes: []", "{}", "[]", "passes:", "# only a comment\n"])
def test_empty_recipes_are_errors(text):
    with pytest.raises(RecipeError, match="the recipe has no passes, so it targets no layer.*passes: codebook, distill"):
        tz.Recipe.from_yaml(text)


@pytest.mark.parametrize("recipe", [[], {"passes": []}, {}, tz.Recipe()])
def test_compress_with_an_empty_recipe_is_an_error_and_changes_nothing(recipe):
    model = net()
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match="has no passes"):
        tz.compress(model, recipe, inplace=True, progress=False)
    assert _unchanged(model, snapshot)


@pytest.mark.parametrize("text,match", [
    ("passes:\n  - prune: {sparsity: 0.5, sparsity: 0.9}\n", r"key 'sparsity' twice in one mapping \(line 2\)"),
    ("passes: [{prune: {}}]\npasses: [{quantize: {}}]\n", r"key 'passes' twice in one mapping \(line 2\)"),
    ("passes:\n  - prune:\n      overrides: {fc: {sparsity: 0.1}, fc: {sparsity: 0.2}}\n", r"key 'fc' twice"),
    ("passes: [{codebook: {iterations: 0}}]", r"iterations must be an integer >= 1, got 0"),
    ("passes: [{prune: {targets: Linear}}]", r"targets of pass 'prune' must be a list of layer types, got the string 'Linear'; write \[Linear\]"),
])
def test_yaml_mistakes_that_used_to_pass_silently(text, match):
    with pytest.raises(RecipeError, match=match):
        tz.Recipe.from_yaml(text)


def test_a_merged_key_may_still_be_overridden():
    # "<<: *p" then "sparsity" is YAML's way to override, not a key given twice.
    recipe = tz.Recipe.from_yaml("passes:\n  - prune: &p {sparsity: 0.5, frequency: 2}\n  - prune: {<<: *p, sparsity: 0.75}\n")
    assert [(p.sparsity, p.frequency) for p in recipe.passes] == [(0.5, 2), (0.75, 2)]


def test_bad_yaml_and_missing_file():
    with pytest.raises(RecipeError, match="not valid YAML"):
        tz.Recipe.from_yaml("passes: [prune: {")
    with pytest.raises(RecipeError, match="recipe file not found"):
        tz.compress(nn.Linear(4, 4), "recipes/no_such.yaml")


def _unchanged(model, snapshot):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot.values())) and \
        not any(hasattr(m, "parametrizations") for m in model.modules())


@pytest.mark.parametrize("recipe,error,match", [
    ([tz.Quantize(), tz.Codebook()], RecipeError, "already quantized"),
    ([tz.Codebook(), tz.Prune()], RecipeError, "prune before quantizing"),
    ([tz.Prune(), tz.Prune()], RecipeError, "already pruned"),
    ([tz.Prune(pattern="2:4", overrides={"4": {"pattern": "2:4"}})], UnsupportedLayerError, "'4'.*37.*cannot be honoured"),
    ([tz.Quantize(overrides={"2": {"group_size": 5}})], UnsupportedLayerError, "group_size 5 does not divide"),
    ([tz.Prune(targets=["Conv2d"])], RecipeError, "no layer of the model is targeted"),
    ([tz.Prune(exclude=["*"])], RecipeError, "no layer of the model is targeted"),
])
def test_impossible_recipes_fail_before_touching_the_model(recipe, error, match):
    for inplace in (False, True):
        model = net()
        snapshot = copy.deepcopy(model.state_dict())
        with pytest.raises(error, match=match):
            tz.compress(model, recipe, inplace=inplace, progress=False)
        assert _unchanged(model, snapshot)


def test_untargeted_layers_stay_bitwise_identical():
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Conv1d(4, 4, 3), nn.Linear(32, 8))
    before = copy.deepcopy(model.state_dict())
    out = tz.compress(model, [tz.Codebook(bits=2, targets=["Linear"], exclude=["3"])], progress=False)
    frozen = tz.freeze(out)
    for name in ("1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"):
        assert torch.equal(frozen.state_dict()[name], before[name])
    assert type(frozen[2]) is nn.Conv1d and type(frozen[3]) is nn.Linear
    assert _unchanged(model, before)  # not inplace: the input model is untouched


def test_attention_is_compressed_by_default_and_what_is_left_is_reported():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc = nn.Linear(16, 16)
            self.table = nn.Parameter(torch.randn(5, 16))  # a matrix no layer kind owns

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0]) + self.table.sum()

    block = Block()
    out = tz.compress(block, [tz.Quantize()], progress=False)
    assert hasattr(out.attn, "parametrizations") and hasattr(out.attn.out_proj, "parametrizations")
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), plain_attention():  # the path the packed module takes
        expected = out(x)
    frozen = tz.freeze(out)
    with torch.no_grad():
        assert torch.equal(frozen(x), expected)
    report = tz.summary(frozen, print_table=False)
    rows = {r.name: r for r in report.rows}
    assert rows["attn"].format == "int8" and rows["attn.out_proj"].format == "int8"
    assert "table" in rows["(model)"].note and "not a plain weight" in rows["(model)"].note
    left = tz.summary(tz.compress(block, [tz.Quantize(exclude=["attn*"])], progress=False), print_table=False)
    assert {r.name: r.format for r in left.rows}["attn"] == "dense"


def test_compress_twice_composes_like_one_recipe():
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    once = tz.compress(model, [tz.Prune(sparsity=0.5), tz.Quantize()], progress=False)
    twice = tz.compress(tz.compress(model, [tz.Prune(sparsity=0.5)], progress=False), [tz.Quantize()], progress=False)
    x = torch.randn(5, 32)
    assert torch.equal(once(x), twice(x))
    with pytest.raises(RecipeError, match="already quantized"):
        tz.compress(twice, [tz.Codebook()], progress=False)


def test_distill_without_teacher_fails_when_its_callback_is_asked_for():
    recipe = tz.Recipe([tz.Prune(sparsity=0.5), tz.Distill()])
    model = tz.compress(net(), recipe, progress=False)  # compress needs no teacher: distill changes no weight
    with pytest.raises(RecipeError, match="needs a teacher"):
        recipe.callbacks(model)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 48)
        self.body = nn.Linear(48, 48)
        self.head = nn.Linear(48, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.relu(self.body(self.emb(idx))))


def test_tied_weights_are_compressed_once_and_stay_tied(tmp_path):
    model = TiedLM()
    small = tz.compress(model, [tz.Codebook(granularity="channel")], progress=False)
    assert small.head.parametrizations.weight.original is small.emb.parametrizations.weight.original
    assert small.head.parametrizations.weight[0] is small.emb.parametrizations.weight[0]  # one codebook
    idx = torch.randint(0, 64, (5,))
    with torch.no_grad():
        expected = small(idx)
    frozen = tz.freeze(small)
    assert frozen.head.packed is frozen.emb.packed and torch.equal(frozen(idx), expected)
    report = tz.summary(frozen, print_table=False)
    dense = tz.summary(model, print_table=False)
    assert report.fp32_bytes == dense.fp32_bytes == 4 * sum(p.numel() for p in model.parameters())  # the tie counted once
    rows = {r.name: r for r in report.rows}
    assert rows["head"].bytes == 0 and "tied to emb" in rows["head"].note
    tz.export(frozen, tmp_path / "tied.tzip", progress=False)
    manifest, _ = tz.read_manifest(tmp_path / "tied.tzip")
    entries = {e["name"]: e for e in manifest["layers"]}
    assert entries["head"]["tied"] == manifest["layers"].index(entries["emb"]) and entries["head"]["tensors"] == {}
    loaded = tz.load(tmp_path / "tied.tzip", TiedLM(), progress=False)
    assert loaded.head.packed is loaded.emb.packed and torch.equal(loaded(idx), expected)
    untied = TiedLM()
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    with pytest.raises(tz.FormatError, match="ties layer 'head' to 'emb', the skeleton does not"):
        tz.load(tmp_path / "tied.tzip", untied, progress=False)


def test_excluding_either_side_of_a_tie_keeps_both_float(tmp_path):
    model = TiedLM()
    for exclude in (["head"], ["emb"]):
        with pytest.warns(UserWarning, match="tied to .* both stay float"):
            small = tz.compress(model, [tz.Codebook(exclude=exclude)], progress=False)
        rows = {r.name: r for r in tz.summary(small, print_table=False).rows}
        assert rows["emb"].format == rows["head"].format == "dense" and rows["body"].format == "codebook"
    tz.export(small, tmp_path / "t.tzip", progress=False)
    specs = tz.read_manifest(tmp_path / "t.tzip")[0]["dense"]["tensors"]
    assert specs["emb.weight"]["at"] == specs["head.weight"]["at"]  # one copy on disk
    loaded = tz.load(tmp_path / "t.tzip", TiedLM(), progress=False)
    idx = torch.randint(0, 64, (5,))
    assert torch.equal(loaded(idx), small(idx)) and loaded.head.weight is loaded.emb.weight
    tz.export(tz.compress(_untied(), [tz.Quantize()], progress=False), tmp_path / "u.tzip", progress=False)
    with pytest.raises(tz.FormatError, match="skeleton ties layers 'emb' and 'head', the file stores them separately"):
        tz.load(tmp_path / "u.tzip", TiedLM(), progress=False)


def _untied():
    m = TiedLM()
    m.head.weight = nn.Parameter(m.emb.weight.detach().clone())
    return m


@pytest.mark.parametrize("make,match", [
    (lambda: tz.Prune(targets=None), "targets of pass 'prune' must be a list"),
    (lambda: tz.Prune(targets=5), "targets of pass 'prune' must be a list"),
    (lambda: tz.Prune(exclude=None), "exclude of pass 'prune' must be a list"),
    (lambda: tz.Codebook(bits=True), "bits must be an integer"),
    (lambda: tz.Quantize(group_size=True), "group_size must be 0"),
    (lambda: tz.Quantize(bits=8.0), "bits=8 only"),
    (lambda: tz.Prune(start_step=-5), "start_step must be a non-negative integer"),
])
def test_argument_types_are_checked(make, match):
    with pytest.raises(RecipeError, match=match):
        make()


def test_misused_entry_points_raise_named_errors(tmp_path):
    for call, match in (
        (lambda: tz.compress("model", [tz.Prune()]), "needs an nn.Module"),
        (lambda: tz.freeze("x"), "needs an nn.Module"),
        (lambda: tz.summary(5), "needs an nn.Module"),
        (lambda: tz.export(5, tmp_path / "x.tzip"), "needs an nn.Module"),
        (lambda: tz.export(net(), tmp_path), "is a directory"),
        (lambda: tz.step(None), "needs the compressed nn.Module"),
        (lambda: tz.compress(net(), [tz.Prune()], teachr=net()), r"unknown keyword argument\(s\) \['teachr'\]"),
        (lambda: tz.compress(net(), [tz.Prune(overrides={"lyaer.*": {"sparsity": 0.1}})]), "matches no layer"),
        (lambda: tz.compress(nn.Linear(3, 3), [tz.Prune(pattern="2:4")]), "no targeted layer can take the recipe: 2:4 needs"),
        (lambda: tz.compress(net(), [tz.Prune(), "quantize"]), "not both: item #2"),
    ):
        with pytest.raises(tz.TorchzipError, match=match):
            call()


def test_distill_problems_fail_before_an_inplace_compress_touches_the_model():
    model = net()
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(tz.TorchzipError, match="no layer named 'nothere'"):
        tz.compress(model, [tz.Prune(), tz.Distill(features={"nothere": "2"})], inplace=True, progress=False)
    assert _unchanged(model, snapshot)
    recipe = tz.Recipe([tz.Prune(), tz.Distill()])
    tz.compress(model, recipe, inplace=True, progress=False)
    with pytest.raises(tz.DistillationError, match="shares parameters"):
        recipe.callbacks(model, teacher=model)
