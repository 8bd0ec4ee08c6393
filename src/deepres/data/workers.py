"""Worker loaders: for image folders too large to hold decoded (ImageNet), PyTorch DataLoader worker processes decode
and augment each image; the main process moves the uint8 batch (pinned on CUDA) to the device and finishes it there
(PCA lighting, normalisation, CutMix/Mixup).

Same protocol and the same guarantees as :class:`~deepres.data.loaders.DeviceLoader`: epoch e is the permutation
drawn from (seed, e), step s is the s-th global batch of its epoch, each rank loads its contiguous slice of it
(disjoint, together complete: a DistributedSampler whose order is a function of (seed, epoch)); every image's
augmentation is seeded from (seed, step, position in the global batch), so ``iterate(k)`` resumes exactly at step k
whatever the number of workers or ranks. Batch mixing happens within each rank's slice.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from .folders import FileSplit
from .images import BadImageError, read_image, resize_square, to_channels
from .datasets import Split
from .loaders import Normalizer, step_generator

__all__ = ["FileSamples", "ResizeSquare", "TensorSamples", "WorkerEvalLoader", "WorkerLoader", "sample_seed"]

log = logging.getLogger("deepres.data")
_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, step: int, position: int) -> int:
    """A 63-bit seed for one image of one step (splitmix64 over the three numbers)."""
    x = 0
    for v in (seed, step, position):
        x = (x + (int(v) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


class FileSamples:
    """Images read from files on demand, converted to ``channels``."""

    def __init__(self, split: FileSplit, channels: int = 3):
        self.paths, self.labels, self.channels = split.paths, split.labels, channels

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> torch.Tensor:
        return to_channels(read_image(self.paths[i]), self.channels)

    def name(self, i: int) -> str:
        return self.paths[i]


class TensorSamples:
    """Images from an in-memory split (an in-memory source used with data.loader=workers)."""

    def __init__(self, split: Split):
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> torch.Tensor:
        return self.images[i]

    def name(self, i: int) -> str:
        return f"image {i}"


class _TransformDataset(torch.utils.data.Dataset):
    """Keys are (index, per-image seed or None); items are (uint8 image or None, label, note, name), the note None, a
    skipped file's "path: reason", or the :class:`BadImageError` to raise; the name the file's (or image's). A bad
    file's error travels back as a value, so the main process raises it as it is (an exception raised in a worker
    comes back as a traceback in a message)."""

    def __init__(self, samples, transform: Callable | None, on_bad_image: str):
        self.samples, self.transform, self.on_bad_image = samples, transform, on_bad_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key
        label = int(self.samples.labels[index])
        try:
            image = self.samples.load(index)
        except BadImageError as exc:
            return None, label, exc if self.on_bad_image != "skip" else f"{exc.path}: {exc.reason}", exc.path
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeds
                    image = self.transform(image)
        return image, label, None, self.samples.name(index)


def _collate(items):
    """(uint8 images or None, labels, notes): the notes name skipped files, or are errors for the main process to
    raise (:func:`_raise_errors`)."""
    kept = [(img, label, name) for img, label, _, name in items if img is not None]
    skipped = [note for _, _, note, _ in items if note is not None]
    if not kept or any(isinstance(note, Exception) for note in skipped):
        return None, torch.zeros(0, dtype=torch.int64), skipped
    shapes = Counter(tuple(img.shape) for img, _, _ in kept)
    if len(shapes) > 1:  # named as the in-memory decoder names it: an odd image against the batch's usual size
        usual = shapes.most_common(1)[0][0]
        odd, odd_name = next((img, name) for img, _, name in kept if tuple(img.shape) != usual)
        other = next(name for img, _, name in kept if tuple(img.shape) == usual)
        error = ValueError(f"{odd_name} is {odd.shape[-2]}x{odd.shape[-1]} but {other} is {usual[-2]}x{usual[-1]}: "
                           f"every image must share a size; set data.image_size to resize them")
        return None, torch.zeros(0, dtype=torch.int64), [error]
    images = torch.stack([img for img, _, _ in kept])
    labels = torch.tensor([label for _, label, _ in kept], dtype=torch.int64)
    return images, labels, skipped


def _raise_errors(notes: list) -> None:
    """Raise the first error a batch's notes carry (see :func:`_collate`)."""
    for note in notes:
        if isinstance(note, Exception):
            raise note


def _worker_batches(loader: DataLoader):
    """A DataLoader's batches; an exception a worker raised (its traceback folded into the message) is raised again
    as one line naming the worker's error."""
    try:
        yield from loader
    except Exception as exc:
        text = str(exc)
        if "in DataLoader worker process" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise RuntimeError(f"a data loading worker failed: {last}") from None


def _worker_init(_):
    torch.set_num_threads(1)


