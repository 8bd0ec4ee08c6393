"""Per-image augmentation policies, batched: every image of a uint8 (N, C, H, W) batch draws its own operations and
parameters from the step's CPU generator, and each operation runs once on the images that drew it, on the batch's
device (one ``grid_sample`` for a geometric one). The same classes serve the worker loader one image at a time
(:class:`OneImage`).

- :class:`RandomSubset`: ``data.augment``, the lecture's operations as a random subset per image (PAPER.md section 7);
- :class:`RandAugmentBatch` and :class:`TrivialAugmentBatch`: RandAugment (Cubuk et al. 2020) and TrivialAugment Wide
  (Muller and Hutter 2021) with torchvision's operation spaces, magnitudes and arithmetic (``v2.RandAugment``,
  ``v2.TrivialAugmentWide``), each operation equal to torchvision's functional one given the same parameters.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["OneImage", "RandAugmentBatch", "RandomSubset", "TrivialAugmentBatch", "random_subset"]


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float64).uniform_(low, high, generator=generator)


@functools.lru_cache(maxsize=16)
def _pixel_points(h: int, w: int) -> torch.Tensor:
    """(1, H*W, 3) float64 homogeneous (x, y, 1) index coordinates of every pixel (read only)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    return torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, h * w, 3)


def _warp(images: torch.Tensor, inverse: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Float (N, C, H, W) images resampled (``mode``: bilinear or nearest) through (N, 3, 3) homographies that map an
    output pixel's (x, y) index coordinates to the input's; pixels that fall outside are 0."""
    n, _, h, w = images.shape
    mapped = _pixel_points(h, w) @ inverse.transpose(1, 2)  # (N, H*W, 3)
    xy = mapped[..., :2] / mapped[..., 2:]
    grid = (2 * xy + 1) / torch.tensor([w, h], dtype=torch.float64) - 1  # align_corners=False
    grid = grid.reshape(n, h, w, 2).to(device=images.device, dtype=images.dtype)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _about_centre(forward: torch.Tensor, height: int, width: int, centre: Sequence[float] | None = None,
                  translate: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse (output -> input) of (N, 2, 2) linear maps applied about ``centre`` (index coordinates; default
    the image centre) and followed by (N, 2) ``translate``, as (N, 3, 3)."""
    n = forward.shape[0]
    c = torch.tensor(centre if centre is not None else [(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
    shift = c + (translate if translate is not None else torch.zeros(n, 2, dtype=torch.float64))  # (N, 2)
    inverse = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    inverse[:, :2, :2] = torch.linalg.inv(forward)
    inverse[:, :2, 2] = c - (inverse[:, :2, :2] @ shift.unsqueeze(-1)).squeeze(-1)
    return inverse


def _linear(a, b, c, d, n: int | None = None) -> torch.Tensor:
    """(N, 2, 2) matrices [[a, b], [c, d]] from (N,) tensors or numbers (``n`` when all are numbers)."""
    n = n or max(len(v) for v in (a, b, c, d) if isinstance(v, torch.Tensor))
    rows = [v if isinstance(v, torch.Tensor) else torch.full((n,), float(v), dtype=torch.float64) for v in (a, b, c, d)]
    return torch.stack(rows, 1).reshape(n, 2, 2)


def _rotation(degrees: torch.Tensor) -> torch.Tensor:
    """Counter-clockwise on screen for positive angles (y points down: clockwise in (x, y)), as torchvision."""
    a = torch.deg2rad(degrees)
    return _linear(torch.cos(a), torch.sin(a), -torch.sin(a), torch.cos(a))


class _Shear:
    """Shear along x then along y by angles drawn from [-s, s] degrees (torchvision's ``affine`` shear)."""

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, n, shape, generator):
        return {"shear": torch.stack([_uniform(n, -self.strength, self.strength, generator) for _ in range(2)], 1)}

    @staticmethod
    def apply(images, params):
        tx, ty = torch.tan(torch.deg2rad(params["shear"])).unbind(1)
        return _warp(images, _about_centre(_linear(1, 0, -ty, 1) @ _linear(1, -tx, 0, 1), *images.shape[-2:]))


class _Rotate:
    """Rotation by an angle drawn from [-s, s] degrees about the centre (counter-clockwise when positive, as
    torchvision's ``rotate``)."""

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, n, shape, generator):
        return {"angle": _uniform(n, -self.strength, self.strength, generator)}

    @staticmethod
    def apply(images, params):
        return _warp(images, _about_centre(_rotation(params["angle"]), *images.shape[-2:]))


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


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) float luma of RGB images (ITU-R 601 as torchvision's ``rgb_to_grayscale``, rounded down as its
    colour operations round it; the same multiply-adds, so the same float32 rounding); grey images as they are."""
    if images.shape[1] != 3:
        return images[:, :1].float()
    r, g, b = images.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Float ``images`` x factor + ``other`` x (1 - factor) per image, clamped to [0, 255] (torchvision's blend: its
    ``a.mul(f).add_(b, alpha=1 - f)`` is one multiply-add per element, and ``addcmul`` rounds the same way)."""
    f = factor.to(torch.float32).view(-1, 1, 1, 1).to(images.device)
    g = (1.0 - factor).to(torch.float32).view(-1, 1, 1, 1).to(images.device)
    return torch.addcmul(images.float() * f, other, g).clamp_(0, 255)


def _adjust(images: torch.Tensor, factor: torch.Tensor, kind: str) -> torch.Tensor:
    """Brightness, contrast or saturation (``kind``) by a factor per image, as torchvision's ``adjust_*``; float out.
    Saturation leaves grey images alone."""
    if kind == "brightness":
        return _blend(images, torch.zeros((), device=images.device), factor)
    if kind == "contrast":
        return _blend(images, _luma(images).mean((1, 2, 3), keepdim=True), factor)
    return _blend(images, _luma(images), factor) if images.shape[1] == 3 else images.float()


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
        return _adjust(images, params["brightness"], "brightness")


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
        for kind in ("brightness", "contrast", "saturation"):
            images = _adjust(images, params[kind], kind)
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


def random_subset(cfg) -> RandomSubset | None:
    """``data.augment``'s batched policy (:class:`RandomSubset`), or None when the list is empty."""
    from ..config import augment_ops

    return RandomSubset(augment_ops(cfg.augment), cfg.augment_p) if cfg.augment else None


# ---------------------------------------------------------------------------------------------------------------
# RandAugment and TrivialAugment Wide, batched. Each operation takes a uint8 batch and per-image magnitudes and
# returns uint8, with torchvision's arithmetic (nearest-neighbour resampling, zero fill; colour blends truncated to
# uint8 after each operation), so a chain of operations rounds where torchvision's does.


def _geometric(images: torch.Tensor, forward: torch.Tensor, centre=None, translate=None) -> torch.Tensor:
    inverse = _about_centre(forward, *images.shape[-2:], centre=centre, translate=translate)
    return _warp(images.float(), inverse, mode="nearest").round_().to(torch.uint8)


def _shear_x(images, m):
    return _geometric(images, _linear(1, -m, 0, 1), centre=(-0.5, -0.5))  # about the top-left corner


def _shear_y(images, m):
    return _geometric(images, _linear(1, 0, -m, 1), centre=(-0.5, -0.5))


def _translate(images, m, axis: int):
    shift = torch.zeros(len(m), 2, dtype=torch.float64)
    shift[:, axis] = torch.trunc(m)  # whole pixels, as torchvision's int(magnitude)
    return _geometric(images, _linear(1, 0, 0, 1, n=len(m)), translate=shift)


def _sharpness(images, factor):
    """Blend with a 3x3 smoothing of the interior (torchvision's ``adjust_sharpness``); the border row and column
    stay."""
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    c = images.shape[1]
    kernel = torch.full((3, 3), 1.0 / 13.0, device=images.device)
    kernel[1, 1] = 5.0 / 13.0
    x = images.float()
    blurred = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c).round_()
    inner = x[..., 1:-1, 1:-1]
    g = (1.0 - factor).to(torch.float32).view(-1, 1, 1, 1).to(images.device)
    x[..., 1:-1, 1:-1] = inner + g * (blurred - inner)
    return x.clamp_(0, 255).to(torch.uint8)


