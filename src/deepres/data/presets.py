"""Augmentation presets (PAPER.md section 5) and the augmentations beyond the paper.

Two kinds of callables:

- batched device ops for :class:`~deepres.data.loaders.DeviceLoader`: ``augment(uint8 (N, C, H, W), generator)`` and
  ``mix(float images, int64 labels, generator) -> (images, float (N, K) targets)``; every random number comes from
  the step's CPU generator, so a batch is a function of (seed, step) on any device;
- per-image torchvision ``transforms.v2`` pipelines for the worker loader (paper ImageNet), fed from the worker's
  per-sample seed.

The per-image policies (RandAugment, TrivialAugment, ``data.augment``) are batched in :mod:`deepres.data.policies`.

The paper's CIFAR augmentation (pad 4, random 32 crop, flip) is :func:`deepres.data.loaders.random_crop_flip`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_EIGVAL",
    "IMAGENET_EIGVEC",
    "Compose",
    "CutMix",
    "MixChoice",
    "Mixup",
    "RandomErasing",
    "augment_policy",
    "pca_lighting",
    "paper_imagenet_eval",
    "paper_imagenet_train",
    "imagenet_scales",
]

# AlexNet-style PCA colour augmentation (Krizhevsky et al. 2012): eigenvalues and eigenvectors (columns) of the
# covariance of ImageNet RGB pixels in [0, 1], as used by fb.resnet.torch for the paper's ImageNet models.
IMAGENET_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = torch.tensor(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
)


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw determined by ``generator`` (torch's Beta takes no generator)."""
    return float(np.random.default_rng(_seed_from(generator)).beta(alpha, alpha))


class Compose:
    """Batched augmentations applied in order, all drawing from the same step generator."""

    def __init__(self, *ops: Callable):
        self.ops = [op for op in ops if op is not None]

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for op in self.ops:
            images = op(images, generator)
        return images

    def __repr__(self) -> str:
        return f"Compose({', '.join(getattr(o, '__name__', repr(o)) for o in self.ops)})"


def augment_policy(cfg, batched: bool = True):
    """The per-image augmentation policy of a data config, or None: RandAugment (:class:`RandAugmentBatch`),
    TrivialAugment Wide (:class:`TrivialAugmentBatch`) or ``data.augment``'s random subset (:class:`RandomSubset`).
    ``batched``: the policy of a uint8 batch and the step's generator, as the device loader runs it; else the same
    policy as a per-image transform (:class:`OneImage`), as the worker loader runs it."""
    from .policies import RandAugmentBatch, TrivialAugmentBatch, random_subset

    if cfg.randaugment_n > 0:
        policy = RandAugmentBatch(cfg.randaugment_n, cfg.randaugment_m)
    elif cfg.trivialaugment:
        policy = TrivialAugmentBatch()
    else:
        policy = random_subset(cfg)
    return policy if policy is None or batched else policy.one_image()


class RandomErasing:
    """Random erasing (Zhong et al. 2020) on a normalised float batch, each image with probability ``p``: a
    rectangle of a uniform fraction ``scale`` of the image's area and a log-uniform aspect ratio in ``ratio`` (up to
    ``attempts`` draws for one that fits, else the image is left alone) is set to 0, the mean after normalisation.
    torchvision's ``RandomErasing`` defaults and algorithm, drawn for a whole batch from the step's generator:
    :meth:`boxes` draws, :meth:`apply` erases (so a DDP rank can erase its slice of the global batch's draws)."""

    def __init__(self, p: float, scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
                 attempts: int = 10):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"data.random_erasing must be a probability in [0, 1]; got {p}")
        self.p, self.scale, self.ratio, self.attempts = p, scale, ratio, attempts

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 4) int64 rows of (top, left, box height, box width); height 0: the image is not erased."""
        erase = torch.rand(n, generator=generator) < self.p
        area = height * width * torch.empty(n, self.attempts).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(n, self.attempts).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]),
                                                           generator=generator)
        h = torch.round(torch.sqrt(area * torch.exp(log_ratio))).long()
        w = torch.round(torch.sqrt(area / torch.exp(log_ratio))).long()
        fits = (h < height) & (w < width)
        first = fits.long().argmax(dim=1)  # the first draw that fits (0 when none does: masked below)
        rows = torch.arange(n)
        h, w = h[rows, first], w[rows, first]
        keep = erase & fits.any(dim=1)
        top = (torch.rand(n, generator=generator) * (height - h + 1)).long()
        left = (torch.rand(n, generator=generator) * (width - w + 1)).long()
        return torch.stack([top, left, h * keep, w * keep], dim=1)

    @staticmethod
    def apply(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``images`` (N, C, H, W) with each row's box set to 0."""
        boxes = boxes.to(images.device)
        ys = torch.arange(images.shape[-2], device=images.device)
        xs = torch.arange(images.shape[-1], device=images.device)
        top, left, h, w = boxes.unbind(1)
        inside = (((ys >= top[:, None]) & (ys < (top + h)[:, None]))[:, :, None]
                  & ((xs >= left[:, None]) & (xs < (left + w)[:, None]))[:, None, :])
        return images.masked_fill(inside[:, None], 0.0)

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p})"


