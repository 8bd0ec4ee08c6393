"""Every source on small files in its official format, the search order, downloads (from local files only), safe
archive extraction, and the real data in ../shared/data."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from deepres.config import DataConfig
from deepres.data import archives, folders, load_dataset, sources
from deepres.data.datasets import Split
from deepres.data.folders import FileSplit
from deepres.data.archives import extract_archive, md5sum

from .helpers import write_idx
from .test_data_common import (
    REAL_CIFAR_JPEG,
    REAL_FASHION,
    make_cifar,
    make_image_folder,
    make_tar,
    pattern,
    stack_written,
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test reads $DEEPRES_DATA or ./data of the machine, nor writes to ~/.cache."""
    monkeypatch.delenv("DEEPRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("offline (test)")


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100


@pytest.mark.parametrize("as_archive", [True, False])
def test_cifar10_reads_official_python_batches(tmp_path, as_archive):
    made = make_cifar(tmp_path / "d", "cifar10", per_batch=12, as_archive=as_archive)
    ds = load_dataset(DataConfig(source="cifar10", data_dir=str(tmp_path / "d"), val_size=0))
    train_x, train_y = stack_written(made["written"], "train")
    test_x, test_y = stack_written(made["written"], "test")
    assert ds.classes == [f"class{i}" for i in range(10)]
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    # Rows of 3072 are three 32x32 planes, R then G then B.
    assert torch.equal(ds.train.images, torch.from_numpy(train_x)) and ds.train.images.shape == (60, 3, 32, 32)
    assert torch.equal(ds.train.labels, torch.from_numpy(train_y))
    assert (torch.equal(ds.test.images, torch.from_numpy(test_x))
            and torch.equal(ds.test.labels, torch.from_numpy(test_y)))


def test_cifar100_fine_labels_and_names(tmp_path):
    made = make_cifar(tmp_path, "cifar100", per_batch=30)
    ds = load_dataset(DataConfig(source="cifar100", data_dir=str(made["path"]), val_size=10))
    assert ds.num_classes == 100 and ds.classes[7] == "fine7"
    assert len(ds.train) == 20 and len(ds.val) == 10 and len(ds.test) == 30
    _, train_y = stack_written(made["written"], "train")
    assert sorted(torch.cat([ds.train.labels, ds.val.labels]).tolist()) == sorted(train_y.tolist())


def test_cifar_validation_split_is_deterministic(tmp_path):
    make_cifar(tmp_path, "cifar10")
    cfg = DataConfig(source="cifar10", data_dir=str(tmp_path), val_size=15)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(a.val.images, b.val.images) and len(a.val) == 15 and len(a.train) == 45


def test_cifar_search_order(tmp_path, monkeypatch):
    first = make_cifar(tmp_path / "explicit", "cifar10", per_batch=4)
    env = make_cifar(tmp_path / "env", "cifar10", per_batch=5)
    monkeypatch.setenv("DEEPRES_DATA", str(tmp_path / "env"))
    assert len(load_dataset(DataConfig(source="cifar10", data_dir=str(tmp_path / "explicit"), val_size=0)).test) == 4
    assert len(load_dataset(DataConfig(source="cifar10", val_size=0)).test) == 5
    monkeypatch.delenv("DEEPRES_DATA")
    make_cifar(Path("data"), "cifar10", per_batch=6)  # ./data of the working directory
    ds = load_dataset(DataConfig(source="cifar10", val_size=0))
    assert len(ds.test) == 6 and first and env


def test_cifar_download_verifies_md5(tmp_path, monkeypatch):
    made = make_cifar(tmp_path / "mirror", "cifar10", per_batch=4)
    spec = dict(sources._CIFAR_SETS["cifar10"], url=made["path"].as_uri(), md5=md5sum(made["path"]))
    monkeypatch.setitem(sources._CIFAR_SETS, "cifar10", spec)
    target = tmp_path / "downloads"
    ds = load_dataset(DataConfig(source="cifar10", data_dir=str(target), val_size=0))
    assert len(ds.test) == 4 and (target / "cifar-10-python.tar.gz").is_file()
    assert not list(target.glob("*.part"))


def test_cifar_download_checksum_mismatch_is_an_error(tmp_path, monkeypatch):
    made = make_cifar(tmp_path / "mirror", "cifar10", per_batch=4)
    spec = dict(sources._CIFAR_SETS["cifar10"], url=made["path"].as_uri(), md5="0" * 32)
    monkeypatch.setitem(sources._CIFAR_SETS, "cifar10", spec)
    target = tmp_path / "downloads"
    with pytest.raises(ValueError, match="checksum mismatch.*expected md5 0{32}, got [0-9a-f]{32}"):
        load_dataset(DataConfig(source="cifar10", data_dir=str(target), val_size=0))
    assert not list(target.glob("*")), "nothing may be left as if it were the dataset"


def test_cifar_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "urlopen", _no_network)
    target = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(DataConfig(source="cifar100", data_dir=str(target)))
    message = str(info.value)
    assert ("cifar-100-python.tar.gz" in message and str(target) in message
            and "eb9058c3a382ffc7106e4002c42a8d85" in message)
    assert not target.exists(), "an offline attempt creates no folders"


