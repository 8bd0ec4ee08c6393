"""From a DataConfig to loaders: the one place that chooses source, preset and loader.

``data.loader``:

- ``device``: the whole split on the training device as uint8, batches built with batched tensor ops there
  (:class:`~deepres.data.loaders.DeviceLoader`); presets ``paper_cifar`` and ``none``, plus RandAugment/CutMix/Mixup.
- ``workers``: DataLoader worker processes decode and augment per image
  (:class:`~deepres.data.workers.WorkerLoader`); any preset, required by ``paper_imagenet`` (scale augmentation
  needs the full-resolution images).
- ``auto``: ``workers`` for ``paper_imagenet``; otherwise ``device`` for in-memory sources and prepared files, and
  for image folders whose decoded train+test size is under ``DEVICE_LIMIT_BYTES`` (4 GiB); ``workers`` beyond.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import data_workers
from .datasets import Dataset, resolve_size, validation_indices
from .loaders import DeviceLoader, EvalLoader, Normalizer
from .sources import load_dataset

log = logging.getLogger("deepres.data")

__all__ = ["DEVICE_LIMIT_BYTES", "DataBundle", "build_data", "choose_loader", "device_augmentation", "train_mix",
           "train_loader_over"]

DEVICE_LIMIT_BYTES = 4 * 2**30
# Training images decoded to fit the worker loader's normalisation statistics (evenly spaced, deterministic).
NORMALIZER_SAMPLE = 1000
# The paper's PCA lighting strength (AlexNet; fb.resnet.torch).
LIGHTING_STD = 0.1


@dataclass
class DataBundle:
    """What a run trains and evaluates on. ``dataset`` is a :class:`Dataset` (in memory) or, for the worker loader
    on an image folder, a :class:`~deepres.data.folders.FolderDataset` (file lists, same attributes)."""

    dataset: Dataset
    normalizer: Normalizer
    train: DeviceLoader  # or WorkerLoader: the same protocol
    val: EvalLoader | None  # or WorkerEvalLoader
    test: EvalLoader
    # Which loader family was built: "device" or "workers".
    loader: str = "device"


def device_augmentation(cfg) -> tuple[bool, object]:
    """(paper crop and flip?, per-batch augmentation after it or None) of a preset on the device loader (PAPER.md
    section 5): the crop and flip for ``paper_cifar``, then RandAugment, TrivialAugment or ``data.augment``'s random
    subset when enabled."""
    from .presets import augment_policy

    if cfg.preset not in ("paper_cifar", "none"):
        raise ValueError(f"data.preset={cfg.preset!r} has no device-resident implementation; use data.loader=workers")
    return cfg.preset == "paper_cifar", augment_policy(cfg)


def train_erasing(cfg):
    """The random erasing of ``data.random_erasing`` (after normalisation, before batch mixing), or None."""
    from .presets import RandomErasing

    return RandomErasing(cfg.random_erasing) if cfg.random_erasing > 0 else None


def train_mix(cfg, num_classes: int):
    """The batch mix hook from data.cutmix_alpha / data.mixup_alpha (both > 0: one of them per batch, 50/50)."""
    from .presets import CutMix, MixChoice, Mixup

    if cfg.cutmix_alpha < 0 or cfg.mixup_alpha < 0:
        raise ValueError(
            f"data.cutmix_alpha and data.mixup_alpha must be >= 0; got {cfg.cutmix_alpha}, {cfg.mixup_alpha}")
    mixes = []
    if cfg.cutmix_alpha > 0:
        mixes.append(CutMix(cfg.cutmix_alpha, num_classes))
    if cfg.mixup_alpha > 0:
        mixes.append(Mixup(cfg.mixup_alpha, num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else MixChoice(mixes)


def train_loader_over(split, data: DataBundle, cfg, augment: bool = True) -> DeviceLoader:
    """A device-resident training loader over ``split`` (images a task assembled) with the run's batch, seed,
    normalisation, device, DDP slice and gather mode; with the config's augmentation and batch mixing unless
    ``augment`` is False."""
    old = data.train
    if not isinstance(old, DeviceLoader):
        raise ValueError("data.loader: this task needs the device-resident loader; set data.loader=device")
    crop_flip, extra = device_augmentation(cfg) if augment else (False, None)
    return DeviceLoader(split, old.batch_size, normalizer=data.normalizer, device=old.device, seed=old.seed,
                        crop_flip=crop_flip, augment=extra, mix=train_mix(cfg, data.dataset.num_classes) if augment
                        else None, erase=train_erasing(cfg) if augment else None, rank=old.rank,
                        world_size=old.world_size, gather=old.gather)


def choose_loader(cfg, dataset: Dataset | None = None) -> str:
    """``device`` or ``workers`` for this config (see module doc)."""
    return _choose(cfg, dataset)[0]


def _choose(cfg, dataset):
    if cfg.loader not in ("auto", "device", "workers"):
        raise ValueError(f"data.loader must be auto, device or workers; got {cfg.loader!r}")
    if cfg.loader != "auto":
        return cfg.loader, None
    if cfg.preset == "paper_imagenet":
        return "workers", None
    if dataset is not None or cfg.source != "imagefolder":
        return "device", None
    from .folders import _prepared_cache, _require_data_dir, decoded_bytes_estimate, is_prepared_file, scan_image_folder
    from .folders import resolve_image_source

    path = _require_data_dir(cfg)
    if is_prepared_file(path):
        return "device", None
    cached, root = _prepared_cache(cfg)
    if cached.is_file():
        return "device", None
    # quiet: a folder loaded into memory is scanned again (and its skipped files named) by load_dataset
    index = scan_image_folder(root or resolve_image_source(path, cfg.cache_dir), cfg.on_bad_image, cfg.test_size,
                              quiet=True)
    if decoded_bytes_estimate(cfg, index) <= DEVICE_LIMIT_BYTES:
        return "device", None
    for note in index.skipped:
        log.warning("skipping %s", note)
    return "workers", index


def build_data(
    cfg,
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    dataset: Dataset | None = None,
) -> DataBundle:
    """Read the dataset (unless given), fit normalisation on its training split and build the three loaders."""
    from .images import set_max_image_pixels

    set_max_image_pixels(cfg.max_image_pixels)
    kind, index = _choose(cfg, dataset)
    if kind == "workers":
        return _build_worker_data(cfg, batch_size, eval_batch_size, seed, device, rank, world_size, dataset, index)
    dataset = dataset if dataset is not None else load_dataset(cfg)
    normalizer = Normalizer.fit(dataset.train.images, cfg.normalize)
    common = dict(normalizer=normalizer, device=device, rank=rank, world_size=world_size)
    crop_flip, augment = device_augmentation(cfg)
    train = DeviceLoader(dataset.train, batch_size, seed=seed, crop_flip=crop_flip, augment=augment,
                         mix=train_mix(cfg, dataset.num_classes), erase=train_erasing(cfg), gather=cfg.gather,
                         **common)
    val = EvalLoader(dataset.val, eval_batch_size, **common) if dataset.val is not None else None
    test = EvalLoader(dataset.test, eval_batch_size, **common)
    return DataBundle(dataset, normalizer, train, val, test, loader="device")


# ---------------------------------------------------------------------------------------------------------------
# Worker loaders


def _folder_dataset(cfg, index):
    """The scanned folder with the validation split carved and subsets applied, as the sources do in memory."""
    from .folders import FolderDataset, _require_data_dir, resolve_image_source, scan_image_folder

    if index is None:
        index = scan_image_folder(resolve_image_source(_require_data_dir(cfg), cfg.cache_dir), cfg.on_bad_image,
                                  cfg.test_size)
    full_train = index.splits["train"]
    val_size = resolve_size(cfg.val_size, len(full_train))
    train_idx, val_idx = validation_indices(len(full_train), val_size)
    val = full_train.select(val_idx) if val_size > 0 else None
    return FolderDataset(
        "imagefolder",
        list(index.classes),
        full_train.select(train_idx).subset(cfg.train_subset),
        index.splits["test"].subset(cfg.test_subset),
        val,
        channels=cfg.channels or 3,
        image_size=(cfg.image_size, cfg.image_size) if cfg.image_size else (0, 0),
        origin=str(index.root),
        extra={"skipped": list(index.skipped), **({"carved": index.carved} if index.carved else {})},
    )


def _worker_transforms(cfg, first_image: torch.Tensor):
    """(per-image train transform, eval transform, lighting std or None, output size) of the preset."""
    from torchvision.transforms import v2

    from .presets import augment_policy, paper_imagenet_eval, paper_imagenet_train
    from .workers import ResizeSquare

    policy = augment_policy(cfg, batched=False)
    if cfg.preset == "paper_imagenet":
        crop = cfg.image_size or 224
        lighting = LIGHTING_STD if first_image.shape[0] == 3 else None
        return paper_imagenet_train(crop, policy), paper_imagenet_eval(crop), lighting, crop
    size = cfg.image_size
    resize = ResizeSquare(size) if size else None
    ops = [resize] if resize else []
    if cfg.preset == "paper_cifar":
        # The paper's CIFAR augmentation per image: zero-pad 4, random crop back to the size, flip.
        side = size or tuple(first_image.shape[-2:])
        ops += [v2.RandomCrop(side, padding=4), v2.RandomHorizontalFlip()]
    elif cfg.preset != "none":
        raise ValueError(f"unknown data.preset {cfg.preset!r}")
    if policy is not None:  # after the crop, as on the device loader
        ops.append(policy)
    train = v2.Compose(ops) if ops else None
    return train, resize, None, size


def _build_worker_data(cfg, batch_size, eval_batch_size, seed, device, rank, world_size, dataset, index):
    from .workers import FileSamples, TensorSamples, WorkerEvalLoader, WorkerLoader, _collate, _TransformDataset

    in_memory = dataset is not None or cfg.source != "imagefolder"
    if not in_memory:
        from .folders import _require_data_dir, is_prepared_file

        in_memory = is_prepared_file(_require_data_dir(cfg))
    if in_memory:
        dataset = dataset if dataset is not None else load_dataset(cfg)
    else:
        dataset = _folder_dataset(cfg, index)
    samples = {
        name: TensorSamples(split) if in_memory else FileSamples(split, dataset.channels)
        for name, split in dataset.splits().items()
    }
    first = samples["train"].load(0)
    train_tf, eval_tf, lighting, size = _worker_transforms(cfg, first)
    if not in_memory:  # the size the model sees
        dataset.image_size = (size, size) if size else tuple(first.shape[-2:])
    if not in_memory and eval_tf is None:  # images tested as stored: one of another size ends the run's last test
        _check_eval_sizes(samples, tuple(first.shape[-2:]))
    if cfg.normalize == "imagenet":  # constants: the first image tells the channel count, nothing else is read
        normalizer = Normalizer.imagenet(first.shape[0])
    elif in_memory and eval_tf is None:
        normalizer = Normalizer.fit(dataset.train.images, cfg.normalize)
    else:
        normalizer = _fit_sampled(samples["train"], eval_tf, cfg, _TransformDataset, _collate)
    workers = max(0, data_workers(cfg))
    common = dict(normalizer=normalizer, device=device, rank=rank, world_size=world_size, num_workers=workers)
    train = WorkerLoader(
        samples["train"],
        batch_size,
        transform=train_tf,
        seed=seed,
        lighting=lighting,
        mix=train_mix(cfg, dataset.num_classes),
        erase=train_erasing(cfg),
        on_bad_image=cfg.on_bad_image,
        **common,
    )
    evals = {
        name: WorkerEvalLoader(samples[name], eval_batch_size, transform=eval_tf, on_bad_image=cfg.on_bad_image,
                               **common)
        for name in ("val", "test")
        if name in samples
    }
    return DataBundle(dataset, normalizer, train, evals.get("val"), evals["test"], loader="workers")


def _check_eval_sizes(samples: dict, size: tuple[int, int]) -> None:
    """An error naming the first validation or test file whose header gives another size than the training images'
    (``size``, height and width), read before training: tested as stored, such a file would stop the run at its
    first evaluation, the test at the end of training (the header only; unreadable files are left to the loader)."""
    from .images import file_image_size

    for name in ("val", "test"):
        for path in samples[name].paths if name in samples else ():
            found = file_image_size(path)  # None: a bad file, the loader's to name (or skip)
            if found is not None and found != size:
                raise ValueError(f"{path} is {found[0]}x{found[1]} but the training images are {size[0]}x{size[1]}: "
                                 f"every image must share a size; set data.image_size to resize them")


def _fit_sampled(samples, transform, cfg, dataset_cls, collate) -> Normalizer:
    """Normalisation statistics from up to NORMALIZER_SAMPLE evenly spaced training images (eval geometry)."""
    from torch.utils.data import DataLoader

    from .workers import _raise_errors, _worker_batches

    n = len(samples)
    count = min(n, NORMALIZER_SAMPLE)
    picks = torch.linspace(0, n - 1, count).round().long().unique().tolist()
    keys = [[(i, None) for i in picks[j : j + 64]] for j in range(0, len(picks), 64)]
    data = dataset_cls(samples, transform, cfg.on_bad_image)
    workers = min(max(0, data_workers(cfg)), len(keys)) if len(picks) > 64 else 0
    loader = _worker_batches(DataLoader(data, batch_sampler=keys, num_workers=workers, collate_fn=collate))

    def images():
        for batch, _, notes in loader:
            _raise_errors(notes)
            if batch is not None:
                yield batch

    return Normalizer.fit_batches(images(), cfg.normalize)
