"""Fine-tuning a compressed model: callbacks, knowledge distillation, and ``finetune``.

A *callback* is what a training loop calls around each optimizer step. Through it the recipe's
gradual schedules advance (:func:`torchzip.step`), and a :class:`DistillationCallback` adds a
teacher's knowledge to the loss. In a loop of your own it takes two lines::

    cb = DistillationCallback(teacher, student=model)
    for x, y in loader:
        loss = cb.loss(model(x), y, x)          # alpha * KD + (1 - alpha) * task [+ features]
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        cb.step()                               # advance the schedules once

:func:`finetune` is that loop written out, with progress bars and a per-epoch history.
"""

from torchzip.train.batches import call_model, default_task_loss, eval_mode, extract_logits, split_batch, unwrap
from torchzip.train.callbacks import Callback
from torchzip.train.distill import DistillationCallback, kd_loss
from torchzip.train.loop import finetune

__all__ = ["Callback", "DistillationCallback", "kd_loss", "finetune", "call_model", "default_task_loss",
           "eval_mode", "extract_logits", "split_batch", "unwrap"]
