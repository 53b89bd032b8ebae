"""The Deep Compression benchmark, fast: one fold, few epochs, through the public API."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import deep_compression  # noqa: E402


def test_quick_run_reproduces_predictions_and_compresses_20x(capsys):
    threads = torch.get_num_threads()
    try:
        result = deep_compression.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    (fold,) = result["folds"]
    assert fold["loaded_matches_finetuned"], "the loaded artifact must predict exactly as the fine-tuned model"
    assert fold["ratio"] > 20
    assert fold["tzip_bytes"] * fold["ratio"] == fold["fp32_bytes"] == 4 * (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)
    assert 0.04 < fold["weights_kept"] < 0.06
    assert result["compressed_accuracy"] > 0.8  # a short run, yet far above chance
    assert "ratio" in capsys.readouterr().out
