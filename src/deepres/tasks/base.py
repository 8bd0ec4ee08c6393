"""What a task is to the training loop.

The loop knows nothing of losses: it asks its task, in this order,

- ``prepare(model, data, config, device, teacher)`` once before the first step: a task may label an unlabeled set with
  the teacher it is given, or replace ``data.train`` with a loader over other images (the data bundle is its to
  change). A task whose ``needs_teacher`` is true gets ``(teacher model, its normalizer)``: the loop loads
  ``task.teacher``; a task never loads one;
- ``targets(images, targets)`` on every batch, inside autocast: what the loss compares against (e.g. the labels and
  the teacher's logits);
- ``loss(outputs, targets) -> (loss, main logits)``;
- ``labels(targets)``: int64 labels the logged training error is counted against;
- ``summary()``: extra fields for the run's ``summary.json`` (e.g. how many pseudo-labels were kept);
- ``training_images()``: what ``prepare`` added to the training split, for the run's start line ("" for nothing).
"""

from __future__ import annotations

import torch

__all__ = ["Task"]


class Task:
    """The do-nothing parts of the task protocol; subclasses define :meth:`loss`."""

    needs_teacher = False

    def prepare(self, model, data, config, device: torch.device, teacher=None) -> None:
        """Called once before training (also on resume, so it must be deterministic)."""

    def targets(self, images: torch.Tensor, targets):
        return targets

    def loss(self, outputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def labels(self, targets) -> torch.Tensor:
        """Hard labels of a batch's targets (soft targets: their largest class)."""
        return targets if targets.dtype == torch.int64 else targets.argmax(dim=1)

    def summary(self) -> dict:
        return {}

    def training_images(self) -> str:
        return ""
