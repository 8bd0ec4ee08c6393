"""Data sources: each reads a dataset in its official format into a :class:`~deepres.data.datasets.Dataset`.

Search order for the official files: ``data.data_dir``, then ``$DEEPRES_DATA``, then ``./data`` (MNIST-style sets also
look in Debian's ``/usr/share/datasets/<name>``); when absent, the official release is downloaded into the data
directory and its MD5 checked. Offline, the error says which file to put where.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .archives import download, is_archive
from .datasets import Dataset, Split, carve_validation, data_root
from .images import IMAGE_EXTENSIONS

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
        # MD5 of the official .gz files (as published with torchvision's FashionMNIST).
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "classes": [
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ],
    },
    "mnist": {
        "folders": ("mnist", "MNIST/raw"),
        "system": "/usr/share/datasets/mnist",
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
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
    """Folders searched, in order: data_dir, $DEEPRES_DATA, /usr/share/datasets/<name>, ./data (the download target
    when neither is set); each root also with the usual sub-folder names."""
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
    if not roots:
        out.extend(Path("data") / folder for folder in spec["folders"])
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
    for pair in _IDX_FILES.values():
        for fname in pair:
            target = folder / fname
            if target.is_file():
                continue
            try:
                download(spec["url"] + fname, target, spec["md5"][fname])
            except OSError as exc:
                tried = ", ".join(str(p) for p in _idx_candidates(name, data_dir))
                raise FileNotFoundError(
                    f"{name}: the IDX files ({', '.join(f for p in _IDX_FILES.values() for f in p)}) were not found "
                    f"in any of: {tried}; downloading {spec['url']}{fname} failed ({exc}). Put the files in "
                    f"{folder} (or any folder above) or set data.data_dir."
                ) from None
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


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100: the official "python version" release (pickled batches)

_CIFAR_SETS = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
    },
}


class _BatchUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; unpickle only what they hold (dicts, lists, bytes, numpy arrays), never
    arbitrary callables, so a tampered file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if module == "__builtin__":
            module = "builtins"
        if module == "copy_reg":
            module = "copyreg"
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # latin1: the release was pickled by Python 2; its str keys and names come back as str.
        obj = _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:
        raise ValueError(f"{where} is not a CIFAR python batch: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_candidates(name: str, data_dir: str | None) -> list[Path]:
    """Search order: data.data_dir, $DEEPRES_DATA, ./data; in each, the extracted folder or the archive (data_dir may
    also be the folder or the archive itself)."""
    spec = _CIFAR_SETS[name]
    roots = [Path(data_dir).expanduser()] if data_dir else []
    if os.environ.get("DEEPRES_DATA"):
        roots.append(Path(os.environ["DEEPRES_DATA"]).expanduser())
    roots.append(Path("data"))
    out = []
    for root in roots:
        out += [root, root / spec["folder"], root / spec["archive"]]
    return out


def _cifar_files(name: str, path: Path) -> dict[str, bytes] | None:
    """The batch files of ``path`` (a folder of them or the archive) as bytes, or None when it holds none."""
    spec = _CIFAR_SETS[name]
    wanted = spec["train"] + spec["test"] + [spec["meta"]]
    if path.is_dir():
        if not all((path / f).is_file() for f in wanted):
            return None
        return {f: (path / f).read_bytes() for f in wanted}
    if is_archive(path):
        found = {}
        images = False
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in wanted and member.name.startswith(spec["folder"] + "/"):
                        found[base] = tar.extractfile(member).read()
                    images = images or base.lower().endswith(IMAGE_EXTENSIONS)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
        missing = [f for f in wanted if f not in found]
        if missing:
            hint = f"; it holds image files: {IMAGE_FOLDER_HINT}" if images else ""
            raise ValueError(f"{path} lacks {spec['folder']}/{', '.join(missing)}{hint}")
        return found
    return None


IMAGE_FOLDER_HINT = "for an image folder (or an archive of one) set data.source=imagefolder"


def _is_image_folder(folder: Path) -> bool:
    """Whether the imagefolder source would read ``folder`` (its rule: ``folders.find_split_root``)."""
    from .folders import find_split_root

    try:
        find_split_root(folder)
    except (FileNotFoundError, OSError):
        return False
    return True


def _cifar_split(name: str, files: dict[str, bytes], which: str, where: Path) -> Split:
    spec = _CIFAR_SETS[name]
    images, labels = [], []
    for fname in spec[which]:
        batch = _unpickle(files[fname], f"{where}: {fname}")
        if "data" not in batch or spec["labels"] not in batch:
            raise ValueError(f"{where}: {fname} lacks 'data' or '{spec['labels']}' (keys: {sorted(batch)})")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(batch[spec["labels"]]):
            raise ValueError(f"{where}: {fname} holds data {data.shape} and {len(batch[spec['labels']])} labels; "
                             f"expected (N, 3072) and N labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[spec["labels"]], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def load_cifar(name: str, cfg) -> Dataset:
    spec = _CIFAR_SETS[name]
    candidates = _cifar_candidates(name, cfg.data_dir)
    for path in candidates:
        files = _cifar_files(name, path)
        if files is not None:
            break
    else:
        if cfg.data_dir and _is_image_folder(Path(cfg.data_dir).expanduser()):
            raise FileNotFoundError(f"{name}: {cfg.data_dir} holds image files, not the {spec['archive']} release "
                                    f"({spec['folder']}/): {IMAGE_FOLDER_HINT}")
        target = data_root(cfg.data_dir) / spec["archive"]
        try:
            path = download(spec["url"], target, spec["md5"])
        except OSError as exc:
            raise FileNotFoundError(
                f"{name}: neither {spec['archive']} nor {spec['folder']}/ was found in any of: "
                f"{', '.join(str(p) for p in candidates)}; downloading {spec['url']} failed ({exc}). Put "
                f"{spec['archive']} (from {spec['url']}, md5 {spec['md5']}) into {target.parent} or set data.data_dir."
            ) from None
        files = _cifar_files(name, path)
    meta = _unpickle(files[spec["meta"]], f"{path}: {spec['meta']}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(spec["names"], [])]
    train = _cifar_split(name, files, "train", path)
    test = _cifar_split(name, files, "test", path)
    top = int(max(train.labels.max(), test.labels.max()))
    if len(classes) <= top:
        raise ValueError(f"{path}: {spec['meta']} names {len(classes)} classes but labels reach {top}")
    return Dataset(name, classes, train, test, origin=str(path))


@register_source("cifar10")
def cifar10(cfg) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32x32 RGB, 10 classes; the paper's section 4.2 set."""
    return load_cifar("cifar10", cfg)


@register_source("cifar100")
def cifar100(cfg) -> Dataset:
    """CIFAR-100: 50k/10k 32x32 RGB, 100 fine classes."""
    return load_cifar("cifar100", cfg)


# ---------------------------------------------------------------------------------------------------------------
# Image folders (see folders.py)


@register_source("imagefolder")
def imagefolder(cfg) -> Dataset:
    """``root/<split>/<class>/<image>``, a .tar.gz of it, or a prepared file; decoded into memory once and cached."""
    from .folders import load_image_folder

    return load_image_folder(cfg)
