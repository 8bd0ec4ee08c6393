"""Evaluation: top-k error over a loader, 10-crop and multi-scale testing, layer responses."""

from .metrics import evaluate, topk_correct

__all__ = ["evaluate", "topk_correct"]
