"""The README's quick start runs exactly as written, so it never drifts from the code."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_quick_start_runs(tmp_path, capsys):
    blocks = python_blocks("Quick start")
    assert blocks, "README has no quick-start code"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the quick start names recipes/ relative to the repository
    try:
        for code in blocks:
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    assert "smaller than fp32" in capsys.readouterr().out
