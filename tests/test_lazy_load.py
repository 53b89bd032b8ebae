"""load into a meta-device skeleton, from a memory-mapped file: the same model, bit for bit."""

import warnings

import pytest
import torch
from torch import nn

import torchzip as tz
from torchzip.export import container


def build():
    return nn.Sequential(nn.Embedding(300, 96), nn.Linear(96, 700), nn.LayerNorm(700), nn.GELU(),
                         nn.Linear(700, 333), nn.Linear(333, 5))


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].device.type == "cpu" and sb[k].device.type == "cpu", k
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


def test_meta_skeleton_equals_ordinary_load(tmp_path, monkeypatch):
    model = tz.compress(build(), [tz.Quantize(targets=["Linear"], exclude=["5"]), tz.Codebook(bits=4, targets=["Embedding"])],
                        progress=False)
    path = tmp_path / "m.tzip"
    size = tz.export(model, path, progress=False)
    for mapped in (True, False):  # a file over MAP_AT_LEAST is memory-mapped
        monkeypatch.setattr(container, "MAP_AT_LEAST", 1024 if mapped else size + 1)
        ordinary = tz.load(path, build(), progress=False)
        with torch.device("meta"):
            skeleton = build()
        lazy = tz.load(path, skeleton, progress=False)
        same_state(ordinary, lazy)
        idx = torch.randint(0, 300, (3, 7))
        with torch.no_grad():
            assert torch.equal(lazy(idx), ordinary(idx))
            assert torch.equal(lazy(idx), tz.freeze(model)(idx))
        _, sections = container.read(path)
        assert isinstance(sections[0].obj, container.mmap.mmap) == mapped


class WithPositions(nn.Module):
    """Like BERT's position_ids: a buffer outside the state_dict, so not in the file."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("positions", torch.arange(8.0), persistent=False)

    def forward(self, x):
        return self.fc(x + self.positions)


def test_meta_skeleton_tensors_the_file_cannot_fill_are_named_in_a_warning(tmp_path):
    path = tmp_path / "m.tzip"
    tz.export(tz.compress(WithPositions(), [tz.Quantize()], progress=False), path, progress=False)
    with torch.device("meta"):
        skeleton = WithPositions()
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) of the skeleton are not in the file and stay on the meta device \(positions\)"):
        loaded = tz.load(path, skeleton, progress=False)
    assert loaded.positions.is_meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary skeleton: nothing to say
        tz.load(path, WithPositions(), progress=False)
