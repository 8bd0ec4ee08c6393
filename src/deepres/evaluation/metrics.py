"""Top-1 / top-5 error over a whole split, exact under DDP (sums reduced across ranks, no padded duplicates)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_sum
from ..tasks.classification import main_logits

__all__ = ["add_confusion", "evaluate", "topk_correct"]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """How many rows have their label among the top-k logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


def add_confusion(matrix: torch.Tensor | None, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``matrix`` (classes x classes, rows the true class, columns the top-1 prediction; None: a new one) with a
    batch's counts added."""
    classes = scores.shape[1]
    counts = torch.bincount(labels * classes + scores.argmax(dim=1), minlength=classes * classes)
    counts = counts.view(classes, classes).to(torch.int64)
    return counts if matrix is None else matrix + counts


@torch.no_grad()
def evaluate(model, loader, *, device=None, autocast=None, predict=None, confusion: bool = False) -> dict:
    """Loss (cross-entropy), top-1 and top-5 error (percent) of ``model`` over ``loader``'s (images, labels);
    ``confusion``: also the confusion matrix (:func:`add_confusion`) as ``confusion``, a list of rows.

    ``predict(model, images) -> logits`` replaces the plain forward (10-crop, multi-scale). Under DDP every rank
    evaluates its shard and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1 correct, top5 correct, count
    matrix = None
    ctx = autocast or contextlib.nullcontext
    try:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with ctx():
                logits = predict(model, images) if predict else main_logits(model(images))
            logits = logits.float()
            c1, c5 = topk_correct(logits, labels)
            sums += torch.stack(
                [F.cross_entropy(logits, labels, reduction="sum").double(), c1.double(), c5.double(),
                 torch.tensor(float(len(labels)), dtype=torch.float64, device=device)]
            )
            if confusion:
                matrix = add_confusion(matrix, logits, labels)
    finally:
        model.train(was_training)
    loss, c1, c5, n = all_reduce_sum(sums).tolist()
    if n == 0:
        raise ValueError("evaluation split is empty")
    out = {"loss": loss / n, "top1_error": 100.0 * (1 - c1 / n), "top5_error": 100.0 * (1 - c5 / n), "count": int(n)}
    if confusion:
        out["confusion"] = all_reduce_sum(matrix).tolist()
    return out
