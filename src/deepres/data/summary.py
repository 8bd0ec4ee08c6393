"""What ``deepres data info`` reports: images per split and per class of a data source. Image folders are counted
from their files, without decoding."""

from __future__ import annotations

__all__ = ["SOURCE_NAMES", "dataset_summary"]

SOURCE_NAMES = ("cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder")


def _config(source: str, data_dir: str | None, val_size: int, cache_dir: str | None = None):
    from ..config import DataConfig

    return DataConfig(source=source, data_dir=data_dir, val_size=val_size, cache_dir=cache_dir)


def dataset_summary(source: str, data_dir: str | None = None, val_size: float = 0, cache_dir: str | None = None,
                    on_bad_image: str = "error") -> dict:
    """Per-split and per-class image counts of a source (what ``deepres data info`` prints). An image folder's
    files that are not images are an error naming the first, or with ``on_bad_image="skip"`` listed in
    ``skipped`` (files are not decoded here: a corrupt image with an image's extension is counted)."""
    from .datasets import resolve_size, validation_indices

    cfg = _config(source, data_dir, val_size, cache_dir)
    if source == "imagefolder":
        from .folders import _require_data_dir, is_prepared_file, resolve_image_source, scan_image_folder

        path = _require_data_dir(cfg)
        if not is_prepared_file(path):
            index = scan_image_folder(resolve_image_source(path, cache_dir), on_bad_image, quiet=True)
            labels = {"train": index.splits["train"].labels, "test": index.splits["test"].labels}
            train_idx, val_idx = validation_indices(len(labels["train"]), resolve_size(val_size, len(labels["train"])))
            if len(val_idx):
                labels["val"] = labels["train"][val_idx]
                labels["train"] = labels["train"][train_idx]
            return {**_summary(source, str(index.root), index.classes, labels, image_size=None),
                    "skipped": list(index.skipped)}
    from .sources import load_dataset

    dataset = load_dataset(cfg)
    labels = {name: split.labels for name, split in dataset.splits().items()}
    shape = tuple(dataset.train.images.shape[1:])
    return _summary(source, dataset.origin, dataset.classes, labels, image_size=list(shape))


def _summary(source, origin, classes, labels, image_size) -> dict:
    import torch

    order = [n for n in ("train", "val", "test") if n in labels]
    per_class = {n: torch.bincount(labels[n], minlength=len(classes)).tolist() for n in order}
    return {
        "source": source,
        "origin": origin,
        "num_classes": len(classes),
        "image_shape": image_size,
        "splits": {n: int(len(labels[n])) for n in order},
        "classes": [{"name": c, **{n: per_class[n][i] for n in order}} for i, c in enumerate(classes)],
    }