def test_cifar_pointed_at_an_image_folder_says_to_use_imagefolder(tmp_path, monkeypatch):
    """The CIFAR-10 JPEG set given to the cifar10 source: the error names data.source=imagefolder, and a folder of
    images is not a place to download the python release into."""
    monkeypatch.setattr(archives, "urlopen", lambda *a, **k: pytest.fail("no download for a folder of images"))
    root = make_image_folder(tmp_path / "pics", n_train=2, n_test=1)
    with pytest.raises(FileNotFoundError, match="holds image files.*data.source=imagefolder"):
        load_dataset(DataConfig(source="cifar10", data_dir=str(root), val_size=0))
    archive = make_tar(tmp_path / "pics.tar.gz", root, "pics")
    with pytest.raises(ValueError, match="lacks cifar-10-batches-py/.*holds image files.*data.source=imagefolder"):
        load_dataset(DataConfig(source="cifar10", data_dir=str(archive), val_size=0))
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]  # nothing written into it


def test_cifar_refuses_pickles_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(tmp_path, "cifar10", as_archive=False)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="data_batch_3.*not a CIFAR python batch"):
        load_dataset(DataConfig(source="cifar10", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)


def _write_idx_set(folder: Path, n_train=20, n_test=10, size=28):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_idx_sources_read_official_files(tmp_path, name):
    written = _write_idx_set(tmp_path)
    ds = load_dataset(DataConfig(source=name, data_dir=str(tmp_path), val_size=5))
    assert ds.channels == 1 and ds.image_size == (28, 28) and ds.num_classes == 10
    assert len(ds.train) == 15 and len(ds.val) == 5
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(written["t10k"][0]))
    assert torch.equal(ds.test.labels, torch.from_numpy(written["t10k"][1].astype(np.int64)))
    if name == "fashion_mnist":
        assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_idx_search_order_env_then_subfolder(tmp_path, monkeypatch):
    _write_idx_set(tmp_path / "env" / "fashion-mnist", n_test=7)
    monkeypatch.setenv("DEEPRES_DATA", str(tmp_path / "env"))
    assert len(load_dataset(DataConfig(source="fashion_mnist", val_size=0)).test) == 7
    _write_idx_set(tmp_path / "mine", n_test=3)
    assert len(load_dataset(DataConfig(source="fashion_mnist", data_dir=str(tmp_path / "mine"), val_size=0)).test) == 3


def test_idx_truncated_file_is_an_error(tmp_path):
    _write_idx_set(tmp_path)
    import gzip

    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is truncated"):
        load_dataset(DataConfig(source="mnist", data_dir=str(tmp_path)))


