"""The test vector in docs/FORMAT.md parses to the manifest and the weight the document states."""

import json
import re
from pathlib import Path

import torch
from torch import nn

import torchzip as tz
from torchzip.export import container

DOC = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()


def _vector() -> tuple[bytes, dict, list]:
    section = DOC[DOC.index("## Test vector"):]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
    dump = next(body for lang, body in blocks if not lang)
    data = b"".join(bytes.fromhex(line.split(":", 1)[1]) for line in dump.splitlines())
    manifest = json.loads(next(body for lang, body in blocks if lang == "json"))
    weight = json.loads(next(body for lang, body in blocks if lang == "text"))
    return data, manifest, weight


def test_the_documented_vector_parses_to_what_the_document_says(tmp_path):
    data, manifest, weight = _vector()
    assert len(data) == 331 == manifest["file_size"]
    parsed, sections = container.parse(data)
    assert parsed == manifest
    assert bytes(sections[0]).hex(" ") == "11 b4 2e 00 00 00 bf 00 00 00 3f"
    (tmp_path / "v.tzip").write_bytes(data)
    model = tz.load(tmp_path / "v.tzip", nn.Sequential(nn.Linear(8, 2, bias=False)), progress=False)
    assert type(model[0]).__name__ == "PackedLinear"
    assert torch.equal(model[0].weight, torch.tensor(weight))
    # The prose: header fields and the codebook as float32.
    assert data[8:12] == (2).to_bytes(4, "little") and data[12:16] == (0x66C299F6).to_bytes(4, "little")
    assert int.from_bytes(data[16:24], "little") == 0x11B == 283
    assert torch.equal(torch.frombuffer(bytearray(data[-8:]), dtype=torch.float32), torch.tensor([-0.5, 0.5]))
