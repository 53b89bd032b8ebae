"""16-bit centroids for float32 models: rounded while training, stored in float16, loaded exactly."""

import pytest
import torch
from torch import nn

import torchzip as tz


def build():
    return nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 7))


@pytest.mark.parametrize("calibrated", [False, True])
def test_float16_centroids_are_stored_in_16_bits_and_load_exactly(tmp_path, calibrated):
    model = build()
    data = [torch.randn(32, 96)] if calibrated else None
    sizes, frozen = {}, {}
    for dtype in ("float32", "float16"):
        recipe = [tz.Codebook(bits=4, granularity="channel", centroid_dtype=dtype)]
        student = tz.compress(model, recipe, progress=False, calibration=data)
        book = student[0].parametrizations.weight[0].centroids.detach()
        if dtype == "float16":
            assert torch.equal(book.half().float(), book)
        path = tmp_path / f"{dtype}.tzip"
        sizes[dtype] = tz.export(student, path, progress=False)
        manifest, _ = tz.read_manifest(path)
        layer = next(entry for entry in manifest["layers"] if entry["name"] == "0")
        assert layer["tensors"]["codebook"]["dtype"] == dtype
        frozen[dtype] = tz.freeze(student)
        x = torch.randn(5, 96)
        loaded = tz.load(path, build(), progress=False)
        assert torch.equal(loaded(x), frozen[dtype](x))
        assert torch.allclose(student(x), frozen[dtype](x), atol=1e-5)
        again = tmp_path / f"{dtype}-again.tzip"
        assert tz.export(loaded, again, progress=False) == sizes[dtype]  # the flag survives a round trip
    # Two bytes saved per centroid: 40 + 7 rows of 16 centroids.
    assert sizes["float32"] - sizes["float16"] >= 2 * 16 * (40 + 7) - 64


def test_centroid_dtype_argument():
    with pytest.raises(tz.RecipeError, match="centroid_dtype must be one of"):
        tz.Codebook(centroid_dtype="bfloat16")


@pytest.mark.parametrize("calibrated", [False, True])
def test_group_codebooks_store_one_table_per_group_of_rows(tmp_path, calibrated):
    model = build()
    data = [torch.randn(128, 96)] if calibrated else None
    sizes, x = {}, torch.randn(5, 96)
    for granularity in ("channel", "group", "layer"):
        recipe = [tz.Codebook(bits=3, granularity=granularity, group_rows=6, centroid_dtype="float16")]
        student = tz.compress(model, recipe, progress=False, calibration=data)
        quant = student[0].parametrizations.weight[0]
        values = quant.centroids.detach()[:, :].repeat_interleave(quant.group_rows, 0)[:40].gather(1, quant.indices())
        assert torch.equal(values, student[0].weight.detach())  # row r uses table r // 6
        path = tmp_path / f"{granularity}.tzip"
        sizes[granularity] = tz.export(student, path, progress=False)
        manifest, _ = tz.read_manifest(path)
        layer = next(entry for entry in manifest["layers"] if entry["name"] == "0")
        if granularity == "group":
            assert quant.centroids.shape == (7, 8)  # ceil(40 / 6) groups, the last of 4 rows
            assert layer["group_rows"] == 6 and layer["tensors"]["codebook"]["shape"] == [7, 8]
        loaded = tz.load(path, build(), progress=False)
        assert torch.equal(loaded(x), tz.freeze(student)(x))
    assert sizes["layer"] < sizes["group"] < sizes["channel"]


def test_group_rows_argument():
    with pytest.raises(tz.RecipeError, match="group_rows must be an integer >= 1"):
        tz.Codebook(granularity="group", group_rows=0)