def test_idx_download_uses_the_checksums(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    _write_idx_set(mirror, n_test=4)
    spec = dict(sources._IDX_SETS["mnist"], url=mirror.as_uri() + "/",
                md5={f.name: md5sum(f) for f in mirror.iterdir()}, system=str(tmp_path / "no-system"))
    monkeypatch.setitem(sources._IDX_SETS, "mnist", spec)
    ds = load_dataset(DataConfig(source="mnist", data_dir=str(tmp_path / "dl"), val_size=0))
    assert len(ds.test) == 4 and (tmp_path / "dl" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    spec["md5"] = dict(spec["md5"], **{"train-images-idx3-ubyte.gz": "f" * 32})
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_dataset(DataConfig(source="mnist", data_dir=str(tmp_path / "dl2")))


def test_idx_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "urlopen", _no_network)
    monkeypatch.setitem(sources._IDX_SETS, "mnist", dict(sources._IDX_SETS["mnist"], system=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*Put the files in"):
        load_dataset(DataConfig(source="mnist", data_dir=str(tmp_path / "x")))


def test_real_fashion_mnist_counts():
    if not REAL_FASHION.is_dir():
        pytest.skip(f"{REAL_FASHION} not present")
    ds = load_dataset(DataConfig(source="fashion_mnist", data_dir=str(REAL_FASHION), val_size=0))
    counts = ds.counts()
    assert counts["train"] == [6000] * 10 and counts["test"] == [1000] * 10
    assert ds.train.images.shape == (60000, 1, 28, 28)


# ---------------------------------------------------------------------------------------------------------------
# Image folders


def _folder_cfg(path, **kw):
    kw.setdefault("val_size", 0)
    return DataConfig(source="imagefolder", data_dir=str(path), **kw)


def test_imagefolder_decodes_classes_in_sorted_order(tmp_path):
    root = make_image_folder(tmp_path / "f", classes=("cat", "ant", "bee"), n_train=4, n_test=2)
    ds = load_dataset(_folder_cfg(root, val_size=3, cache_dir=str(tmp_path / "cache")))
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.train.images.shape == (9, 3, 8, 8) and len(ds.val) == 3 and len(ds.test) == 6
    assert ds.counts()["test"] == [2, 2, 2]
    # Lossless PNG: the pixels are those written; test image 1 of class 'bee' (label 1).
    assert torch.equal(ds.test.images[3], torch.from_numpy(pattern(1, 101)).permute(2, 0, 1))


def test_imagefolder_accepts_val_as_the_test_folder_name(tmp_path):
    root = make_image_folder(tmp_path / "f", test_name="val", n_test=2)
    ds = load_dataset(_folder_cfg(root, cache_dir=str(tmp_path / "c")))
    assert len(ds.test) == 6


def test_imagefolder_from_archive_extracts_once_into_the_cache(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "src", n_train=3, n_test=2)
    archive_dir = tmp_path / "readonly"
    archive_dir.mkdir()
    archive = make_tar(archive_dir / "pics.tar.gz", root, "pics")
    cache = tmp_path / "cache"
    ds = load_dataset(_folder_cfg(archive, cache_dir=str(cache)))
    assert len(ds.train) == 9 and ds.classes == ["ant", "bee", "cat"]
    assert sorted(p.name for p in archive_dir.iterdir()) == ["pics.tar.gz"], "nothing is written beside the archive"
    extracted = list((cache / "extracted").iterdir())
    assert len(extracted) == 1 and (extracted[0] / "pics" / "train" / "ant").is_dir()

    # Second load: neither extraction nor decoding happens again.
    def fail(*a, **k):
        raise AssertionError("should have been cached")

    monkeypatch.setattr(archives, "extract_archive", fail)
    monkeypatch.setattr(folders, "decode_folder", fail)
    again = load_dataset(_folder_cfg(archive, cache_dir=str(cache)))
    assert torch.equal(again.train.images, ds.train.images) and again.classes == ds.classes


def test_imagefolder_extraction_uses_deepres_data_when_no_cache_dir(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "src", n_train=2, n_test=1)
    archive = make_tar(tmp_path / "a.tar.gz", root, "a")
    monkeypatch.setenv("DEEPRES_DATA", str(tmp_path / "dd"))
    load_dataset(_folder_cfg(archive))
    assert (tmp_path / "dd" / "cache" / "extracted").is_dir() and (tmp_path / "dd" / "cache" / "prepared").is_dir()


def test_imagefolder_decoded_cache_follows_changes(tmp_path):
    root = make_image_folder(tmp_path / "f", n_train=2, n_test=1)
    cfg = _folder_cfg(root, cache_dir=str(tmp_path / "c"))
    first = load_dataset(cfg)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "ant" / "0000.png")
    os.utime(root / "train" / "ant" / "0000.png", ns=(1, 1))
    second = load_dataset(cfg)
    assert not torch.equal(first.train.images, second.train.images)
    assert int(second.train.images[0].sum()) == 0


def test_prepared_file_round_trip(tmp_path):
    root = make_image_folder(tmp_path / "f", n_train=3, n_test=2, size=12)
    dst = tmp_path / "prepared.pt"
    folders.prepare_image_folder(root, dst, image_size=8)
    state = torch.load(dst, weights_only=True)
    assert state["classes"] == ["ant", "bee", "cat"] and state["splits"]["train"]["images"].shape == (9, 3, 8, 8)
    ds = load_dataset(_folder_cfg(dst, val_size=2))
    assert len(ds.train) == 7 and len(ds.val) == 2 and ds.image_size == (8, 8)
    with pytest.raises(ValueError, match="holds 8x8 images but data.image_size=16"):
        load_dataset(_folder_cfg(dst, image_size=16))


def test_not_a_prepared_file(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="x.pt is not a prepared image file"):
        load_dataset(_folder_cfg(bad))
    with pytest.raises(ValueError, match="needs data.data_dir"):
        load_dataset(DataConfig(source="imagefolder"))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_dataset(_folder_cfg(tmp_path / "missing"))


def test_not_an_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected .*train/<class>/<image>"):
        load_dataset(_folder_cfg(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------------------------
# Safe extraction


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("top/train/a/ok.png")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"y"))
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def _symlink(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hardlink(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


@pytest.mark.parametrize(
    "member, reason",
    [
        (tarfile.TarInfo("top/../../escape.txt"), "escapes"),
        (tarfile.TarInfo("/tmp/absolute.txt"), "absolute"),
        (_symlink("top/train/a/link.png", "/etc/passwd"), "links"),
        (_hardlink("top/train/a/hard.png", "top/train/a/ok.png"), "links"),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink"],
)
def test_unsafe_archive_members_are_refused(tmp_path, member, reason):
    name = member.name
    archive = _tar_with(tmp_path / "bad.tar.gz", member)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ValueError, match=f"unsafe archive member '{name}'.*{reason}"):
        extract_archive(archive, dest)
    assert not dest.exists() and list((tmp_path / "out").iterdir()) == [], "nothing is left half-extracted"
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/absolute.txt").exists()
    # Through the source, too: the error names the member.
    with pytest.raises(ValueError, match="unsafe archive member"):
        load_dataset(_folder_cfg(archive, cache_dir=str(tmp_path / "c")))


def test_corrupt_archive_is_an_error(tmp_path):
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(ValueError, match="broken.tar.gz"):
        extract_archive(bad, tmp_path / "o")


# ---------------------------------------------------------------------------------------------------------------
# The real CIFAR-10 JPEG archive


def _real_subset(tmp_path: Path, per_class: int = 12) -> Path:
    """The first ``per_class`` test images of each class of the real archive (test/ comes first in it), split
    into a small train/test folder; reads only the start of the archive."""
    if not REAL_CIFAR_JPEG.is_file():
        pytest.skip(f"{REAL_CIFAR_JPEG} not present")
    counts: dict[str, int] = {}
    root = tmp_path / "real"
    with tarfile.open(REAL_CIFAR_JPEG) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 4 or not member.isfile():
                continue
            if parts[1] != "test":
                break
            cls = parts[2]
            k = counts.get(cls, 0)
            if k >= per_class:
                continue
            counts[cls] = k + 1
            split = "train" if k < per_class * 2 // 3 else "test"
            out = root / split / cls / parts[3]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    return root


def test_real_cifar10_jpeg_subset(tmp_path):
    root = _real_subset(tmp_path)
    ds = load_dataset(_folder_cfg(root, cache_dir=str(tmp_path / "c")))
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ds.train.images.shape == (80, 3, 32, 32) and ds.counts()["test"] == [4] * 10
    assert 40 < float(ds.train.images.float().mean()) < 200  # real photos, not blank


@pytest.mark.slow
def test_real_cifar10_jpeg_full_decode_and_cache(tmp_path):
    """All 60k JPEGs: extracted and decoded once (well under a minute on 2 cores), then read back in about a second."""
    import time

    if not REAL_CIFAR_JPEG.is_file():
        pytest.skip(f"{REAL_CIFAR_JPEG} not present")
    cfg = _folder_cfg(REAL_CIFAR_JPEG, cache_dir=str(tmp_path / "c"), num_workers=2)
    start = time.perf_counter()
    ds = load_dataset(cfg)
    first = time.perf_counter() - start
    assert ds.counts()["train"] == [5000] * 10 and ds.counts()["test"] == [1000] * 10
    start = time.perf_counter()
    again = load_dataset(cfg)
    second = time.perf_counter() - start
    assert torch.equal(again.test.images, ds.test.images)
    assert first < 120 and second < 10, (first, second)


def test_subsets_span_the_classes_and_agree_between_loaders(tmp_path):
    # Sources store images grouped by class; a subset must not be the first class or two.
    labels = torch.arange(10).repeat_interleave(100)
    split = Split(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), labels)
    small = split.subset(100)
    assert len(small) == 100 and set(small.labels.tolist()) == set(range(10))
    assert torch.equal(small.labels, split.subset(100).labels)  # deterministic
    files = FileSplit([f"img{i}.png" for i in range(1000)], labels)
    assert torch.equal(files.subset(100).labels, small.labels)  # the worker loader trains on the same subset
    assert split.subset(None) is split and split.subset(5000) is split
