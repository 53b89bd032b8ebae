"""Committed .tzip files load bit for bit: every tensor and module type as recorded when they were
written (tests/golden_models.py). A change made alike to encoder and decoder fails here."""

import hashlib
import json

import pytest

import torchzip as tz
from golden_models import HERE, build, describe, skeleton

EXPECTED = json.loads((HERE / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_file_loads_bit_for_bit(name):
    path = HERE / f"{name}.tzip"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED[name]["file_sha256"], "the golden file itself changed"
    loaded = tz.load(path, skeleton(), progress=False)
    got = describe(loaded)
    assert got["modules"] == EXPECTED[name]["modules"]
    assert got["tensors"].keys() == EXPECTED[name]["tensors"].keys()
    for key, want in EXPECTED[name]["tensors"].items():
        assert got["tensors"][key] == want, key


BUILT = json.loads((HERE / "built.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_recipe_builds_what_was_recorded(name, tmp_path):
    """The model each golden recipe builds today is the recorded one (freeze and compress
    unchanged unless built.json was rewritten on purpose), and today's writer round-trips it."""
    frozen = build(name)
    got = describe(frozen)
    assert got["tensors"] == BUILT[name]
    assert got["modules"] == EXPECTED[name]["modules"]
    tz.export(frozen, tmp_path / "m.tzip", progress=False)
    assert describe(tz.load(tmp_path / "m.tzip", skeleton(), progress=False))["tensors"] == BUILT[name]


def test_every_format_and_value_kind_has_a_golden_file():
    formats = {t for e in EXPECTED.values() for t in e["modules"].values() if t.endswith("Weight")}
    assert formats == {cls.__name__ for cls in tz.packed.FORMATS.values()}
    seen = set()
    for name in EXPECTED:
        manifest, _ = tz.read_manifest(HERE / f"{name}.tzip")
        for entry in manifest["layers"]:
            seen.add((entry["format"], entry.get("values"), entry["tensors"].get("positions", {}).get("order")))
    for fmt in ("sparse24", "csr"):
        assert {v for f, v, _ in seen if f == fmt} == {"float", "int8", "codebook"}
    assert {o for f, _, o in seen if f == "csr"} == {"row", "col"}
