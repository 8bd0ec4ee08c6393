"""Augmentation presets (PAPER.md section 5) and the augmentations beyond the paper.

Two kinds of callables:

- batched device ops for :class:`~deepres.data.loaders.DeviceLoader`: ``augment(uint8 (N, C, H, W), generator)`` and
  ``mix(float images, int64 labels, generator) -> (images, float (N, K) targets)``; every random number comes from
  the step's CPU generator, so a batch is a function of (seed, step) on any device;
- per-image torchvision ``transforms.v2`` pipelines for the worker loader (paper ImageNet), fed from the worker's
  per-sample seed.

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
    "OneImage",
    "PerImageBatch",
    "RandAugmentBatch",
    "RandomErasing",
    "RandomSubset",
    "augment_policy",
    "pca_lighting",
    "paper_imagenet_eval",
    "paper_imagenet_train",
    "imagenet_scales",
    "random_subset",
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


class PerImageBatch:
    """A per-image torchvision ``v2`` transform applied to each image of a uint8 batch.

    torchvision draws from the global torch RNG; each image runs under ``torch.random.fork_rng`` seeded from the
    step generator, so batches stay a function of (seed, step) and the caller's RNG is untouched.
    """

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.transform = transform

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(0, 2**62, (images.shape[0],), generator=generator).tolist()
        out = torch.empty_like(images)
        # One intra-op thread: per-image ops on small images only lose time synchronising a pool (7x on 2 busy
        # cores). Seeding the CPU generator directly: torch.manual_seed also queues CUDA/XPU seeds, 1.5 ms a call.
        threads = torch.get_num_threads()
        if images.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                for i, seed in enumerate(seeds):
                    torch.default_generator.manual_seed(seed)
                    out[i] = self.transform(images[i])
        finally:
            torch.set_num_threads(threads)
        return out

    def __repr__(self) -> str:
        return f"PerImageBatch({self.transform!r})"


class RandAugmentBatch(PerImageBatch):
    """RandAugment(N, M) (Cubuk et al. 2020) per image of a uint8 batch, via torchvision's ``v2.RandAugment``."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9):
        from torchvision.transforms import v2

        if num_ops < 0 or not 0 <= magnitude <= 30:
            raise ValueError(f"RandAugment needs num_ops >= 0 and 0 <= magnitude <= 30; got N={num_ops}, M={magnitude}")
        self.num_ops, self.magnitude = num_ops, magnitude
        super().__init__(v2.RandAugment(num_ops=num_ops, magnitude=magnitude))

    def __repr__(self) -> str:
        return f"RandAugmentBatch(N={self.num_ops}, M={self.magnitude})"


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float64).uniform_(low, high, generator=generator)


