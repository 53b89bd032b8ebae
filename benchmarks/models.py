"""The models people compress, through the shipped recipes: does each work, how much is packed,
how small is the file, does the loaded model equal the frozen one, does it run in bf16.

    python benchmarks/models.py [--quick] [--models gpt2,vit_b_16] [--recipes int8,codebook4]

Models are built from configs with random weights (nothing is downloaded): GPT-2 small, a Llama
with tied embeddings, T5-small, Whisper-tiny, ViT-B/16, ResNet-50, MobileNetV3-Large,
EfficientNet-B0, ConvNeXt-T, Swin-T and a small UNet (transposed convs). Per model x recipe:
share of weight-matrix parameters packed (2-D and up, ties counted once), whole-file ratio vs the
fp32 ``state_dict`` (``torch.save``), max |loaded - frozen| output difference, whether the loaded
model runs in bf16 (and its error vs fp32), and seconds for compress, export and load. Prints a
table and writes benchmarks/results/models.json (models-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchzip as tz  # noqa: E402
from common import write_json  # noqa: E402
from torchzip.packed.layers import PackedLayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("int8", "codebook4", "sparse24_int8")
TARGETS = {"int8": 3.9, "codebook4": 6.0}  # whole-file ratio on the GPT-2-small and ViT-B rows
TARGET_MODELS = ("gpt2", "vit_b_16")
MIN_PACKED = 0.98


class UNet(nn.Module):
    """A small UNet: two downsampling stages, two transposed-conv upsampling stages, skips."""

    def __init__(self, c: int = 32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.down1, self.down2, self.mid = block(3, c), block(c, 2 * c), block(2 * c, 4 * c)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2), block(4 * c, 2 * c)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2), block(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(nn.functional.max_pool2d(a, 2))
        m = self.mid(nn.functional.max_pool2d(b, 2))
        y = self.dec2(torch.cat([self.up2(m), b], 1))
        return self.out(self.dec1(torch.cat([self.up1(y), a], 1)))


def _hf(name: str):
    import transformers as tf

    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config()), lambda: {"input_ids": torch.randint(0, 50257, (1, 32))}
    if name == "llama":
        config = tf.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                                num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True)
        return tf.LlamaForCausalLM(config), lambda: {"input_ids": torch.randint(0, 32000, (1, 32))}
    if name == "t5_small":
        return tf.T5ForConditionalGeneration(tf.T5Config()), lambda: {
            "input_ids": torch.randint(0, 32128, (1, 24)), "decoder_input_ids": torch.randint(0, 32128, (1, 8))}
    config = tf.WhisperConfig(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                              decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536)
    return tf.WhisperForConditionalGeneration(config), lambda: {
        "input_features": torch.randn(1, 80, 3000), "decoder_input_ids": torch.randint(0, 51865, (1, 8))}


def _vision(name: str):
    model = UNet() if name == "unet" else getattr(torchvision.models, name)()
    size = 64 if name == "unet" else 224
    return model, lambda: torch.randn(1, 3, size, size)


MODELS = {name: (lambda n=name: _hf(n)) for name in ("gpt2", "llama", "t5_small", "whisper_tiny")}
MODELS.update({name: (lambda n=name: _vision(n)) for name in ("vit_b_16", "resnet50", "mobilenet_v3_large",
                                                              "efficientnet_b0", "convnext_tiny", "swin_t", "unet")})
QUICK = ("whisper_tiny", "mobilenet_v3_large", "unet")


def build(name: str):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def call(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, tuple) else out


def cast(inputs, dtype):
    if isinstance(inputs, dict):
        return {k: cast(v, dtype) for k, v in inputs.items()}
    return inputs.to(dtype) if inputs.is_floating_point() else inputs


def packed_share(dense: nn.Module, frozen: nn.Module) -> float:
    total = sum(p.numel() for p in {id(p): p for p in dense.parameters()}.values() if p.dim() >= 2)
    weights = {id(getattr(m, a)): getattr(m, a) for m in frozen.modules() if isinstance(m, PackedLayer)
               for a in m.packed_weights().values()}
    return sum(w.shape[0] * w.shape[1] for w in weights.values()) / total


def fp32_file_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, buffer)
    return buffer.tell()


def run(name: str, recipe: str, folder: Path) -> dict:
    model, make_inputs = build(name)
    inputs = make_inputs()
    row = {"model": name, "recipe": recipe, "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers a pattern cannot take are skipped with a warning
        small = tz.compress(model, str(ROOT / "recipes" / f"{recipe}.yaml"), progress=False)
    frozen = tz.freeze(small)
    row["compress_s"] = time.perf_counter() - t
    row["packed_share"] = packed_share(model, frozen)
    expected = call(frozen, inputs)
    t = time.perf_counter()
    size = tz.export(frozen, folder / "m.tzip", progress=False)
    row["export_s"] = time.perf_counter() - t
    row["file_bytes"], row["fp32_bytes"] = size, fp32_file_bytes(model)
    row["file_ratio"] = row["fp32_bytes"] / size
    skeleton, _ = build(name)
    t = time.perf_counter()
    loaded = tz.load(folder / "m.tzip", skeleton, progress=False)
    row["load_s"] = time.perf_counter() - t
    row["max_abs_err_loaded_vs_frozen"] = (call(loaded, inputs) - expected).abs().max().item()
    low = call(loaded.to(torch.bfloat16), cast(inputs, torch.bfloat16)).float()
    row["bf16_works"] = bool(torch.isfinite(low).all())
    row["bf16_rel_err"] = ((low - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    row["works"] = True
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated shipped recipe names")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else (QUICK if args.quick else list(MODELS))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    print(f"{'model':<19} {'recipe':<14} {'works':<5} {'packed':>7} {'file x':>7} {'max err':>8} {'bf16 err':>9} "
          f"{'compress s':>10} {'export s':>8} {'load s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for recipe in args.recipes.split(","):
                try:
                    row = run(name, recipe, Path(tmp))
                except Exception as err:  # noqa: BLE001 - a failing row is a result of this benchmark
                    row = {"model": name, "recipe": recipe, "works": False, "error": f"{type(err).__name__}: {err}",
                           "trace": traceback.format_exc(limit=4)}
                    print(f"{name:<19} {recipe:<14} FAIL  {row['error'][:120]}")
                    rows.append(row)
                    continue
                rows.append(row)
                print(f"{name:<19} {recipe:<14} {'yes':<5} {row['packed_share']:>7.1%} {row['file_ratio']:>6.2f}x "
                      f"{row['max_abs_err_loaded_vs_frozen']:>8.1e} {row['bf16_rel_err']:>9.2e} {row['compress_s']:>10.1f} "
                      f"{row['export_s']:>8.1f} {row['load_s']:>7.1f}")
    checks = {
        "every_row_works": all(r["works"] for r in rows),
        f"packed_share_at_least_{MIN_PACKED}": all(r["packed_share"] >= MIN_PACKED for r in rows if r["works"]
                                                   and r["recipe"] in ("int8", "codebook4")),
        **{f"{m}_{rec}_file_ratio_at_least_{t}x": next((r["file_ratio"] >= t for r in rows if r["works"] and r["model"] == m
                                                        and r["recipe"] == rec), None)
           for m in TARGET_MODELS for rec, t in TARGETS.items()},
    }
    print("\n" + "\n".join(f"{k}: {'yes' if v else ('not run' if v is None else 'NO')}" for k, v in checks.items()))
    result = {"rows": rows, "checks": checks}
    path = write_json("models-quick" if args.quick else "models", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
