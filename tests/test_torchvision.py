"""torchvision architectures (small configurations of each family, random weights) through every
shipped recipe: frozen equals trainable, loaded equals frozen, nearly every weight matrix packed,
and the frozen model runs in bf16. benchmarks/models.py runs the full-size models."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ConvNeXt, SwinTransformer, VisionTransformer, efficientnet, mobilenet_v3_small
from torchvision.models.convnext import CNBlockConfig

import torchzip as tz
from conftest import plain_attention
from torchzip.packed.layers import PackedLayer

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
MODELS = {
    "mobilenet_v3": lambda: mobilenet_v3_small(num_classes=10, width_mult=0.25),
    "efficientnet": lambda: efficientnet.EfficientNet(
        efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.34)[0], 0.2, num_classes=10),
    "convnext": lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10),
    "vit": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                                     num_classes=10),
    "swin": lambda: SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                                    num_classes=10),
}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    for m in model.modules():  # ViT zero-initialises its head: give it weights, or every output is 0
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.1)
    return model


def packed_share(dense: torch.nn.Module, frozen: torch.nn.Module) -> float:
    """Share of the dense model's weight-matrix parameters (2-D and up, ties once) now packed."""
    total = sum(p.numel() for p in {id(p): p for p in dense.parameters()}.values() if p.dim() >= 2)
    weights = {id(getattr(m, a)): getattr(m, a) for m in frozen.modules() if isinstance(m, PackedLayer)
               for a in m.packed_weights().values()}
    return sum(p.shape[0] * p.shape[1] for p in weights.values()) / total


def run(model, x):
    with torch.no_grad(), plain_attention():
        return model(x)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arch", list(MODELS))
def test_every_shipped_recipe(arch, recipe, tmp_path):
    model = build(arch)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers a pattern cannot take (2:4 on a 27-input stem) are skipped with one
        small = tz.compress(model, str(recipe), progress=False)
    tz.schedule.finish(small)  # gradual recipes: their end state, as `torchzip compress` writes it
    expected = run(small, x)
    frozen = tz.freeze(small)
    assert torch.equal(run(frozen, x), expected)
    if recipe.stem in ("int8", "codebook4"):
        assert packed_share(model, frozen) >= 0.98
    tz.export(frozen, tmp_path / "m.tzip", progress=False)
    loaded = tz.load(tmp_path / "m.tzip", build(arch), progress=False)
    assert torch.equal(run(loaded, x), expected)
    low = run(loaded.to(torch.bfloat16), x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    assert (low.float() - expected).norm() <= 0.1 * expected.norm() + 1e-3


def test_resnet_int8_packs_every_weight_matrix():
    model = torchvision.models.resnet18(num_classes=10).eval()
    frozen = tz.freeze(tz.compress(model, [tz.Quantize()], progress=False))
    assert packed_share(model, frozen) == 1.0