def _warp(images: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Float (N, C, H, W) images resampled bilinearly through (N, 3, 3) homographies that map an output pixel's
    (x, y) index coordinates to the input's; pixels that fall outside are 0."""
    n, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, h * w, 3)
    mapped = points @ inverse.transpose(1, 2)  # (N, H*W, 3)
    xy = mapped[..., :2] / mapped[..., 2:]
    grid = (2 * xy + 1) / torch.tensor([w, h], dtype=torch.float64) - 1  # align_corners=False
    grid = grid.reshape(n, h, w, 2).to(device=images.device, dtype=images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _about_centre(forward: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse (output -> input) of (N, 2, 2) linear maps applied about the image centre, as (N, 3, 3)."""
    n = forward.shape[0]
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
    inverse = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    inverse[:, :2, :2] = torch.linalg.inv(forward)
    inverse[:, :2, 2] = centre - inverse[:, :2, :2] @ centre
    return inverse


class _Shear:
    """Shear along x then along y by angles drawn from [-s, s] degrees (torchvision's ``affine`` shear)."""

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, n, shape, generator):
        return {"shear": torch.stack([_uniform(n, -self.strength, self.strength, generator) for _ in range(2)], 1)}

    @staticmethod
    def apply(images, params):
        tx, ty = torch.tan(torch.deg2rad(params["shear"])).unbind(1)
        x_shear = torch.zeros(len(tx), 2, 2, dtype=torch.float64)
        x_shear[:, 0, 0] = x_shear[:, 1, 1] = 1
        x_shear[:, 0, 1] = -tx
        y_shear = x_shear.clone()
        y_shear[:, 0, 1], y_shear[:, 1, 0] = 0, -ty
        return _warp(images, _about_centre(y_shear @ x_shear, *images.shape[-2:]))


class _Rotate:
    """Rotation by an angle drawn from [-s, s] degrees about the centre (counter-clockwise when positive, as
    torchvision's ``rotate``)."""

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, n, shape, generator):
        return {"angle": _uniform(n, -self.strength, self.strength, generator)}

    @staticmethod
    def apply(images, params):
        a = torch.deg2rad(params["angle"])
        # y points down: a counter-clockwise turn on screen is a clockwise one in (x, y).
        forward = torch.stack([torch.cos(a), torch.sin(a), -torch.sin(a), torch.cos(a)], 1).reshape(-1, 2, 2)
        return _warp(images, _about_centre(forward, *images.shape[-2:]))


class _Perspective:
    """A perspective warp that moves each corner inwards by up to s x half the image's side along x and along y
    (torchvision's ``RandomPerspective`` with ``distortion_scale`` s, the moves drawn continuously)."""

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, n, shape, generator):
        return {"moves": torch.empty(n, 4, 2, dtype=torch.float64).uniform_(0, self.strength, generator=generator)}

    @staticmethod
    def apply(images, params):
        h, w = images.shape[-2:]
        corners = torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=torch.float64)
        inwards = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=torch.float64)
        moved = corners + inwards * params["moves"] * torch.tensor([w // 2, h // 2], dtype=torch.float64)
        return _warp(images, _homography(moved, corners.expand_as(moved)))


def _homography(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) homographies mapping each (N, 4, 2) ``source`` quadrilateral onto ``target`` (h33 = 1)."""
    x, y = source.unbind(-1)
    u, v = target.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)  # (N, 8, 8)
    h = torch.linalg.solve(a, torch.cat([u, v], 1))
    return torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1).reshape(-1, 3, 3)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of float RGB images (ITU-R 601, as torchvision's ``rgb_to_grayscale``); grey images as
    they are."""
    if images.shape[1] != 3:
        return images[:, :1]
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp_(0, 255)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB images (float, 0 to 255) with their HSV hue turned by ``shift`` (a fraction of the circle); value and
    saturation kept. Grey images as they are."""
    if images.shape[1] != 3:
        return images
    r, g, b = images.unbind(1)
    top, which = images.max(1)
    chroma = top - images.min(1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(which == 0, ((g - b) / safe) % 6, torch.where(which == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue + 6 * shift.to(device=images.device, dtype=images.dtype).view(-1, 1, 1)) % 6
    # Each channel from (value, chroma, hue): the closed form of the HSV -> RGB conversion.
    k = torch.stack([(hue + n) % 6 for n in (5, 3, 1)], 1)
    return top.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


class _Brightness:
    """Brightness: the image times a factor drawn from [1 - s, 1 + s] (torchvision's ``adjust_brightness``)."""

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, n, shape, generator):
        return {"brightness": _uniform(n, max(0.0, 1 - self.strength), 1 + self.strength, generator)}

    @staticmethod
    def apply(images, params):
        return _blend(images, torch.zeros_like(images), params["brightness"])


class _ColorJitter:
    """Brightness, contrast and saturation factors drawn from [1 - s, 1 + s] and a hue turn from [-s/4, s/4] of
    the circle, applied in that order (torchvision's ``adjust_*`` operations; its ``ColorJitter`` shuffles their
    order per image)."""

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, n, shape, generator):
        low, high = max(0.0, 1 - self.strength), 1 + self.strength
        factors = {key: _uniform(n, low, high, generator) for key in ("brightness", "contrast", "saturation")}
        return {**factors, "hue": _uniform(n, -self.strength / 4, self.strength / 4, generator)}

    @staticmethod
    def apply(images, params):
        images = _blend(images, torch.zeros_like(images), params["brightness"])
        images = _blend(images, _grey(images).floor().mean((1, 2, 3), keepdim=True), params["contrast"])
        if images.shape[1] == 3:
            images = _blend(images, _grey(images).floor(), params["saturation"])
        return _shift_hue(images, params["hue"])


class _Noise:
    """Gaussian noise of standard deviation s x 255 per pixel and channel."""

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, n, shape, generator):
        return {"noise": torch.randn(n, *shape, generator=generator) * (255.0 * self.strength)}

    @staticmethod
    def apply(images, params):
        return (images + params["noise"].to(device=images.device, dtype=images.dtype)).clamp_(0, 255)


