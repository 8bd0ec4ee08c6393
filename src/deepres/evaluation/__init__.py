"""Evaluation: top-k error over a loader, 10-crop and multi-scale testing, layer responses."""

from .crops import RawLoader, multiscale_predict, single_predict, ten_crop_predict, ten_crops
from .metrics import evaluate, topk_correct
from .responses import layer_responses
from .views import centre_view, evaluate_views, scale_views, ten_crop_views

__all__ = [
    "RawLoader",
    "centre_view",
    "evaluate",
    "evaluate_views",
    "layer_responses",
    "multiscale_predict",
    "scale_views",
    "single_predict",
    "ten_crop_predict",
    "ten_crop_views",
    "ten_crops",
    "topk_correct",
]
