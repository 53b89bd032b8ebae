"""One rank of the DDP fine-tuning test (tests/test_ddp.py runs two of these under torchrun).

Each rank builds its student from a different seed and sees a different shard of the data; it
distils from the same teacher with a feature projection, through a gradual prune followed by a
codebook. DDP, the projection's gradient averaging and the schedules must leave every rank with
the same weights, masks, codebooks and projection. Each rank saves its state to OUT/rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchzip
from torchzip.recipe import Recipe
from torchzip.train import Callback, finetune
from torchzip.passes.codebook import Codebook
from torchzip.passes.distill import Distill
from torchzip.passes.prune import Prune

END_STEP = 8  # prune ends, codebook clusters
EPOCHS = 2  # 2 epochs x 6 steps = 12 optimizer steps


class Snapshot(Callback):
    """Keeps the distillation projection as it was before the first update."""

    def __init__(self, distill) -> None:
        super().__init__()
        self.distill = distill

    def on_step_begin(self, model: nn.Module) -> None:
        if not hasattr(self, "initial"):
            self.initial = {k: v.clone() for k, v in self.distill.state_dict().items()}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)

    torch.manual_seed(0)  # the same teacher and data on every rank
    teacher = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 4))
    x = torch.randn(96, 16)
    y = teacher(x).argmax(1).detach()

    torch.manual_seed(100 + rank)  # a different student on every rank: DDP must make them one
    student = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    recipe = Recipe([
        Prune(sparsity=0.75, end_step=END_STEP, frequency=2),
        Codebook(bits=3, start_step=END_STEP),
        Distill(alpha=0.5, temperature=2.0, features={"0": "0"}),  # width 32 vs 48: a projection
    ])
    student = torchzip.compress(student, recipe, progress=False)
    (cb,) = recipe.callbacks(student, teacher=teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    model = DistributedDataParallel(student)
    data = TensorDataset(x, y)
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, shuffle=True, seed=0))
    snapshot = Snapshot(cb)
    history = finetune(model, loader, epochs=EPOCHS, lr=1e-2, callbacks=[snapshot, cb], progress=False)

    torch.save(
        {
            "state": student.state_dict(),
            "before": before,
            "projection": cb.state_dict(),
            "projection_before": snapshot.initial,
            "history": history,
        },
        out / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