def _posterize(images, bits):
    keep = (255 << (8 - bits.long())) & 255  # the top `bits` bits
    return images & keep.to(torch.uint8).view(-1, 1, 1, 1).to(images.device)


def _solarize(images, fraction):
    threshold = (255.0 * fraction).to(torch.float32).view(-1, 1, 1, 1).to(images.device)
    return torch.where(images.float() >= threshold, 255 - images, images)


def _autocontrast(images, _):
    """Each image's channels stretched to the full range (torchvision's ``autocontrast`` arithmetic, without its
    boolean-mask assignment: no device synchronisation)."""
    x = images.float()
    low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, torch.ones_like(low), (high - low).mul_(1.0 / 255))
    return (x - torch.where(flat, torch.zeros_like(low), low)).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def _equalize(images, _):
    from torchvision.transforms.v2 import functional as TF

    return TF.equalize(images)  # batched: each image and channel's histogram


# name: (operation(images, magnitudes), largest magnitude for RandAugment, for TrivialAugment Wide, signed). The
# magnitude of bin b of 31 is largest x b / 30 (Posterize: bits, Solarize: the threshold's fraction of 255, both
# counting down from the first bin); a signed magnitude is negated for half the images. torchvision's spaces.
def _identity(images, _):
    return images


def _translate_x(images, m):
    return _translate(images, m, 0)


def _translate_y(images, m):
    return _translate(images, m, 1)


def _rotate(images, degrees):
    return _geometric(images, _rotation(degrees))


def _brightness(images, m):
    return _adjust(images, 1 + m, "brightness").to(torch.uint8)  # truncated, as torchvision's


def _saturation(images, m):
    return _adjust(images, 1 + m, "saturation").to(torch.uint8)  # truncated, as torchvision's


def _contrast(images, m):
    return _adjust(images, 1 + m, "contrast").to(torch.uint8)  # truncated, as torchvision's


def _sharpen(images, m):
    return _sharpness(images, 1 + m)


