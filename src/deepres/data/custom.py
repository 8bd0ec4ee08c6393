"""Your own dataset in memory: any map-style dataset of (image, label) pairs becomes a :class:`Dataset`.

Images may be PIL images, uint8 tensors (C, H, W), float tensors in [0, 1] (what ``ToTensor`` gives) or uint8 numpy
arrays (H, W, C); every image of a dataset must share its size and channel count (resize them first otherwise).
Labels are class indices. Everything is read once into memory, where the device loader trains from it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .datasets import Dataset, Split

__all__ = ["dataset_from", "split_from"]


def _image(item: Any, where: str) -> torch.Tensor:
    from PIL import Image

    if isinstance(item, Image.Image):
        if item.mode not in ("L", "RGB"):
            item = item.convert("RGB")
        array = np.asarray(item)
        return torch.from_numpy(array.copy()).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(
            array.copy()).permute(2, 0, 1)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise ValueError(f"{where}: a numpy image must be uint8 (H, W) or (H, W, C); got {item.dtype} {item.shape}")
        tensor = torch.from_numpy(item.copy())
        return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    if isinstance(item, torch.Tensor):
        if item.dim() == 2:
            item = item.unsqueeze(0)
        if item.dim() != 3:
            raise ValueError(f"{where}: an image tensor must be (C, H, W); got shape {tuple(item.shape)}")
        if item.dtype == torch.uint8:
            return item
        if item.is_floating_point():
            if item.min() < -1e-3 or item.max() > 1 + 1e-3:
                raise ValueError(f"{where}: a float image must hold values in [0, 1] (ToTensor's range); got "
                                 f"[{item.min():.3g}, {item.max():.3g}] (normalised? the run normalises itself)")
            return (item * 255).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"{where}: an image must be a PIL image, a tensor or a numpy array; got {type(item).__name__}")


def split_from(data: Any, name: str = "train") -> Split:
    """A :class:`Split` from a map-style dataset (``len`` and ``[i] -> (image, label)``)."""
    if isinstance(data, Split):
        return data
    n = len(data)
    if n == 0:
        raise ValueError(f"the {name} dataset is empty")
    images, labels = [], []
    for i in range(n):
        item = data[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise ValueError(f"{name}[{i}]: expected an (image, label) pair; got {type(item).__name__}")
        image = _image(item[0], f"{name}[{i}]")
        if images and image.shape != images[0].shape:
            raise ValueError(f"{name}[{i}] is {tuple(image.shape)} but {name}[0] is {tuple(images[0].shape)} "
                             f"(channels, height, width): every image must share a size; resize them first")
        images.append(image)
        labels.append(int(item[1]))
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def dataset_from(train: Any, test: Any, val: Any = None, classes: Sequence[str] | None = None,
                 name: str = "dataset") -> Dataset:
    """A :class:`Dataset` from map-style train/test (and optionally validation) datasets. ``classes`` default to
    ``train.classes`` when it has them (torchvision's datasets do), else the label numbers."""
    splits = {"train": split_from(train, "train"), "test": split_from(test, "test")}
    if val is not None:
        splits["val"] = split_from(val, "val")
    shapes = {k: tuple(s.images.shape[1:]) for k, s in splits.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the splits' images differ in shape (channels, height, width): {shapes}")
    count = int(max(int(s.labels.max()) for s in splits.values())) + 1
    if any(int(s.labels.min()) < 0 for s in splits.values()):
        raise ValueError("labels must be class indices (0 or more)")
    classes = list(classes if classes is not None else getattr(train, "classes", None) or range(count))
    classes = [str(c) for c in classes]
    if len(classes) < count:
        raise ValueError(f"labels go up to {count - 1} but there are {len(classes)} classes")
    return Dataset(name, classes, splits["train"], splits["test"], splits.get("val"), origin=name)
