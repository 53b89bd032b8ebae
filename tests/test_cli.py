import json
import subprocess
import sys

import torch

from torch import nn

import torchzip as tz
from torchzip.cli import main


def model():
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 20), nn.LayerNorm(20), nn.Linear(20, 10))


def test_inspect_matches_summary(tmp_path, capsys):
    frozen = tz.freeze(tz.compress(model(), [tz.Prune(sparsity=0.8, exclude=["4"]), tz.Quantize()], progress=False))
    path = tmp_path / "m.tzip"
    size = tz.export(frozen, path, progress=False)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = {r.name: r for r in tz.summary(frozen, print_table=False).rows}
    layers = [r for r in report["rows"] if r["name"] != "(dense tensors)"]
    assert [r["name"] for r in layers] == ["0", "2", "4"]
    for r in layers:
        s = summary[r["name"]]
        assert r["params"] == s.params
        assert abs(r["sparsity"] - s.sparsity) < 1e-12
        assert r["codec"] == s.format
    assert report["file_bytes"] == size
    assert report["fp32_bytes"] == summary_fp32(frozen)
    assert main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert "csr/int8" in table and f"{size:,}" in table


def summary_fp32(frozen):
    return tz.summary(frozen, print_table=False).fp32_bytes


def test_inspect_bad_file_exits_2_with_a_message(tmp_path):
    bad = tmp_path / "bad.tzip"
    bad.write_bytes(b"not a model")
    proc = subprocess.run([sys.executable, "-m", "torchzip.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "too short" in proc.stderr and "Traceback" not in proc.stderr


def test_compress_command_matches_the_python_api(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def mlp():\n"
        "    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 20), nn.LayerNorm(20), nn.Linear(20, 10))\n")
    monkeypatch.chdir(tmp_path)  # `torchzip compress` imports factories from the current directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    dense = model()
    torch.save(dense.state_dict(), tmp_path / "in.pt")
    recipe = tz.Recipe([tz.Prune(sparsity=0.8, end_step=20, frequency=5), tz.Codebook(bits=3, start_step=20)])
    recipe.save(tmp_path / "r.yaml")
    assert main(["compress", "--recipe", str(tmp_path / "r.yaml"), "--model", "my_models:mlp",
                 str(tmp_path / "in.pt"), str(tmp_path / "out.tzip")]) == 0
    assert "csr/codebook" in capsys.readouterr().out
    loaded = tz.load(tmp_path / "out.tzip", model(), progress=False)
    expected = tz.compress(dense, recipe, progress=False)
    for _ in range(20):
        tz.step(expected)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))
    assert abs(float((loaded[0].weight == 0).float().mean()) - 0.8) < 1e-3
    for bad, match in ((["--model", "my_models:nope"], "cannot import"), (["--model", "nomodule"], "must look like")):
        assert main(["compress", "--recipe", str(tmp_path / "r.yaml"), *bad, str(tmp_path / "in.pt"), str(tmp_path / "x.tzip")]) == 2
        assert match in capsys.readouterr().err
    assert main(["compress", "--recipe", str(tmp_path / "r.yaml"), "--model", "my_models:mlp", str(tmp_path / "in.pt"),
                 str(tmp_path / "no_dir" / "x.tzip")]) == 2
    err = capsys.readouterr().err
    assert "No such file or directory" in err and str(tmp_path / "no_dir" / "x.tzip") in err and ".tmp" not in err
    (tmp_path / "my_models.py").write_text(
        (tmp_path / "my_models.py").read_text() + "def broken():\n    raise RuntimeError('no weights here')\n")
    sys.modules.pop("my_models", None)
    assert main(["compress", "--recipe", str(tmp_path / "r.yaml"), "--model", "my_models:broken", str(tmp_path / "in.pt"),
                 str(tmp_path / "x.tzip")]) == 2
    assert "raised RuntimeError: no weights here" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["compress", "--recipe", str(tmp_path / "r.yaml"), "--model", "my_models:mlp", str(tmp_path / "junk.pt"),
                 str(tmp_path / "x.tzip")]) == 2
    assert "cannot read" in capsys.readouterr().err


def _no_constant(token):
    raise ValueError(f"{token} is not JSON")


def test_inspect_json_is_strict_json_when_a_row_stores_no_bytes(tmp_path, capsys):
    # No dense tensor at all: the dense row stores 0 bytes, whose ratio is not a number.
    frozen = tz.freeze(tz.compress(nn.Sequential(nn.Linear(16, 8, bias=False)), [tz.Quantize()], progress=False))
    tz.export(frozen, tmp_path / "m.tzip", progress=False)
    assert main(["inspect", str(tmp_path / "m.tzip"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=_no_constant)
    assert report["rows"][-1]["bytes"] == 0 and report["rows"][-1]["ratio"] is None
    assert report["rows"][0]["ratio"] == report["rows"][0]["fp32_bytes"] / report["rows"][0]["bytes"]
    assert main(["inspect", str(tmp_path / "m.tzip")]) == 0
    assert capsys.readouterr().out.splitlines()[3].rstrip().endswith("-")


def _factory_module(tmp_path, monkeypatch, name):
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\n"
        "from torch import nn\n"
        "def mlp():\n"
        "    pathlib.Path('factory_called').write_text('yes')\n"
        "    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 20), nn.LayerNorm(20), nn.Linear(20, 10))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    torch.save(model().state_dict(), tmp_path / "in.pt")
    tz.Recipe([tz.Prune(sparsity=0.8, end_step=20, frequency=5), tz.Codebook(bits=3, start_step=20)]).save(tmp_path / "r.yaml")


def test_compress_checks_the_destination_before_building_anything(tmp_path, monkeypatch, capsys):
    _factory_module(tmp_path, monkeypatch, "dest_models")
    for out, says in ((tmp_path / "no_dir" / "x.tzip", "does not exist"), (str(tmp_path / "x.tzip") + "/", "ends with a path separator"),
                      (tmp_path, "is a directory")):
        assert main(["compress", "--recipe", "r.yaml", "--model", "dest_models:mlp", "in.pt", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and str(out).rstrip("/") in err, err
        assert not (tmp_path / "factory_called").exists()  # refused before the model was built


def test_compress_shows_progress_when_asked_and_only_then(tmp_path, monkeypatch, capsys):
    _factory_module(tmp_path, monkeypatch, "progress_models")
    assert main(["compress", "--recipe", "r.yaml", "--model", "progress_models:mlp", "in.pt", "a.tzip", "--progress"]) == 0
    err = capsys.readouterr().err
    for stage in ("torchzip: compressing with 2 pass(es): prune, codebook", "torchzip: running gradual schedules to their end",
                  "torchzip: writing a.tzip"):
        assert stage in err, err
    assert "schedules: 100%" in err and "6/6" in err and "codebook: 3 layer(s)" in err  # 3 masks, 3 codebooks
    assert main(["compress", "--recipe", "r.yaml", "--model", "progress_models:mlp", "in.pt", "b.tzip"]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bars, no stage lines
    assert (tmp_path / "a.tzip").read_bytes() == (tmp_path / "b.tzip").read_bytes()
