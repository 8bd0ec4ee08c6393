"""Evaluation: top-k error over a loader, 10-crop and multi-scale testing, layer responses."""

from .crops import RawLoader, multiscale_predict, single_predict, ten_crop_predict, ten_crops
from .metrics import evaluate, topk_correct
from .responses import layer_responses

__all__ = [
    "RawLoader",
    "evaluate",
    "layer_responses",
    "multiscale_predict",
    "single_predict",
    "ten_crop_predict",
    "ten_crops",
    "topk_correct",
]
