"""Defaults a new user meets: ``summary`` returns its report and prints only when asked; progress
bars show when asked, or by default only when stderr is a terminal."""

import io
import sys

import pytest
import torch
from torch import nn

import torchzip as tz


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def model():
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_summary_returns_the_report_and_prints_only_when_asked(capsys):
    frozen = tz.freeze(tz.compress(model(), [tz.Quantize()], progress=False))
    report = tz.summary(frozen)
    assert capsys.readouterr().out == ""
    assert report.rows[0].format == "int8" and report.rows[0].bytes == 16 * 16 + 4 * 16 + 4 * 16  # int8, scales, bias
    assert repr(report) == str(report) and "total" in str(report)  # what a REPL shows
    assert tz.summary(frozen, print_table=True).bytes == report.bytes
    assert capsys.readouterr().out == str(report) + "\n"


def _run_everything(tmp_path, **progress):
    loader = [(torch.randn(4, 16), torch.randint(0, 4, (4,))) for _ in range(2)]
    # Per layer: 16-wide rows would make "auto" warn, and a warning is not a progress bar.
    small = tz.compress(model(), [tz.Codebook(bits=2, granularity="layer")], **progress)
    tz.finetune(small, loader, epochs=1, **progress)
    tz.export(small, tmp_path / "m.tzip", **progress)
    tz.load(tmp_path / "m.tzip", model(), **progress)


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
@pytest.mark.parametrize("progress", [None, True, False], ids=["default", "True", "False"])
def test_bars_show_when_asked_or_on_a_terminal(tmp_path, monkeypatch, capsys, terminal, progress):
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    _run_everything(tmp_path, **({} if progress is None else {"progress": progress}))
    shown = progress if progress is not None else terminal
    out = err.getvalue()
    for bar in ("k-means", "finetune", "export", "load"):
        assert (bar in out) == shown, (bar, out)
    if not shown:
        assert out == ""


def test_progress_must_be_a_bool_or_none(tmp_path):
    with pytest.raises(tz.TorchzipError, match="progress must be True, False or None"):
        tz.export(model(), tmp_path / "m.tzip", progress="yes")