def _as_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if labels.dtype.is_floating_point:
        return labels
    return F.one_hot(labels, num_classes).float()


class CutMix:
    """CutMix (Yun et al. 2019) on a batch: a box of area ~(1 - lam), lam ~ Beta(alpha, alpha), is pasted from a
    permutation of the batch into every image (one box per batch). The box is clipped at the borders and the label
    weight is the exact pasted fraction: targets = (1 - area) * y + area * y[perm]."""

    def __init__(self, alpha: float, num_classes: int):
        if alpha <= 0:
            raise ValueError(f"data.cutmix_alpha must be > 0; got {alpha}")
        self.alpha, self.num_classes = alpha, num_classes
        self.last_box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1), for tests and debugging

    def box(self, h: int, w: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        lam = _beta(self.alpha, generator)
        ratio = math.sqrt(1.0 - lam)
        ch, cw = int(h * ratio), int(w * ratio)
        cy = int(torch.randint(0, h, (1,), generator=generator))
        cx = int(torch.randint(0, w, (1,), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        return y0, y1, x0, x1

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        n, _, h, w = images.shape
        perm = torch.randperm(n, generator=generator).to(images.device)
        y0, y1, x0, x1 = self.box(h, w, generator)
        self.last_box = (y0, y1, x0, x1)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
        area = (y1 - y0) * (x1 - x0) / (h * w)
        weights = _as_weights(labels, self.num_classes)
        return images, (1.0 - area) * weights + area * weights[perm]


class Mixup:
    """Mixup (Zhang et al. 2018): x = lam * x + (1 - lam) * x[perm], targets likewise, lam ~ Beta(alpha, alpha)."""

    def __init__(self, alpha: float, num_classes: int):
        if alpha <= 0:
            raise ValueError(f"data.mixup_alpha must be > 0; got {alpha}")
        self.alpha, self.num_classes = alpha, num_classes

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
        lam = _beta(self.alpha, generator)
        weights = _as_weights(labels, self.num_classes)
        return lam * images + (1.0 - lam) * images[perm], lam * weights + (1.0 - lam) * weights[perm]


class MixChoice:
    """One of several mixes per batch, chosen uniformly (timm's CutMix/Mixup switch with probability 0.5)."""

    def __init__(self, mixes: Sequence[Callable]):
        self.mixes = list(mixes)

    def __call__(self, images, labels, generator):
        i = int(torch.randint(0, len(self.mixes), (1,), generator=generator))
        return self.mixes[i](images, labels, generator)


def pca_lighting(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    alphastd: float = 0.1,
    eigval: torch.Tensor = IMAGENET_EIGVAL,
    eigvec: torch.Tensor = IMAGENET_EIGVEC,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """AlexNet PCA lighting on float RGB images in [0, 1] (N, 3, H, W): each image gets
    ``eigvec @ (alpha * eigval)``, alpha ~ N(0, alphastd) per image (or the given (N, 3) ``alpha``), added to every
    pixel."""
    if images.shape[1] != 3:
        raise ValueError(f"PCA lighting needs RGB images; got {images.shape[1]} channels")
    if alpha is None:
        alpha = torch.randn(images.shape[0], 3, generator=generator) * alphastd
    shift = (alpha * eigval) @ eigvec.T  # (N, 3): shift[n, c] = sum_j eigvec[c, j] * alpha[n, j] * eigval[j]
    return images + shift.to(images.device, images.dtype)[:, :, None, None]


def imagenet_scales(crop: int = 224) -> tuple[int, int, int]:
    """(shorter side min, max, eval resize) for a crop size: (256, 480, 256) at the paper's 224, scaled otherwise."""
    return round(crop * 256 / 224), round(crop * 480 / 224), round(crop * 256 / 224)


def paper_imagenet_train(crop: int = 224, policy=None):
    """Paper section 3.4, per image on uint8: shorter side random in [256, 480], random 224 crop, horizontal flip.
    ``policy`` (RandAugment or TrivialAugment, see :func:`augment_policy`) runs before the crop; PCA lighting, mean
    subtraction and random erasing are batched afterwards."""
    from torchvision.transforms import v2

    lo, hi, _ = imagenet_scales(crop)
    ops = [v2.RandomResize(lo, hi + 1, antialias=True)]
    if policy is not None:
        ops.append(policy)
    ops += [v2.RandomCrop(crop), v2.RandomHorizontalFlip()]
    return v2.Compose(ops)


def paper_imagenet_eval(crop: int = 224):
    """The standard single-crop test: shorter side 256, centre 224 crop."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(imagenet_scales(crop)[2], antialias=True), v2.CenterCrop(crop)])
