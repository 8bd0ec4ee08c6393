"""From a DataConfig to loaders: the one place that chooses source, preset and loader."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .datasets import Dataset
from .loaders import DeviceLoader, EvalLoader, Normalizer, random_crop_flip
from .sources import load_dataset

__all__ = ["DataBundle", "build_data", "train_augmentation"]


@dataclass
class DataBundle:
    dataset: Dataset
    normalizer: Normalizer
    train: DeviceLoader
    val: EvalLoader | None
    test: EvalLoader


def train_augmentation(cfg):
    """The batched, on-device augmentation of a preset (PAPER.md section 5)."""
    if cfg.preset == "paper_cifar":
        return random_crop_flip
    if cfg.preset == "none":
        return None
    raise ValueError(f"data.preset={cfg.preset!r} has no device-resident implementation; use data.loader=workers")


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
    dataset = dataset if dataset is not None else load_dataset(cfg)
    normalizer = Normalizer.fit(dataset.train.images, cfg.normalize)
    common = dict(normalizer=normalizer, device=device, rank=rank, world_size=world_size)
    train = DeviceLoader(dataset.train, batch_size, seed=seed, augment=train_augmentation(cfg), **common)
    val = EvalLoader(dataset.val, eval_batch_size, **common) if dataset.val is not None else None
    test = EvalLoader(dataset.test, eval_batch_size, **common)
    return DataBundle(dataset, normalizer, train, val, test)