# Module-level functions throughout, so a policy pickles into spawned worker processes.
AUTO_AUGMENT_OPS = {
    "Identity": (_identity, None, None, False),
    "ShearX": (_shear_x, 0.3, 0.99, True),
    "ShearY": (_shear_y, 0.3, 0.99, True),
    "TranslateX": (_translate_x, "150/331 width", 32.0, True),
    "TranslateY": (_translate_y, "150/331 height", 32.0, True),
    "Rotate": (_rotate, 30.0, 135.0, True),
    "Brightness": (_brightness, 0.9, 0.99, True),
    "Color": (_saturation, 0.9, 0.99, True),
    "Contrast": (_contrast, 0.9, 0.99, True),
    "Sharpness": (_sharpen, 0.9, 0.99, True),
    "Posterize": (_posterize, "bits 8 to 4", "bits 8 to 2", False),
    "Solarize": (_solarize, "1 to 0", "1 to 0", False),
    "AutoContrast": (_autocontrast, None, None, False),
    "Equalize": (_equalize, None, None, False),
}
_BINS = 31


@functools.lru_cache(maxsize=16)
def _magnitude_table(wide: bool, height: int, width: int) -> torch.Tensor:
    """(14, 31) float64: each operation's magnitude per bin (0 for those without one), as torchvision's spaces (read
    only: built once per image size, not per batch)."""
    rows = []
    for name, (_, rand_top, wide_top, _) in AUTO_AUGMENT_OPS.items():
        top = wide_top if wide else rand_top
        if name == "Posterize":
            rows.append((8 - (torch.arange(_BINS) / ((_BINS - 1) / (6 if wide else 4)))).round())
        elif name == "Solarize":
            rows.append(torch.linspace(1.0, 0.0, _BINS))
        elif top is None:
            rows.append(torch.zeros(_BINS))
        else:
            if isinstance(top, str):  # RandAugment's translations: a fraction of the side
                top = 150.0 / 331.0 * (width if name == "TranslateX" else height)
            rows.append(torch.linspace(0.0, top, _BINS))
    return torch.stack(rows).to(torch.float64)


class _AutoAugmentBatch:
    """``layers`` operations per image, each drawn uniformly from the 14 of :data:`AUTO_AUGMENT_OPS`, at magnitude bin
    ``magnitude`` (None: a uniform bin per draw), negated for half the draws of a signed operation."""

    wide = False

    def __init__(self, layers: int, magnitude: int | None):
        self.layers, self.magnitude = layers, magnitude
        self.names = list(AUTO_AUGMENT_OPS)
        self.ops = [op for op, *_ in AUTO_AUGMENT_OPS.values()]
        self.signed = torch.tensor([signed for *_, signed in AUTO_AUGMENT_OPS.values()])

    def draw(self, n: int, shape: Sequence[int], generator: torch.Generator) -> list[dict]:
        table = _magnitude_table(self.wide, shape[-2], shape[-1])
        draws = []
        for _ in range(self.layers):
            op = torch.randint(len(self.ops), (n,), generator=generator)
            bins = (torch.full((n,), self.magnitude, dtype=torch.long) if self.magnitude is not None
                    else torch.randint(_BINS, (n,), generator=generator))
            negate = (torch.rand(n, generator=generator) <= 0.5) & self.signed[op]
            draws.append({"op": op, "magnitude": table[op, bins] * torch.where(negate, -1.0, 1.0).double()})
        return draws

    def apply(self, images: torch.Tensor, draws: list[dict]) -> torch.Tensor:
        out = images.clone()
        for layer in draws:
            for index in layer["op"].unique().tolist():
                if self.names[index] == "Identity":
                    continue
                rows = (layer["op"] == index).nonzero().flatten()
                on_device = rows.to(out.device)
                out[on_device] = self.ops[index](out[on_device], layer["magnitude"][rows])
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(images.shape[0], images.shape[1:], generator))

    def one_image(self) -> OneImage:
        return OneImage(self)


class RandAugmentBatch(_AutoAugmentBatch):
    """RandAugment(N, M) (Cubuk et al. 2020) on a uint8 batch: N operations per image at magnitude bin M of 31, as
    torchvision's ``v2.RandAugment(num_ops=N, magnitude=M)``."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9):
        if num_ops < 0 or not 0 <= magnitude < _BINS:
            raise ValueError(f"RandAugment needs num_ops >= 0 and 0 <= magnitude <= 30; got N={num_ops}, M={magnitude}")
        super().__init__(num_ops, magnitude)
        self.num_ops = num_ops

    def __repr__(self) -> str:
        return f"RandAugmentBatch(N={self.num_ops}, M={self.magnitude})"


class TrivialAugmentBatch(_AutoAugmentBatch):
    """TrivialAugment Wide (Muller and Hutter 2021) on a uint8 batch: one operation per image at a uniform magnitude
    bin of its wide range, as torchvision's ``v2.TrivialAugmentWide()``."""

    wide = True

    def __init__(self):
        super().__init__(1, None)

    def __repr__(self) -> str:
        return "TrivialAugmentBatch()"
