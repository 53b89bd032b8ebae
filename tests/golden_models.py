"""The golden .tzip files under tests/golden/: one small model per packed format and value kind.

    python tests/golden_models.py          # rewrite the files and expected.json (a deliberate format change)
    python tests/golden_models.py --built  # rewrite built.json only (a deliberate change to what a pass computes)

``tests/test_golden.py`` loads each committed file and checks every tensor bit for bit against
``expected.json``, so a change made to the encoder and the decoder alike cannot pass unnoticed.
The files stay as written by an earlier release (old files must keep loading); ``built.json``
records what the recipes compute today (e.g. k-means centroids), which may change on purpose.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent / "golden"


def skeleton() -> nn.Sequential:
    """The architecture every golden file holds (dense leftovers: an embedding, a norm, a conv)."""
    return nn.Sequential(
        nn.Embedding(20, 24), nn.Flatten(), nn.Linear(72, 40), nn.LayerNorm(40), nn.Linear(40, 36), nn.ReLU(),
        nn.Linear(36, 28), nn.Unflatten(1, (1, 28)), nn.Conv1d(1, 4, 3),
    )


def recipes() -> dict[str, list]:
    """File name -> recipe; layers 2, 4 and 6 take different value kinds of the same format."""
    import torchzip as tz

    three = ["2", "4", "6"]
    return {
        "int8": [tz.Quantize(targets=["Linear"], overrides={"4": {"group_size": 4}}), tz.QuantizeBias(targets=["Linear"], exclude=["6"])],
        "codebook": [tz.Codebook(bits=3, granularity="channel", targets=["Linear", "Embedding"], overrides={"4": {"granularity": "layer", "bits": 5}})],
        "sparse24": [tz.Prune(pattern="2:4", targets=["Linear"]), tz.Quantize(targets=["Linear"], exclude=["2", "6"]),
                     tz.Codebook(bits=2, granularity="channel", targets=["Linear"], exclude=["2", "4"])],
        "csr": [tz.Prune(sparsity=0.9, targets=["Linear"]), tz.Quantize(targets=["Linear"], exclude=["2", "6"]),
                tz.Codebook(bits=4, granularity="layer", targets=["Linear"], exclude=[n for n in three if n != "6"])],
    }


def build(name: str) -> nn.Module:
    """The frozen model of golden file ``name`` (deterministic: fixed seed)."""
    import torchzip as tz

    torch.manual_seed(1234)
    model = skeleton()
    if name == "csr":
        with torch.no_grad():
            model[4].weight[:, 5] *= 100  # a strong input column: column-major gaps for one layer
            model[2].weight[:, :30] = 0  # dead inputs: long runs of pruned positions
    return tz.freeze(tz.compress(model, recipes()[name], progress=False)).eval()


def digest(t: torch.Tensor) -> dict:
    """Dtype, shape and SHA-256 of a tensor's bytes."""
    t = t.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()}


def describe(model: nn.Module) -> dict:
    """What a loaded golden model must hold: every state_dict tensor and every module's type."""
    return {"tensors": {k: digest(v) for k, v in model.state_dict().items()},
            "modules": {k or "(model)": type(m).__name__ for k, m in model.named_modules()}}


def write_built() -> None:
    """Record what each golden recipe builds today (tensor digests) in built.json."""
    built = {name: describe(build(name))["tensors"] for name in recipes()}
    (HERE / "built.json").write_text(json.dumps(built, indent=1, sort_keys=True) + "\n")


def main() -> int:
    import torchzip as tz

    if "--built" in sys.argv[1:]:
        write_built()
        return 0
    HERE.mkdir(exist_ok=True)
    expected = {}
    for name in recipes():
        path = HERE / f"{name}.tzip"
        tz.export(build(name), path, progress=False)
        expected[name] = describe(tz.load(path, skeleton(), progress=False))
        expected[name]["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path.name}: {path.stat().st_size} bytes")
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    write_built()
    return 0


if __name__ == "__main__":
    sys.exit(main())
