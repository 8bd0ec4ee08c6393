"""The paper's test-time views for image folders whose images differ in size (ImageNet layout, section 3.4).

Each image is decoded, resized and cut into views on its own (in DataLoader workers); the model sees the views of
several images at once, grouped by shape, and each image's score is the mean of its views' softmax probabilities:

- single view: shorter side to ``resize`` (256 for a 224 crop), centre crop;
- 10-crop: shorter side to ``resize``, four corners and centre, and their mirror images;
- fully-convolutional multi-scale: the whole image with its shorter side at each scale (and mirrored). Our nets end in
  global average pooling, which is the convolutional form's averaged score map.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..tasks.classification import main_logits
from .crops import centre_crop, resize_shorter, ten_crops
from .metrics import add_confusion, topk_correct

__all__ = ["centre_view", "evaluate_views", "scale_views", "ten_crop_views"]

Views = Callable[[torch.Tensor], list[torch.Tensor]]


def centre_view(crop: int, resize: int) -> Views:
    def views(image: torch.Tensor) -> list[torch.Tensor]:
        return [centre_crop(resize_shorter(image[None], resize), crop).contiguous()]

    return views


def ten_crop_views(crop: int, resize: int) -> Views:
    def views(image: torch.Tensor) -> list[torch.Tensor]:
        return [torch.cat(ten_crops(resize_shorter(image[None], resize), crop))]

    return views


def scale_views(scales: Sequence[int], flip: bool = True) -> Views:
    def views(image: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in scales:
            x = resize_shorter(image[None], s)
            out.append(torch.cat([x, x.flip(-1)]) if flip else x)
        return out

    return views


class _ViewSet(torch.utils.data.Dataset):
    def __init__(self, samples, views: Views, on_bad_image: str = "error"):
        self.samples, self.views, self.on_bad_image = samples, views, on_bad_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from ..data.images import BadImageError

        try:
            image = self.samples.load(i)
        except BadImageError as exc:  # an error travels back as a value, raised whole by the main process
            return None, exc if self.on_bad_image != "skip" else f"{exc.path}: {exc.reason}"
        return self.views(image), int(self.samples.labels[i])


def _as_list(items):
    return items


@torch.no_grad()
def evaluate_views(
    model,
    samples,
    views: Views,
    normalizer,
    *,
    device: torch.device | str = "cpu",
    images_per_batch: int = 32,
    workers: int = 0,
    autocast=None,
    confusion: bool = False,
    on_bad_image: str = "error",
) -> dict:
    """Top-1/top-5 error and loss over ``samples`` (``load(i)`` -> uint8 (C, H, W), ``labels``), each image scored by
    the mean softmax of ``views(image)``: a list of (V, C, h, w) uint8 groups. ``confusion``: also the confusion
    matrix of the scores' top-1 (rows the true class). ``on_bad_image="skip"``: an image that cannot be decoded is
    left out (``skipped_images`` lists each as "path: reason") instead of ending the test with its name."""
    from ..data.workers import _raise_errors, _worker_batches

    device = torch.device(device)
    loader = _worker_batches(torch.utils.data.DataLoader(_ViewSet(samples, views, on_bad_image),
                                                         batch_size=images_per_batch, num_workers=workers,
                                                         collate_fn=_as_list))
    ctx = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    loss = correct1 = correct5 = count = 0.0
    matrix = None
    skipped: list[str] = []
    try:
        for batch in loader:
            _raise_errors([reason for _, reason in batch])
            skipped += [reason for views_, reason in batch if views_ is None]
            batch = [item for item in batch if item[0] is not None]
            if not batch:
                continue
            probs: list[torch.Tensor | None] = [None] * len(batch)
            n_views = [sum(g.shape[0] for g in groups) for groups, _ in batch]
            # Views of one shape across the batch's images run together.
            by_shape: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
            for i, (groups, _) in enumerate(batch):
                for g in groups:
                    by_shape.setdefault(tuple(g.shape[1:]), []).append((i, g))
            for entries in by_shape.values():
                x = normalizer(torch.cat([g for _, g in entries]).to(device, non_blocking=True))
                with ctx():
                    p = F.softmax(main_logits(model(x)).float(), dim=1)
                start = 0
                for i, g in entries:
                    s = p[start : start + g.shape[0]].sum(dim=0)
                    probs[i] = s if probs[i] is None else probs[i] + s
                    start += g.shape[0]
            scores = torch.log(torch.stack([p / n for p, n in zip(probs, n_views)]))
            labels = torch.tensor([label for _, label in batch], device=scores.device)
            c1, c5 = topk_correct(scores, labels)
            loss += F.nll_loss(scores, labels, reduction="sum").item()
            correct1 += c1.item()
            correct5 += c5.item()
            count += len(batch)
            if confusion:
                matrix = add_confusion(matrix, scores, labels)
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("evaluation split is empty" + (f": all {len(skipped)} images were bad" if skipped else ""))
    out = {"loss": loss / count, "top1_error": 100.0 * (1 - correct1 / count),
           "top5_error": 100.0 * (1 - correct5 / count), "count": int(count)}
    if skipped:
        out["skipped_images"] = skipped
    if confusion:
        out["confusion"] = matrix.tolist()
    return out
