"""In-memory datasets: uint8 images, int64 labels and class names, split into train / val / test.

Every source returns a :class:`Dataset`. The validation split is carved deterministically from train
(``val_size`` images; 5000 gives the paper's 45k/5k CIFAR-10 split) and does not depend on the training seed, so
every run of a recipe validates on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Dataset", "Split", "carve_validation", "data_root", "subset_indices", "validation_indices"]

# The validation split is a function of the dataset alone, never of the run's seed.
VALIDATION_SEED = 20151210
SUBSET_SEED = 20160627


def subset_indices(n: int, count: int) -> torch.Tensor:
    """Sorted indices of ``count`` of ``n`` items under a fixed permutation: a subset that is a function of the split
    alone and spans its classes (image folders and most releases store images grouped by class, so the first
    ``count`` would be one or two classes)."""
    if count <= 0:
        raise ValueError(f"a subset needs at least one image; got {count}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))
    return order[:count].sort().values


@dataclass
class Split:
    """One split held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 (N,); got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, count: int | None) -> Split:
        """``count`` images drawn by :func:`subset_indices` (all when None), in their original order."""
        if count is None or count >= len(self):
            return self
        index = subset_indices(len(self), count)
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split
    val: Split | None = None
    # Where it was read from, for logs and reports.
    origin: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])

    def splits(self) -> dict[str, Split]:
        out = {"train": self.train, "test": self.test}
        if self.val is not None:
            out["val"] = self.val
        return out

    def counts(self) -> dict[str, list[int]]:
        """Images per class in every split."""
        return {
            name: torch.bincount(split.labels, minlength=self.num_classes).tolist()
            for name, split in self.splits().items()
        }


def resolve_size(size: float, n: int) -> int:
    """A split size given as a count (1 or more) or a fraction of ``n`` (below 1) -> a count."""
    return int(round(size * n)) if 0 < size < 1 else int(size)


def validation_indices(n: int, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of a training split of ``n`` items, each sorted; a fixed permutation.

    Shared by the in-memory split (:func:`carve_validation`) and file lists (the worker loader), so both hold out
    the same images.
    """
    if val_size >= n:
        raise ValueError(f"data.val_size={val_size} leaves no training images (train has {n})")
    if val_size <= 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return order[val_size:].sort().values, order[:val_size].sort().values


def carve_validation(train: Split, val_size: float) -> tuple[Split, Split | None]:
    """Split ``val_size`` images (a count, or below 1 a fraction) off ``train`` with a fixed permutation; returns
    (train, val)."""
    val_size = resolve_size(val_size, len(train))
    if val_size <= 0:
        return train, None
    train_idx, val_idx = validation_indices(len(train), val_size)
    return Split(train.images[train_idx], train.labels[train_idx]), Split(train.images[val_idx], train.labels[val_idx])


def data_root(data_dir: str | Path | None) -> Path:
    """The data directory: the config's, else $DEEPRES_DATA, else ./data."""
    import os

    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("DEEPRES_DATA")
    return Path(env).expanduser() if env else Path("data")
