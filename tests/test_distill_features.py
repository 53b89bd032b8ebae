"""Features-only distillation (encoders: no logits, no labels)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchzip as tz


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 8))

    def forward(self, x, mask=None):
        h = self.body(x)
        pooled = h.mean(1) if mask is None else (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(pooled, dim=-1)


@pytest.mark.parametrize("feature_loss", ["mse", "cosine"])
def test_features_only_loss_is_the_feature_distance_alone(feature_loss):
    teacher = Encoder()
    student = tz.compress(teacher, [tz.Codebook(bits=2, granularity="layer")], progress=False)
    cb = tz.DistillationCallback(teacher, features={"": "", "body.0": "body.0"}, features_only=True,
                                 feature_loss=feature_loss, feature_weight=3.0, student=student)
    x = {"x": torch.randn(5, 7, 12), "mask": (torch.rand(5, 7) > 0.3).float() + torch.eye(5, 7)}
    loss = cb.loss(student(**x), None, x)  # no targets, no logits
    with torch.no_grad():
        pairs = [(student(**x), teacher(**x)), (student.body[0](x["x"]), teacher.body[0](x["x"]))]
    ref = sum(F.mse_loss(s, t) if feature_loss == "mse" else (1 - F.cosine_similarity(s, t, dim=-1)).mean()
              for s, t in pairs)
    assert torch.allclose(loss.detach(), 3.0 * ref, rtol=1e-5)
    assert len(cb.projections) == 0  # widths match: no projection


def test_features_only_finetune_brings_the_student_closer():
    torch.manual_seed(0)
    teacher = Encoder()
    student = tz.compress(teacher, [tz.Codebook(bits=2, granularity="layer")], progress=False)
    batches = [{"x": torch.randn(16, 5, 12)} for _ in range(8)]
    held = torch.randn(64, 5, 12)

    def cos():
        with torch.no_grad():
            return float(F.cosine_similarity(student(held), teacher(held), dim=-1).mean())

    before = cos()
    recipe = tz.Recipe([tz.Distill(features={"": ""}, features_only=True, feature_loss="cosine")])
    tz.finetune(student, batches, callbacks=recipe.callbacks(student, teacher=teacher), epochs=4, lr=3e-3,
                progress=False)
    assert cos() > before + 0.25 * (1 - before)  # a quarter of the gap closed, at least


def test_features_only_arguments():
    with pytest.raises(tz.DistillationError, match="name at least one"):
        tz.DistillationCallback(Encoder(), features_only=True)
    with pytest.raises(tz.DistillationError, match="feature_loss"):
        tz.DistillationCallback(Encoder(), features={"": ""}, feature_loss="l1")
    with pytest.raises(tz.RecipeError, match="features_only must be True or False"):
        tz.Recipe.from_yaml("passes:\n  - distill: {features_only: 1, features: ['']}\n")
