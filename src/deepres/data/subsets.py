"""Subsets of a dataset chosen by class: few labels (``data.labeled_per_class``; the rest unlabeled) and balanced
test subsets (``data.test_per_class``).

The labeled/unlabeled division keeps the first N training images of each class (after the validation split), in
their original order; the others form the unlabeled set of pseudo-labeling, distillation and Noisy Student (their
true labels are kept aside, used only to score pseudo-labels).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ConfigError
from .datasets import Split
from .sources import load_dataset

__all__ = ["UNLABELED_SEED", "first_per_class", "load_run_dataset", "split_labeled"]

# The unlabeled sample (data.unlabeled_subset) is a function of the dataset alone, never of the run's seed.
UNLABELED_SEED = 20200101


def first_per_class(split, per_class: int, num_classes: int, key: str):
    """The first ``per_class`` images of each class, in their original order, and the positions of the others."""
    if per_class <= 0:
        raise ConfigError(key, f"must be positive; got {per_class}")
    keep = torch.zeros(len(split), dtype=torch.bool)
    for k in range(num_classes):
        members = (split.labels == k).nonzero().flatten()
        if len(members) < per_class:
            raise ConfigError(key, f"class {k} has only {len(members)} images; asked for {per_class}")
        keep[members[:per_class]] = True
    chosen = keep.nonzero().flatten()
    return Split(split.images[chosen], split.labels[chosen]), (~keep).nonzero().flatten()


def split_labeled(dataset, per_class: int, unlabeled_subset: int | None = None):
    """A copy of ``dataset`` whose train split holds the first ``per_class`` images of each class, in their original
    order; the others go to ``extra["unlabeled"]`` (all, or a fixed sample of ``unlabeled_subset``)."""
    train = dataset.train
    labeled, rest = first_per_class(train, per_class, dataset.num_classes, "data.labeled_per_class")
    if unlabeled_subset is not None:
        if unlabeled_subset < 0:
            raise ConfigError("data.unlabeled_subset", f"must be >= 0; got {unlabeled_subset}")
        order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(UNLABELED_SEED))
        rest = rest[order[:unlabeled_subset].sort().values]
    extra = dict(dataset.extra, unlabeled=Split(train.images[rest], train.labels[rest]))
    return dataclasses.replace(dataset, train=labeled, extra=extra)


def load_run_dataset(cfg):
    """The dataset of a run that divides its images by class (``data.labeled_per_class``, ``data.test_per_class``);
    None otherwise (the loaders read the source themselves)."""
    if cfg.labeled_per_class is None and cfg.unlabeled_subset is not None:
        raise ConfigError("data.unlabeled_subset", "needs data.labeled_per_class (which defines the unlabeled set)")
    if cfg.labeled_per_class is None and cfg.test_per_class is None:
        return None
    dataset = load_dataset(cfg)
    if cfg.labeled_per_class is not None:
        dataset = split_labeled(dataset, cfg.labeled_per_class, cfg.unlabeled_subset)
    if cfg.test_per_class is not None:
        dataset.test = first_per_class(dataset.test, cfg.test_per_class, dataset.num_classes, "data.test_per_class")[0]
    return dataset
