"""Data sources: each reads a dataset in its official format into a :class:`~deepres.data.datasets.Dataset`."""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .datasets import Dataset, Split, carve_validation, data_root

__all__ = ["SOURCES", "load_dataset", "register_source"]

SOURCES: dict[str, Callable[..., Dataset]] = {}


def register_source(name: str):
    def wrap(fn):
        if name in SOURCES:
            raise ValueError(f"data source '{name}' is already registered")
        SOURCES[name] = fn
        return fn

    return wrap


def load_dataset(cfg) -> Dataset:
    """Read the source named by ``cfg.source`` (a DataConfig), carve the validation split and apply subsets."""
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data source '{cfg.source}'; known: {', '.join(sorted(SOURCES))}")
    dataset = SOURCES[cfg.source](cfg)
    train, val = carve_validation(dataset.train, cfg.val_size)
    dataset.train, dataset.val = train.subset(cfg.train_subset), val
    dataset.test = dataset.test.subset(cfg.test_subset)
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: the official IDX files

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_SETS = {
    "fashion_mnist": {
        "folders": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        "system": "/usr/share/datasets/fashion-mnist",
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "classes": [
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ],
    },
    "mnist": {
        "folders": ("mnist", "MNIST/raw"),
        "system": "/usr/share/datasets/mnist",
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "classes": [str(i) for i in range(10)],
    },
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into an array; a malformed file is an error naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _idx_candidates(name: str, data_dir: str | None) -> list[Path]:
    spec = _IDX_SETS[name]
    roots = []
    if data_dir:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("DEEPRES_DATA"):
        roots.append(Path(os.environ["DEEPRES_DATA"]).expanduser())
    out = []
    for root in roots:
        out.append(root)
        out.extend(root / folder for folder in spec["folders"])
    out.append(Path(spec["system"]))
    return out


def find_idx_folder(name: str, data_dir: str | None) -> Path | None:
    needed = [f for pair in _IDX_FILES.values() for f in pair]
    for folder in _idx_candidates(name, data_dir):
        if all((folder / f).is_file() for f in needed):
            return folder
    return None


def _download_idx(name: str, data_dir: str | None) -> Path:
    spec = _IDX_SETS[name]
    folder = data_root(data_dir) / spec["folders"][0]
    folder.mkdir(parents=True, exist_ok=True)
    for pair in _IDX_FILES.values():
        for fname in pair:
            target = folder / fname
            if target.is_file():
                continue
            tmp = target.with_suffix(target.suffix + ".part")
            try:
                urllib.request.urlretrieve(spec["url"] + fname, tmp)
            except OSError as exc:
                tried = ", ".join(str(p) for p in _idx_candidates(name, data_dir))
                raise FileNotFoundError(
                    f"{name}: the IDX files ({', '.join(f for p in _IDX_FILES.values() for f in p)}) were not found "
                    f"in any of: {tried}; downloading {spec['url']}{fname} failed ({exc}). Put the files in one of "
                    f"those folders or set data.data_dir."
                ) from None
            tmp.replace(target)
    return folder


def _load_idx_source(name: str, cfg) -> Dataset:
    folder = find_idx_folder(name, cfg.data_dir) or _download_idx(name, cfg.data_dir)
    splits = {}
    for split, (images_file, labels_file) in _IDX_FILES.items():
        images = read_idx(folder / images_file)
        labels = read_idx(folder / labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: {images_file} and {labels_file} do not match ({images.shape}, {labels.shape})")
        splits[split] = Split(
            torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        )
    return Dataset(name, list(_IDX_SETS[name]["classes"]), splits["train"], splits["test"], origin=str(folder))


@register_source("fashion_mnist")
def fashion_mnist(cfg) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grayscale, 10 classes."""
    return _load_idx_source("fashion_mnist", cfg)


@register_source("mnist")
def mnist(cfg) -> Dataset:
    """MNIST: 60k/10k 28x28 grayscale digits."""
    return _load_idx_source("mnist", cfg)
