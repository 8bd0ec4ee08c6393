"""Small datasets in official formats, written by tests."""

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(root: Path, n_train: int = 512, n_test: int = 128, size: int = 16, seed: int = 0) -> Path:
    """A learnable 10-class grayscale set in Fashion-MNIST's IDX files: class k is a bright bar at row/col k."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def images_for(labels):
        x = rng.integers(0, 60, size=(len(labels), size, size)).astype(np.int64)
        for i, k in enumerate(labels):
            pos = 2 + (k % 5) * (size - 4) // 5
            if k < 5:
                x[i, pos : pos + 2, :] += 180
            else:
                x[i, :, pos : pos + 2] += 180
        return np.clip(x, 0, 255)

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images_for(labels))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def make_image_folder(root: Path, counts: dict[str, int], paint, classes: int = 10, size: int = 32,
                      seed: int = 0) -> Path:
    """An image folder like the CIFAR-10 JPEG set: ``root/<split>/class<k>/<i>.png``, ``counts[split]`` images per
    class, dark noise on which ``paint(image, k)`` marks class k (in place, uint8 HxWx3)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
                paint(img, k)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root
