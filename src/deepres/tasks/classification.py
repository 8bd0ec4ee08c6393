"""Supervised classification: cross-entropy on hard labels or soft targets (CutMix/Mixup), label smoothing,
and auxiliary heads (GoogLeNet) weighted as their paper does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Task

__all__ = ["ClassificationTask", "main_logits"]

AUX_WEIGHT = 0.3  # GoogLeNet (Szegedy et al. 2015): auxiliary losses weighted by 0.3


def main_logits(outputs) -> torch.Tensor:
    """The main logits of a model's output: a tensor, or a tuple/namedtuple whose first item is the main logits."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs[0]


class ClassificationTask(Task):
    def __init__(self, label_smoothing: float = 0.0, aux_weight: float = AUX_WEIGHT):
        self.label_smoothing = label_smoothing
        self.aux_weight = aux_weight

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if targets.dtype == torch.int64:
            return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if self.label_smoothing:
            k = logits.shape[1]
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / k
        return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()

    def loss(self, outputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, main logits). Auxiliary outputs, when a model returns them in training, add aux_weight x their
        loss."""
        logits = main_logits(outputs)
        loss = self.criterion(logits, targets)
        if not isinstance(outputs, torch.Tensor):
            for aux in list(outputs)[1:]:
                if aux is not None:
                    loss = loss + self.aux_weight * self.criterion(aux, targets)
        return loss, logits
