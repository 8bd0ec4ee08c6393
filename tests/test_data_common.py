"""Small data sets in official formats, written by the data tests (and checks of these writers themselves)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import SHARED_DATA

REAL_CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"
REAL_FASHION = SHARED_DATA / "fashion-mnist"


def image_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def pattern(label: int, index: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """A deterministic image (H, W, C) uint8 that differs per (label, index)."""
    rng = np.random.default_rng(1000 * label + index)
    return rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)


def make_image_folder(
    root: Path,
    classes=("cat", "ant", "bee"),
    n_train: int = 6,
    n_test: int = 3,
    size: int = 8,
    fmt: str = "PNG",
    test_name: str = "test",
) -> Path:
    """root/{train,test}/<class>/<i>.<ext>: lossless PNG by default, so decoded pixels equal ``pattern``."""
    ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "WEBP": "webp"}[fmt]
    for split, n in (("train", n_train), (test_name, n_test)):
        for label, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                offset = 0 if split == "train" else 100
                array = pattern(label, i + offset, size)
                (folder / f"{i:04d}.{ext}").write_bytes(image_bytes(Image.fromarray(array), fmt))
    return root


def make_tar(path: Path, root: Path, arcname: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname=arcname)
    return path


def cifar_arrays(n: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, num_classes, size=n).tolist()


def make_cifar(root: Path, name: str = "cifar10", per_batch: int = 12, as_archive: bool = True) -> dict:
    """The official python-format release in miniature: pickled dicts with bytes keys, in a tar.gz (or the
    extracted folder). Returns the arrays written, for comparison."""
    ten = name == "cifar10"
    folder_name = "cifar-10-batches-py" if ten else "cifar-100-python"
    num_classes = 10 if ten else 100
    files, written = {}, {"train": [], "test": []}
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]
    test_files = ["test_batch"] if ten else ["test"]
    label_key = b"labels" if ten else b"fine_labels"
    for split, fnames in (("train", train_files), ("test", test_files)):
        for k, fname in enumerate(fnames):
            data, labels = cifar_arrays(per_batch, num_classes, seed=len(name) * 100 + k * 10 + (split == "test"))
            written[split].append((data, labels))
            batch = {b"batch_label": fname.encode(), b"data": data, label_key: labels,
                     b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}
            if not ten:
                batch[b"coarse_labels"] = [lab // 5 for lab in labels]
            files[fname] = pickle.dumps(batch, protocol=2)
    if ten:
        names = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
        files["batches.meta"] = pickle.dumps(names, protocol=2)
    else:
        names = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                 b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
        files["meta"] = pickle.dumps(names, protocol=2)
    root.mkdir(parents=True, exist_ok=True)
    if as_archive:
        archive = root / ("cifar-10-python.tar.gz" if ten else "cifar-100-python.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            for fname, data in files.items():
                info = tarfile.TarInfo(f"{folder_name}/{fname}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        path = archive
    else:
        folder = root / folder_name
        folder.mkdir(exist_ok=True)
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
        path = folder
    return {"path": path, "written": written}


def stack_written(written, split):
    data = np.concatenate([d for d, _ in written[split]])
    labels = np.concatenate([lab for _, lab in written[split]])
    return data.reshape(-1, 3, 32, 32), labels


def test_pattern_is_deterministic_and_distinct():
    assert np.array_equal(pattern(1, 2), pattern(1, 2))
    assert not np.array_equal(pattern(1, 2), pattern(2, 1))


def test_make_cifar_writes_official_layout(tmp_path):
    made = make_cifar(tmp_path, "cifar10")
    with tarfile.open(made["path"]) as tar:
        names = sorted(tar.getnames())
    assert "cifar-10-batches-py/batches.meta" in names and "cifar-10-batches-py/data_batch_5" in names
