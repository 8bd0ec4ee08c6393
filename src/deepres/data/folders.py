"""Image folders: ``root/<class>/<image>`` or ``root/<split>/<class>/<image>``, scanned, decoded once into memory and
cached.

Layouts. Either ``root`` holds a ``train/`` folder and a test folder (``test/``, else ``val/``, the ImageNet name),
each holding one folder per class; or ``root`` holds the class folders themselves (torchvision's ``ImageFolder``
layout), and a fixed, seeded, per-class split carves the test split (``data.test_size``: a fraction or a count) from
them. Class index = position in the sorted folder names; images may sit in sub-folders of a class.
Hidden files (``.DS_Store``...) are ignored. ``root`` may also be a ``.tar.gz`` of such a folder (a single top folder
inside is looked through), extracted once into the cache, or a *prepared file* written by ``deepres data prepare``
(a ``torch.save``d dict of uint8 tensors and the class list, loadable with ``weights_only=True``).

Bad input is an error naming the path: an empty class folder, a split whose classes differ from train's, a file that
is not an image (by extension or content), a truncated or zero-byte image, an image of another size when no
``image_size`` is given. With ``on_bad_image="skip"`` bad *files* are left out instead, each logged (logger
``deepres.data``) with the count at the end; structural problems stay errors.

Decoding uses a process pool (``workers``); the decoded result is cached as a prepared file keyed by the source's
identity (archive size/mtime, or every file's size/mtime for a folder) and the decode options, so the second load is
a single ``torch.load``.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import available_cores, data_workers
from .archives import cache_root, extracted_archive, file_fingerprint, is_archive
from .datasets import Dataset, Split, subset_indices
from .images import (IMAGE_EXTENSIONS, BadImageError, file_image_size, read_image, resize_square, set_max_image_pixels,
                     to_channels)

__all__ = [
    "FileSplit",
    "FolderDataset",
    "FolderIndex",
    "PREPARED_FORMAT",
    "decode_folder",
    "find_split_root",
    "load_image_folder",
    "load_prepared",
    "prepare_image_folder",
    "resolve_image_source",
    "save_prepared",
    "scan_image_folder",
]

log = logging.getLogger("deepres.data")

PREPARED_FORMAT = "deepres.imagefolder"
PREPARED_VERSION = 1
TEST_SPLIT_NAMES = ("test", "val")
# Below this many files decoding stays in-process: a pool costs more than it saves.
_POOL_MIN_FILES = 1500
_CHUNK = 512


@dataclass
class FileSplit:
    """One split as file paths and int64 labels (nothing decoded)."""

    paths: list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, index: torch.Tensor) -> FileSplit:
        return FileSplit([self.paths[i] for i in index.tolist()], self.labels[index])

    def subset(self, count: int | None) -> FileSplit:
        """``count`` files drawn as :meth:`Split.subset` draws images, so both loaders train on the same subset."""
        if count is None or count >= len(self):
            return self
        return self.select(subset_indices(len(self), count))


@dataclass
class FolderIndex:
    """A scanned image folder: classes and the files of each split."""

    root: Path
    classes: list[str]
    splits: dict[str, FileSplit]
    # Files left out by the scan under on_bad_image="skip" (non-image extensions), as "path: reason".
    skipped: list[str] = field(default_factory=list)
    # "splits": root/{train,test}/<class>/; "classes": root/<class>/ with the test split carved (described here).
    layout: str = "splits"
    carved: str = ""

    def counts(self) -> dict[str, list[int]]:
        k = len(self.classes)
        return {name: torch.bincount(s.labels, minlength=k).tolist() for name, s in self.splits.items()}


# ---------------------------------------------------------------------------------------------------------------
# Scanning


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _holds_class_folders(folder: Path) -> bool:
    """Whether ``folder`` holds class folders: a visible sub-folder with an image file directly inside."""
    for sub in (p for p in folder.iterdir() if p.is_dir() and _visible(p.name)):
        if any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(sub)):
            return True
    return False


def find_split_root(root: Path) -> Path:
    """The folder holding ``train/`` or the class folders: ``root`` itself or its single visible sub-folder (an
    archive's top folder)."""
    root = Path(root)
    if (root / "train").is_dir():
        return root
    subdirs = [p for p in root.iterdir() if p.is_dir() and _visible(p.name)] if root.is_dir() else []
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    if subdirs and _holds_class_folders(root):
        return root
    if len(subdirs) == 1 and _holds_class_folders(subdirs[0]):
        return subdirs[0]
    raise FileNotFoundError(
        f"{root} is not an image folder: expected {root}/<class>/<image>, or {root}/train/<class>/<image> with test/ "
        f"or val/ beside train/"
    )


def split_per_class(labels: torch.Tensor, size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, carved) sorted indices: ``size`` of each class carved off, drawn with a fixed ``seed``. ``size`` below 1
    is a fraction of each class, else a count shared out in proportion to the classes' sizes. Every class keeps at
    least one image, and one with two or more gives at least one when anything is carved."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    kept, carved = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        share = size * len(members) if size < 1 else size * len(members) / n
        k = round(share)
        if size > 0 and len(members) > 1:
            k = max(k, 1)
        k = min(k, len(members) - 1)
        carved.append(members[:k])
        kept.append(members[k:])
    return torch.cat(kept).sort().values, torch.cat(carved).sort().values


def _bad(path, reason: str, on_bad_image: str, skipped: list[str], quiet: bool = False) -> None:
    if on_bad_image != "skip":
        raise BadImageError(path, reason)
    if not quiet:
        log.warning("skipping %s: %s", path, reason)
    skipped.append(f"{path}: {reason}")


def _scan_split(split_dir: Path, on_bad_image: str, skipped: list[str], quiet: bool = False
                ) -> tuple[list[str], list[str], list[int]]:
    """(classes, paths, labels) of one split folder; ``quiet``: skipped files are listed in ``skipped`` only."""
    classes, paths, labels = [], [], []
    entries = sorted((e for e in os.scandir(split_dir) if _visible(e.name)), key=lambda e: e.name)
    for entry in entries:
        if not entry.is_dir():
            _bad(entry.path, f"a file where {split_dir} should hold only class folders", on_bad_image, skipped, quiet)
            continue
        label = len(classes)
        classes.append(entry.name)
        found = 0
        for folder, dirs, files in os.walk(entry.path):
            dirs[:] = sorted(d for d in dirs if _visible(d))
            for name in sorted(files):
                if not _visible(name):
                    continue
                path = os.path.join(folder, name)
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    _bad(path, f"not an image file (extensions: {', '.join(IMAGE_EXTENSIONS)})", on_bad_image, skipped,
                         quiet)
                    continue
                paths.append(path)
                labels.append(label)
                found += 1
        if found == 0:
            raise ValueError(f"class folder {entry.path} holds no images")
    if not classes:
        raise ValueError(f"{split_dir} holds no class folders")
    return classes, paths, labels


TEST_SPLIT_SEED = 20151210  # the carving of root/<class>/ folders: fixed, whatever the run's seed


def scan_image_folder(root: str | Path, on_bad_image: str = "error", test_size: float = 0.2, *,
                      quiet: bool = False) -> FolderIndex:
    """Scan ``root`` (see module doc) without decoding anything; ``test_size`` carves the test split of a
    ``root/<class>/`` folder. ``quiet``: files skipped (``on_bad_image="skip"``) are listed in the index, not logged."""
    root = find_split_root(Path(root))
    if not (root / "train").is_dir():
        return _scan_class_folders(root, on_bad_image, test_size, quiet)
    test_dir = next((root / n for n in TEST_SPLIT_NAMES if (root / n).is_dir()), None)
    if test_dir is None:
        raise FileNotFoundError(f"{root} has train/ but no test/ or val/ folder")
    skipped: list[str] = []
    classes, train_paths, train_labels = _scan_split(root / "train", on_bad_image, skipped, quiet)
    test_classes, test_paths, test_labels = _scan_split(test_dir, on_bad_image, skipped, quiet)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise ValueError(
            f"the classes of {test_dir} differ from {root / 'train'}: only in train: {only_train or '-'}; "
            f"only in {test_dir.name}: {only_test or '-'}"
        )
    splits = {
        "train": FileSplit(train_paths, torch.tensor(train_labels, dtype=torch.int64)),
        "test": FileSplit(test_paths, torch.tensor(test_labels, dtype=torch.int64)),
    }
    return FolderIndex(root, classes, splits, skipped)


def _scan_class_folders(root: Path, on_bad_image: str, test_size: float, quiet: bool = False) -> FolderIndex:
    if not test_size > 0:
        raise ValueError(f"{root} holds class folders but no test split: data.test_size must carve one (got "
                         f"{test_size}); or give the folder train/ and test/ sub-folders")
    skipped: list[str] = []
    classes, paths, labels = _scan_split(root, on_bad_image, skipped, quiet)
    everything = FileSplit(paths, torch.tensor(labels, dtype=torch.int64))
    kept, carved = split_per_class(everything.labels, test_size, TEST_SPLIT_SEED)
    shown = f"{test_size:.0%}" if test_size < 1 else f"{int(test_size)} images"
    return FolderIndex(root, classes, {"train": everything.select(kept), "test": everything.select(carved)}, skipped,
                       layout="classes", carved=f"test split: {len(carved)} images ({shown} of each class, fixed seed)")


def resolve_image_source(path: str | Path, cache_dir: str | None = None) -> Path:
    """A folder or archive given as ``data.data_dir`` -> the split root on disk (archives extracted, cached)."""
    path = Path(path).expanduser()
    if is_archive(path):
        return find_split_root(extracted_archive(path, cache_dir))
    if path.is_dir():
        return find_split_root(path)
    if not path.exists():
        raise FileNotFoundError(f"image folder not found: {path}")
    raise ValueError(f"{path} is neither an image folder, a .tar.gz of one, nor a prepared file")


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def _decode_chunk(args) -> list[tuple[np.ndarray | None, str | None]]:
    paths, image_size = args
    out = []
    for path in paths:
        try:
            image = read_image(path)
            if image_size:
                image = resize_square(image, image_size)
            out.append((image.numpy(), None))
        except BadImageError as exc:
            out.append((None, exc.reason))
    return out


def _pool_init(max_pixels: int | None = None) -> None:
    torch.set_num_threads(1)
    if max_pixels is not None:  # a spawned process starts with the default limit
        set_max_image_pixels(max_pixels)


def _decode_paths(paths: list[str], image_size: int | None, workers: int) -> list[tuple[np.ndarray | None, str | None]]:
    chunks = [(paths[i : i + _CHUNK], image_size) for i in range(0, len(paths), _CHUNK)]
    workers = max(1, min(workers, available_cores(), len(chunks)))
    if workers == 1 or len(paths) < _POOL_MIN_FILES:
        return [r for chunk in chunks for r in _decode_chunk(chunk)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    from . import images

    with multiprocessing.get_context(method).Pool(workers, initializer=_pool_init,
                                                  initargs=(images._max_pixels,)) as pool:
        return [r for part in pool.imap(_decode_chunk, chunks) for r in part]


def decode_folder(
    index: FolderIndex,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    on_bad_image: str = "error",
    workers: int = 2,
) -> Dataset:
    """Decode every split of a scanned folder into memory (uint8 (N, C, H, W)); see the module doc for errors."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None; got {channels!r}")
    start = time.perf_counter()
    names = list(index.splits)
    all_paths = [p for n in names for p in index.splits[n].paths]
    results = _decode_paths(all_paths, image_size, workers)
    skipped = list(index.skipped)
    reference: tuple[str, tuple[int, int]] | None = None
    gray_only = True
    kept: dict[str, list[int]] = {}
    pos = 0
    for name in names:
        split = index.splits[name]
        kept[name] = []
        for i, path in enumerate(split.paths):
            array, error = results[pos + i]
            if error is not None:
                _bad(path, error, on_bad_image, skipped)
                continue
            size = tuple(array.shape[1:])
            if reference is None:
                reference = (path, size)
            elif size != reference[1]:
                raise ValueError(
                    f"{path} is {size[0]}x{size[1]} but {reference[0]} is {reference[1][0]}x{reference[1][1]}: every "
                    f"image must share a size; set data.image_size (prepare --size) to resize them"
                )
            gray_only &= array.shape[0] == 1
            kept[name].append(i)
        pos += len(split)
    if reference is None:
        raise ValueError(f"no decodable image in {index.root}")
    c = channels or (1 if gray_only else 3)
    h, w = reference[1]
    splits = {}
    pos = 0
    for name in names:
        split = index.splits[name]
        keep = kept[name]
        images = np.empty((len(keep), c, h, w), dtype=np.uint8)
        for j, i in enumerate(keep):
            array = results[pos + i][0]
            if array.shape[0] == c or array.shape[0] == 1:
                images[j] = array  # 1 -> 3 channels broadcasts
            else:
                images[j] = to_channels(torch.from_numpy(array), c).numpy()
        splits[name] = Split(torch.from_numpy(images), split.labels[torch.tensor(keep, dtype=torch.int64)])
        pos += len(split)
    if skipped:
        log.warning("skipped %d bad file(s) in %s", len(skipped), index.root)
    log.info("decoded %d images from %s in %.1f s", sum(len(s) for s in splits.values()), index.root,
             time.perf_counter() - start)
    return Dataset(
        "imagefolder",
        list(index.classes),
        splits["train"],
        splits["test"],
        origin=str(index.root),
        extra={"skipped": skipped, **({"carved": index.carved} if index.carved else {})},
    )


# ---------------------------------------------------------------------------------------------------------------
# Prepared files


def save_prepared(dataset: Dataset, path: str | Path, source: str = "") -> Path:
    """Write ``dataset``'s train and test splits as a prepared file (atomically: a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": PREPARED_FORMAT,
        "version": PREPARED_VERSION,
        "classes": list(dataset.classes),
        "source": source or dataset.origin,
        "skipped": list(dataset.extra.get("skipped", [])),
        "carved": dataset.extra.get("carved", ""),
        "splits": {
            name: {"images": split.images.contiguous(), "labels": split.labels.contiguous()}
            for name, split in (("train", dataset.train), ("test", dataset.test))
        },
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def is_prepared_file(path: Path) -> bool:
    import zipfile

    return path.is_file() and not is_archive(path) and zipfile.is_zipfile(path)


def load_prepared(path: str | Path, *, image_size: int | None = None, channels: int | None = None) -> Dataset:
    """Read a prepared file; ``image_size``/``channels`` (the config's) must agree with it when given."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path} is not a prepared image file (deepres data prepare): {exc}") from None
    if not isinstance(state, dict) or state.get("format") != PREPARED_FORMAT:
        raise ValueError(f"{path} is not a prepared image file (deepres data prepare)")
    if state.get("version", 0) > PREPARED_VERSION:
        raise ValueError(f"{path} was written by a newer deepres (format version {state['version']})")
    splits = {n: Split(s["images"], s["labels"]) for n, s in state["splits"].items()}
    size = tuple(splits["train"].images.shape[-2:])
    if image_size and size != (image_size, image_size):
        raise ValueError(
            f"{path} holds {size[0]}x{size[1]} images but data.image_size={image_size}; prepare it again with "
            f"--size {image_size}"
        )
    if channels and splits["train"].images.shape[1] != channels:
        splits = {n: Split(to_channels(s.images, channels), s.labels) for n, s in splits.items()}
    for entry in state.get("skipped", []):
        log.warning("left out when %s was prepared: %s", path, entry)
    return Dataset(
        "imagefolder",
        list(state["classes"]),
        splits["train"],
        splits["test"],
        origin=str(state.get("source") or path),
        extra={"skipped": list(state.get("skipped", [])), "prepared": str(path),
               **({"carved": state["carved"]} if state.get("carved") else {})},
    )


def prepare_image_folder(
    source: str | Path,
    destination: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    on_bad_image: str = "error",
    workers: int = 2,
    cache_dir: str | None = None,
    test_size: float = 0.2,
) -> Dataset:
    """``deepres data prepare``: decode a folder (or .tar.gz of one) once into a prepared file."""
    root = resolve_image_source(source, cache_dir)
    index = scan_image_folder(root, on_bad_image, test_size)
    dataset = decode_folder(index, image_size=image_size, channels=channels, on_bad_image=on_bad_image, workers=workers)
    save_prepared(dataset, destination, source=str(source))
    dataset.extra["prepared"] = str(destination)
    return dataset


def _tree_fingerprint(root: Path) -> str:
    """Every file's relative path, size and modification time, hashed: changes when any image changes."""
    digest = hashlib.sha1(str(root.resolve()).encode())
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(folder, name))
            digest.update(
                f"{os.path.relpath(os.path.join(folder, name), root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _prepared_cache(cfg) -> tuple[Path, Path | None]:
    """(the decoded-cache file for this config's folder or archive, the split root when it was resolved)."""
    path = Path(cfg.data_dir).expanduser()
    channels = getattr(cfg, "channels", None)
    cache_dir = getattr(cfg, "cache_dir", None)
    if is_archive(path):
        identity, root = f"archive|{path.resolve()}|{file_fingerprint(path)}", None
    else:
        root = resolve_image_source(path, cache_dir)
        identity = f"folder|{_tree_fingerprint(root)}"
    test_size = getattr(cfg, "test_size", 0.2)
    options = (f"{identity}|size={cfg.image_size}|channels={channels}|bad={cfg.on_bad_image}|test={test_size}|"
               f"v{PREPARED_VERSION}")
    key = hashlib.sha1(options.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "prepared" / f"{path.name.split('.')[0] or 'images'}-{key}.pt", root


def _require_data_dir(cfg) -> Path:
    if not cfg.data_dir:
        raise ValueError(
            "data.source=imagefolder needs data.data_dir (an image folder, a .tar.gz of one, or a file written by "
            "`deepres data prepare`)"
        )
    return Path(cfg.data_dir).expanduser()


def load_image_folder(cfg) -> Dataset:
    """The ``imagefolder`` source: ``cfg.data_dir`` is a folder, a .tar.gz of one, or a prepared file."""
    path = _require_data_dir(cfg)
    channels = getattr(cfg, "channels", None)
    cache_dir = getattr(cfg, "cache_dir", None)
    if is_prepared_file(path):
        return load_prepared(path, image_size=cfg.image_size, channels=channels)
    cached, root = _prepared_cache(cfg)
    if cached.is_file():
        log.info("reading decoded images from %s", cached)
        dataset = load_prepared(cached)
        dataset.origin = str(path)
        return dataset
    if root is None:
        root = resolve_image_source(path, cache_dir)
    index = scan_image_folder(root, cfg.on_bad_image, getattr(cfg, "test_size", 0.2))
    dataset = decode_folder(
        index, image_size=cfg.image_size, channels=channels, on_bad_image=cfg.on_bad_image, workers=data_workers(cfg)
    )
    try:
        save_prepared(dataset, cached, source=str(path))
        dataset.extra["prepared"] = str(cached)
    except OSError as exc:  # a read-only cache only costs the next load its decoding
        log.warning("could not cache decoded images at %s: %s", cached, exc)
    dataset.origin = str(path)
    return dataset


def decoded_bytes_estimate(cfg, index: FolderIndex) -> int:
    """Bytes the train and test splits take decoded as uint8 at the configured (or the first image's) size."""
    if cfg.image_size:
        h = w = cfg.image_size
    else:
        first = index.splits["train"].paths[0]
        size = file_image_size(first)
        if size is None:
            raise BadImageError(first, "its header is not an image's")
        h, w = size
    channels = getattr(cfg, "channels", None) or 3
    return sum(len(s) for s in index.splits.values()) * channels * h * w


@dataclass
class FolderDataset:
    """A scanned (not decoded) image folder with the attributes of :class:`~deepres.data.datasets.Dataset` the
    rest of the code reads; its splits are :class:`FileSplit` (used by the worker loader)."""

    name: str
    classes: list[str]
    train: FileSplit
    test: FileSplit
    val: FileSplit | None
    channels: int
    image_size: tuple[int, int]
    origin: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> dict[str, FileSplit]:
        out = {"train": self.train, "test": self.test}
        if self.val is not None:
            out["val"] = self.val
        return out

    def counts(self) -> dict[str, list[int]]:
        return {n: torch.bincount(s.labels, minlength=self.num_classes).tolist() for n, s in self.splits().items()}
