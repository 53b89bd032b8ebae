"""Every Python block of the README runs exactly as written, so it never drifts from the code."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_code_runs(tmp_path, capsys, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3, "README lost its code examples"
    # Run where recipes/ resolves, writing model.tzip into a scratch copy of the recipes folder.
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for code in blocks:  # later blocks build on names the earlier ones define
        exec(compile(code, "README.md", "exec"), namespace)
    assert "smaller in memory than fp32" in capsys.readouterr().out
    assert os.path.getsize("model.tzip") > 0
