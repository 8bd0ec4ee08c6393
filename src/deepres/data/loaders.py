"""Loaders. The device-resident loader keeps a whole split on the training device as uint8 and builds every batch
with batched tensor ops there; its batches are a pure function of (seed, step), so a checkpoint's step is its position.

Protocol shared by every training loader: ``iterate(start_step)`` yields (images, targets) forever from that step;
``steps_per_epoch``; images are float, normalised, on the device; targets are int64 labels (N,) or, when batches are
mixed (CutMix / Mixup), float class weights (N, num_classes).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .datasets import Split

__all__ = ["DeviceLoader", "EvalLoader", "Normalizer", "random_crop_flip", "single_thread_on_cpu", "step_generator"]


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator determined by (seed, keys): the same numbers on any device and after any resume."""
    value = seed & 0xFFFFFFFF
    for k in keys:
        value = (value * 1_000_003 + int(k) + 0x9E3779B9) & 0xFFFFFFFFFFFF
    return torch.Generator().manual_seed(value)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Normalizer:
    """x (uint8) -> (x / 255 - mean) / std. ``mean`` is (C, H, W) for the paper's per-pixel mean, (C, 1, 1) per
    channel."""

    mean: torch.Tensor
    std: torch.Tensor
    # The statistics on each device they were used on: no host-to-device copy per batch.
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def imagenet(cls, channels: int) -> Normalizer:
        """ImageNet's per-channel mean and std (torchvision's weights were trained with them); for grey images their
        averages."""
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        if channels == 1:
            mean, std = mean.mean(dim=0, keepdim=True), std.mean(dim=0, keepdim=True)
        elif channels != 3:
            raise ValueError(f"normalize=imagenet needs 1 or 3 channels; got {channels}")
        return cls(mean.view(-1, 1, 1), std.view(-1, 1, 1))

    @classmethod
    def fit(cls, images: torch.Tensor, mode: str = "pixel_mean") -> Normalizer:
        """Statistics of a uint8 (N, C, H, W) training split. pixel_mean: subtract the mean image (PAPER.md s. 4.2)."""
        if mode == "imagenet":
            return cls.imagenet(images.shape[1])
        x = images.double() / 255.0
        if mode == "pixel_mean":
            mean = x.mean(dim=0)
            std = torch.ones(images.shape[1], 1, 1, dtype=torch.float64)
        elif mode == "channel":
            mean = x.mean(dim=(0, 2, 3)).view(-1, 1, 1)
            std = x.std(dim=(0, 2, 3)).view(-1, 1, 1)
        else:
            raise ValueError(f"normalize must be 'pixel_mean', 'channel' or 'imagenet'; got {mode!r}")
        return cls(mean.float(), std.float())

    @classmethod
    def fit_batches(cls, batches, mode: str = "pixel_mean") -> Normalizer:
        """:meth:`fit` over an iterable of uint8 batches of one size (a split not held in memory, or a sample)."""
        count, total, total_sq = 0, None, None
        for batch in batches:
            if mode == "imagenet":  # constants: one batch tells the channel count
                return cls.imagenet(batch.shape[1])
            x = batch.double() / 255.0
            s, sq = x.sum(dim=0), (x * x).sum(dim=0)
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
            count += batch.shape[0]
        if not count:
            raise ValueError("cannot fit normalisation statistics on no images")
        channels = total.shape[0]
        if mode == "pixel_mean":
            return cls((total / count).float(), torch.ones(channels, 1, 1))
        if mode == "channel":
            n = count * total.shape[1] * total.shape[2]
            mean = total.sum(dim=(1, 2)) / n
            var = (total_sq.sum(dim=(1, 2)) - n * mean * mean) / max(n - 1, 1)  # unbiased, as Tensor.std
            return cls(mean.view(-1, 1, 1).float(), var.clamp_min(0).sqrt().view(-1, 1, 1).float())
        raise ValueError(f"normalize must be 'pixel_mean', 'channel' or 'imagenet'; got {mode!r}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float32."""
        return self.normalize01(images.float().div_(255.0))

    def normalize01(self, x: torch.Tensor) -> torch.Tensor:
        """Float images already in [0, 1] (e.g. after PCA lighting) -> normalised, in place."""
        if x.device not in self._on:
            self._on[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        mean, std = self._on[x.device]
        if mean.shape[-2:] != x.shape[-2:] and mean.shape[-1] != 1:  # a per-pixel mean at another size
            mean = F.interpolate(mean[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
        return x.sub_(mean).div_(std)

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "std": self.std.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict) -> Normalizer:
        return cls(state["mean"].float(), state["std"].float())


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True):
    """The paper's CIFAR augmentation on a uint8 batch: zero-pad ``padding``, random crop back, random h-flip.

    One gather over the flattened padded images (each output pixel's source index; a flip reads the crop's columns
    right to left): 3x faster on the CPU than indexing rows and columns separately, and one kernel on a GPU.
    """
    n, c, h, w = images.shape
    device = images.device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
    do_flip = (torch.rand(n, generator=generator) < 0.5).to(device) if flip else None
    padded = F.pad(images, (padding, padding, padding, padding))
    width = w + 2 * padding
    rows = oy[:, None] + torch.arange(h, device=device)
    cols = ox[:, None] + torch.arange(w, device=device)
    if do_flip is not None:
        cols = torch.where(do_flip[:, None], cols.flip(1), cols)
    source = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, -1).gather(2, source).view(n, c, h, w)


@contextlib.contextmanager
def single_thread_on_cpu(device: torch.device):
    """One intra-op thread while building a batch on the CPU: its ops are small, and a thread pool only adds
    synchronisation (5x slower on 2 busy cores, measured). A no-op on other devices."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Mix = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class DeviceLoader:
    """Training batches from a split held on ``device``.

    Each epoch is a permutation drawn from (seed, epoch); step s takes the s-th global batch of its epoch (a partial
    last batch is dropped). ``crop_flip`` is the paper's CIFAR augmentation (pad 4, random crop, flip; section 4.2);
    ``augment`` (e.g. RandAugment) and ``mix`` (CutMix, Mixup) act per batch after it. ``gather``:

    - ``epoch``: the epoch's order, crops and flips are drawn at its first step (from (seed, epoch)) and the whole
      epoch is gathered at once into a second copy of the split; a step then slices its batch, with no
      host-to-device copy (the fast path of small-image training on a GPU);
    - ``batch``: each batch is gathered and cropped on its own (crops drawn from (seed, step)).

    Either way batches are a pure function of (seed, epoch, step), drawn from CPU generators: the same on every
    device and after any resume. Under DDP every rank holds the split and takes its contiguous slice of the global
    batch, so ranks are disjoint and together complete, and N ranks see exactly what one process with the same
    global batch sees.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        normalizer: Normalizer,
        device: torch.device | str = "cpu",
        seed: int = 0,
        crop_flip: bool = True,
        augment: Augment | None = None,
        mix: Mix | None = None,
        erase=None,
        rank: int = 0,
        world_size: int = 1,
        gather: str = "epoch",
    ):
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the {world_size} processes")
        if batch_size > len(split):
            raise ValueError(f"train.batch_size={batch_size} is larger than the training split ({len(split)} images)")
        if gather not in ("epoch", "batch"):
            raise ValueError(f"data.gather must be epoch or batch; got {gather!r}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.normalizer = normalizer
        self.crop_flip = crop_flip
        self.augment = augment
        self.mix = mix
        self.erase = erase  # RandomErasing: after normalising, before mixing
        self.gather = gather
        self.steps_per_epoch = len(split) // batch_size
        self._epoch, self._order = -1, None
        self._epoch_images = self._epoch_labels = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def augmented(self) -> bool:
        """Whether batches vary with the step beyond their order (augmentation or mixing)."""
        return self.crop_flip or self.augment is not None or self.mix is not None or self.erase is not None

    def _start_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        self._order = torch.randperm(len(self.labels), generator=step_generator(self.seed, 0, epoch))
        self._epoch = epoch
        if self.gather == "epoch":
            used = self._order[: self.steps_per_epoch * self.batch_size].to(self.device)
            self._epoch_images = None  # the previous epoch's copy goes before the next is made
            images = self.images[used]
            if self.crop_flip:
                images = random_crop_flip(images, step_generator(self.seed, 2, epoch))
            self._epoch_images, self._epoch_labels = images, self.labels[used]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of ``step``, this rank's slice: (float images, targets) on the device."""
        epoch, i = divmod(step, self.steps_per_epoch)
        rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
        with single_thread_on_cpu(self.device):
            self._start_epoch(epoch)
            generator = step_generator(self.seed, 1, step)
            if self.gather == "epoch":
                images, labels = self._epoch_images[rows], self._epoch_labels[rows]
            else:
                idx = self._order[rows].to(self.device)
                images, labels = self.images[idx], self.labels[idx]
                if self.crop_flip:
                    images = random_crop_flip(images, generator)
            if self.augment is not None:
                images = self.augment(images, generator)
            local = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
            # Erasing boxes are drawn for the global batch, so any world size erases the same images.
            boxes = self.erase.boxes(len(images), *images.shape[-2:], generator) if self.erase else None
            if self.mix is None:  # only this rank's slice needs normalising
                x = self.normalizer(images[local])
                return (x if boxes is None else self.erase.apply(x, boxes[local])), labels[local]
            x = self.normalizer(images)
            x = x if boxes is None else self.erase.apply(x, boxes)
            x, y = self.mix(x, labels, generator)  # mixing pairs images across the global batch
            return x[local], y[local]

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


class EvalLoader:
    """A split in order, in batches, for evaluation. Under DDP each rank takes a contiguous, disjoint shard; the shards
    together are the whole split, with no padding duplicates, so summed metrics are exact."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        normalizer: Normalizer,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        n = len(split)
        per_rank = math.ceil(n / world_size)
        lo, hi = min(n, rank * per_rank), min(n, (rank + 1) * per_rank)
        self.device = torch.device(device)
        self.images = split.images[lo:hi]
        self.labels = split.labels[lo:hi]
        self.batch_size = batch_size
        self.normalizer = normalizer
        self.total = n

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for lo in range(0, len(self.labels), self.batch_size):
            images = self.images[lo : lo + self.batch_size].to(self.device, non_blocking=True)
            yield self.normalizer(images), self.labels[lo : lo + self.batch_size].to(self.device)