class ResizeSquare:
    """Per-image transform: shorter side to ``size``, centre square (picklable, for spawned workers)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return resize_square(image, self.size)

    def __repr__(self) -> str:
        return f"ResizeSquare({self.size})"


class WorkerLoader:
    """Training batches decoded and augmented by DataLoader workers (see module doc for the guarantees).

    ``transform`` is the per-image uint8 pipeline (e.g. :func:`~deepres.data.presets.paper_imagenet_train`);
    ``lighting`` the PCA alpha std applied batched after transfer (None: off); ``erase`` a
    :class:`~deepres.data.presets.RandomErasing` applied after normalising; ``mix`` a CutMix/Mixup hook.
    """

    def __init__(
        self,
        samples,
        batch_size: int,
        *,
        normalizer: Normalizer,
        transform: Callable | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        lighting: float | None = None,
        mix: Callable | None = None,
        erase=None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
        on_bad_image: str = "error",
        prefetch_factor: int = 2,
    ):
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the {world_size} processes")
        if batch_size > len(samples):
            raise ValueError(f"train.batch_size={batch_size} is larger than the training split ({len(samples)} images)")
        self.samples = samples
        self.dataset = _TransformDataset(samples, transform, on_bad_image)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.normalizer = normalizer
        self.lighting = lighting
        self.mix = mix
        self.erase = erase  # RandomErasing: after normalising, before mixing
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.steps_per_epoch = len(samples) // batch_size
        self._epoch, self._order = -1, None
        self._reported: set[str] = set()  # bad files already logged: each is named once, not at every draw

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _keys(self, step: int) -> list[tuple[int, int]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = torch.randperm(len(self.samples), generator=step_generator(self.seed, 0, epoch))
            self._epoch = epoch
        lo = i * self.batch_size + self.rank * self.local_batch
        idx = self._order[lo : lo + self.local_batch].tolist()
        first = self.rank * self.local_batch
        return [(index, sample_seed(self.seed, step, first + p)) for p, index in enumerate(idx)]

    def _finish(self, collated, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, skipped = collated
        _raise_errors(skipped)
        for note in skipped:
            if note not in self._reported:
                self._reported.add(note)
                log.warning("step %d: skipping %s (left out of every batch that draws it; named once)", step, note)
        if images is None:
            raise ValueError(f"step {step}: every image of the batch was bad")
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        labels = labels.to(self.device, non_blocking=True)
        generator = step_generator(self.seed, 2, step)
        if self.lighting:
            # Drawn for the whole global batch, then this rank's slice: the same noise for any world size.
            alpha = torch.randn(self.batch_size, 3, generator=generator) * self.lighting
            lo = self.rank * self.local_batch
            from .presets import pca_lighting

            x = pca_lighting(x, alpha=alpha[lo : lo + x.shape[0]])
        x = self.normalizer.normalize01(x)
        if self.erase is not None:  # drawn for the global batch, as the lighting
            lo = self.rank * self.local_batch
            boxes = self.erase.boxes(self.batch_size, *x.shape[-2:], generator)
            x = self.erase.apply(x, boxes[lo : lo + x.shape[0]])
        if self.mix is not None:
            x, labels = self.mix(x, labels, generator)
        return x, labels

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s batch computed in this process (no workers)."""
        return self._finish(_collate([self.dataset[k] for k in self._keys(step)]), step)

    def _steps(self, start_step: int):
        step = start_step
        while True:
            yield self._keys(step)
            step += 1

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from ``start_step`` on, forever; the same batches ``iterate(0)`` gives from that step."""
        if self.num_workers <= 0:
            step = start_step
            while True:
                yield self.batch(step)
                step += 1
        loader = DataLoader(
            self.dataset,
            batch_sampler=self._steps(start_step),
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init,
            prefetch_factor=self.prefetch_factor,
        )
        for step, collated in enumerate(_worker_batches(loader), start=start_step):
            yield self._finish(collated, step)


class WorkerEvalLoader:
    """A split in order through DataLoader workers with the eval transform; under DDP each rank takes a contiguous,
    disjoint shard (together the whole split, no padding duplicates), like :class:`~deepres.data.loaders.EvalLoader`."""

    def __init__(
        self,
        samples,
        batch_size: int,
        *,
        normalizer: Normalizer,
        transform: Callable | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
        on_bad_image: str = "error",
    ):
        n = len(samples)
        per_rank = math.ceil(n / world_size)
        self.lo, self.hi = min(n, rank * per_rank), min(n, (rank + 1) * per_rank)
        self.dataset = _TransformDataset(samples, transform, on_bad_image)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.normalizer = normalizer
        self.num_workers = num_workers
        self.total = n
        self.labels = samples.labels[self.lo : self.hi]

    def __len__(self) -> int:
        return math.ceil((self.hi - self.lo) / self.batch_size)

    def _batches(self):
        for lo in range(self.lo, self.hi, self.batch_size):
            yield [(i, None) for i in range(lo, min(lo + self.batch_size, self.hi))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_workers <= 0:
            batches = (_collate([self.dataset[k] for k in keys]) for keys in self._batches())
        else:
            batches = _worker_batches(DataLoader(
                self.dataset,
                batch_sampler=list(self._batches()),
                num_workers=min(self.num_workers, max(1, len(self))),
                collate_fn=_collate,
                pin_memory=self.device.type == "cuda",
                worker_init_fn=_worker_init,
            ))
        for images, labels, skipped in batches:
            _raise_errors(skipped)
            for note in skipped:
                log.warning("skipping %s", note)
            if images is None:
                continue
            yield self.normalizer(images.to(self.device, non_blocking=True)), labels.to(self.device)
