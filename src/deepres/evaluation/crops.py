"""Test-time evaluation of the paper (section 3.4): the standard 10-crop test and the fully-convolutional
multi-scale test. Both take uint8 batches, so crops and resizes happen on raw pixels, before normalisation, exactly as
training saw them; scores are softmax probabilities averaged over views, returned as log-probabilities."""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..tasks.classification import main_logits

__all__ = ["RawLoader", "centre_crop", "centre_offsets", "multiscale_predict", "resize_shorter", "single_predict",
           "ten_crop_predict", "ten_crops"]


class RawLoader:
    """A split's uint8 images and labels in batches (for predictors that crop or resize before normalising)."""

    def __init__(self, split, batch_size: int):
        self.split, self.batch_size = split, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for lo in range(0, len(self.split), self.batch_size):
            yield self.split.images[lo : lo + self.batch_size], self.split.labels[lo : lo + self.batch_size]


def ten_crops(images: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The four corner crops and the centre crop of ``size``, then the same five of the mirrored images."""
    h, w = images.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop size {size} is larger than the images ({h}x{w})")
    top, left = centre_offsets(h, w, size)
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    crops = [images[..., y : y + size, x : x + size] for y, x in corners]
    return crops + [c.flip(-1) for c in crops]


def _average(model, views: Sequence[torch.Tensor], normalizer) -> torch.Tensor:
    probs = None
    for view in views:
        p = F.softmax(main_logits(model(normalizer(view))).float(), dim=1)
        probs = p if probs is None else probs + p
    return torch.log(probs / len(views))


def single_predict(normalizer) -> Callable:
    return lambda model, images: main_logits(model(normalizer(images)))


def ten_crop_predict(normalizer, crop_size: int, pad: int = 0) -> Callable:
    """10-crop test. ``pad``: zero-padding first, so images of the crop's own size (CIFAR) still give ten views,
    the same padded canvas training crops come from."""

    def predict(model, images):
        if pad:
            images = F.pad(images, (pad, pad, pad, pad))
        return _average(model, ten_crops(images, crop_size), normalizer)

    return predict


def centre_offsets(h: int, w: int, size: int | Sequence[int]) -> tuple[int, int]:
    """(top, left) of the centre crop of ``size`` (a side, or (height, width)), rounded as torchvision's
    ``center_crop`` rounds (the training pipelines' test transform), so every test view puts the centre crop where
    the run's own tests did."""
    ch, cw = (size, size) if isinstance(size, int) else size
    return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))


def centre_crop(images: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    ch, cw = (size, size) if isinstance(size, int) else size
    top, left = centre_offsets(*images.shape[-2:], (ch, cw))
    return images[..., top : top + ch, left : left + cw]


def resize_shorter(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images (..., C, H, W) with the shorter side resized to ``side`` (bilinear, antialiased), by the same
    kernel and output size as the training pipelines' ``v2.Resize(side)``."""
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, [side], antialias=True)


def multiscale_predict(normalizer, scales: Sequence[int], flip: bool = True) -> Callable:
    """Fully-convolutional test: the whole image with its shorter side at each scale (and mirrored), scores
    averaged. Our nets end in global average pooling, which is the convolutional form's averaged score map."""

    def predict(model, images):
        views = []
        for s in scales:
            resized = resize_shorter(images, s)
            views.append(resized)
            if flip:
                views.append(resized.flip(-1))
        return _average(model, views, normalizer)

    return predict