AUGMENT_OPERATIONS = {"shear": _Shear, "rotate": _Rotate, "perspective": _Perspective, "brightness": _Brightness,
                      "color_jitter": _ColorJitter, "noise": _Noise}


class RandomSubset:
    """``data.augment``: a random subset of operations per image (PAPER.md section 7) on a uint8 (N, C, H, W) batch,
    batched on the batch's device. Each operation (:data:`deepres.config.AUGMENT_OPS`) is applied to an image with
    probability ``p``, independently, in the listed order; the arithmetic stays in float between operations and is
    rounded once. Every random number comes from the step's CPU generator (:meth:`draw`, a fixed count whatever the
    images), so a batch is a function of (seed, step) on any device; :meth:`apply` applies given draws."""

    def __init__(self, ops: Sequence[tuple[str, float]], p: float):
        self.names = [name for name, _ in ops]
        self.ops = [AUGMENT_OPERATIONS[name](strength) for name, strength in ops]
        self.p = p

    def draw(self, n: int, shape: Sequence[int], generator: torch.Generator) -> list[dict]:
        draws = []
        for op in self.ops:
            chosen = torch.rand(n, generator=generator) < self.p
            draws.append({"chosen": chosen, **op.draw(n, tuple(shape), generator)})
        return draws

    def apply(self, images: torch.Tensor, draws: list[dict]) -> torch.Tensor:
        x = images.float()
        for op, params in zip(self.ops, draws):
            rows = params["chosen"].nonzero().flatten()
            if len(rows):
                picked = {key: value[rows] for key, value in params.items() if key != "chosen"}
                x[rows.to(x.device)] = op.apply(x[rows.to(x.device)], picked)
        return x.round_().to(images.dtype)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], images.shape[1:], generator))

    def one_image(self) -> "OneImage":
        """This policy as a per-image transform for the worker loader."""
        return OneImage(self)

    def __repr__(self) -> str:
        return f"RandomSubset({', '.join(self.names)}; p={self.p:g})"


class OneImage:
    """A batched augmentation as a per-image transform of a (C, H, W) tensor, drawing from a generator seeded from
    the global torch RNG (the worker loader seeds it per sample, as for torchvision's transforms)."""

    def __init__(self, batched):
        self.batched = batched

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        return self.batched(image.unsqueeze(0), generator)[0]

    def __repr__(self) -> str:
        return f"OneImage({self.batched!r})"


def augment_policy(cfg):
    """The per-image augmentation policy of a data config as a torchvision ``v2`` transform: RandAugment, or
    TrivialAugment (Muller and Hutter 2021: one of 14 operations at a random strength, ``v2.TrivialAugmentWide``),
    or ``data.augment``'s random subset (each operation with probability ``data.augment_p``, in the listed order), or
    None. The device loader runs it per image of a batch (:class:`PerImageBatch`), the worker loader per sample."""
    from torchvision.transforms import v2

    if cfg.randaugment_n > 0:
        return v2.RandAugment(num_ops=cfg.randaugment_n, magnitude=cfg.randaugment_m)
    if cfg.trivialaugment:
        return v2.TrivialAugmentWide()
    if cfg.augment:
        return random_subset(cfg).one_image()
    return None


def random_subset(cfg) -> RandomSubset | None:
    """``data.augment``'s batched policy (:class:`RandomSubset`), or None when the list is empty."""
    from ..config import augment_ops

    return RandomSubset(augment_ops(cfg.augment), cfg.augment_p) if cfg.augment else None


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
