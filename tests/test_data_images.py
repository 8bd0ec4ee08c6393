"""Bad input and colour modes: every conversion is explicit, every bad file is an error naming it (or, with
on_bad_image=skip, a logged omission), never a silent substitution."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from deepres.config import DataConfig
from deepres.data import load_dataset
from deepres.data.images import ALPHA_BACKGROUND, BadImageError, decode_image_bytes, resize_square, to_channels

from .test_data_common import image_bytes, make_image_folder, pattern


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _rgb(h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _decode(image: Image.Image, fmt: str, **options) -> torch.Tensor:
    return decode_image_bytes(image_bytes(image, fmt, **options), f"test.{fmt.lower()}")


# ---------------------------------------------------------------------------------------------------------------
# Modes


def test_rgb_formats_decode_exactly():
    array = _rgb()
    expected = torch.from_numpy(array).permute(2, 0, 1)
    for fmt, options in (("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("PPM", {})):
        out = _decode(Image.fromarray(array), fmt, **options)
        assert out.dtype == torch.uint8 and torch.equal(out, expected), fmt


def test_jpeg_rgb_and_grayscale_channels():
    rgb = _decode(Image.fromarray(_rgb(16, 16)), "JPEG", quality=95)
    gray = _decode(Image.fromarray(_rgb(16, 16)[..., 0]), "JPEG", quality=95)
    assert rgb.shape == (3, 16, 16) and gray.shape == (1, 16, 16)


def test_cmyk_jpeg_becomes_rgb():
    flat = np.zeros((16, 16, 3), np.uint8)
    flat[...] = (200, 40, 90)
    out = _decode(Image.fromarray(flat).convert("CMYK"), "JPEG", quality=100)
    assert out.shape == (3, 16, 16)
    assert (out.float().mean(dim=(1, 2)) - torch.tensor([200.0, 40.0, 90.0])).abs().max() < 6


def test_rgba_is_composited_over_white():
    color = _rgb(4, 4)
    alpha = np.array([[0, 64, 128, 255]] * 4, np.uint8)
    rgba = np.dstack([color, alpha])
    out = _decode(Image.fromarray(rgba, "RGBA"), "PNG").permute(1, 2, 0).numpy().astype(np.int64)
    a = alpha[..., None].astype(np.int64)
    expected = (color.astype(np.int64) * a + ALPHA_BACKGROUND * (255 - a) + 127) // 255
    assert np.array_equal(out, expected)
    assert (out[:, 0] == 255).all(), "fully transparent pixels are the background, not the hidden colour"
    assert np.array_equal(out[:, 3], color[:, 3]), "opaque pixels keep their colour"


def test_la_is_composited_and_stays_gray():
    la = np.dstack([np.full((3, 3), 10, np.uint8), np.full((3, 3), 0, np.uint8)])
    out = _decode(Image.fromarray(la, "LA"), "PNG")
    assert out.shape == (1, 3, 3) and (out == 255).all()


def test_palette_expands_through_its_palette():
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    out = _decode(image, "PNG")
    assert out.shape == (3, 2, 4)
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 0, 1].tolist() == [0, 0, 255]


def test_palette_transparency_is_composited():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 255, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putdata([0, 1])
    out = _decode(image, "PNG", transparency=0)
    assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 0, 1].tolist() == [0, 0, 255]


def test_16bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535, 1000, 60000]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = _decode(image, "PNG")
    assert out.shape == (1, 1, 6)
    assert out[0, 0].tolist() == [0, 1, 128, 255, 4, 233]  # round(v * 255 / 65535)


def test_32bit_integer_mode_holding_16bit_values():
    image = Image.fromarray(np.array([[0, 65535, 257]], np.int32), "I")
    out = _decode(image, "TIFF")  # (older Pillow also reads 16-bit PNG as mode I)
    assert out[0, 0].tolist() == [0, 255, 1]


def test_channel_conversions():
    rgb = torch.tensor([[[255]], [[0]], [[0]]], dtype=torch.uint8)
    assert to_channels(rgb, 1).item() == 76  # ITU-R 601-2 luma of pure red, as PIL convert("L")
    gray = torch.full((1, 2, 2), 7, dtype=torch.uint8)
    assert torch.equal(to_channels(gray, 3), gray.expand(3, 2, 2))


def test_resize_square_keeps_aspect_and_centres():
    wide = torch.zeros(3, 10, 20, dtype=torch.uint8)
    wide[:, :, 4:16] = 200
    out = resize_square(wide, 5)
    assert out.shape == (3, 5, 5) and (out > 150).all(), "the centre of the wide image is kept"


# ---------------------------------------------------------------------------------------------------------------
# Bad files


def test_bad_bytes_are_errors_naming_the_file():
    good = image_bytes(Image.fromarray(_rgb(16, 16)), "JPEG")
    for data, reason in ((b"", "empty file"), (b"plain text, not an image", "not a recognised image format"),
                         (good[: len(good) // 2], "truncated"), (good[:-2], "truncated")):
        with pytest.raises(BadImageError, match=f"cannot decode image /some/file.jpg: .*{reason}"):
            decode_image_bytes(data, "/some/file.jpg")


def _cfg(root, **kw):
    kw.setdefault("val_size", 0)
    return DataConfig(source="imagefolder", data_dir=str(root), **kw)


@pytest.mark.parametrize("kind", ["truncated", "zero_byte", "not_an_image", "wrong_extension"])
def test_bad_file_in_folder_is_an_error_naming_it(tmp_path, kind):
    root = make_image_folder(tmp_path / "f", n_train=3, n_test=1, fmt="JPEG", size=16)
    target = root / "train" / "bee" / "0001.jpg"
    if kind == "truncated":
        target.write_bytes(target.read_bytes()[:-30])
    elif kind == "zero_byte":
        target.write_bytes(b"")
    elif kind == "not_an_image":
        target.write_text("hello")
    else:
        target = root / "train" / "bee" / "notes.txt"
        target.write_text("hello")
    with pytest.raises(ValueError, match=str(target)):
        load_dataset(_cfg(root, cache_dir=str(tmp_path / "c")))


def test_skip_logs_every_bad_file_and_the_count(tmp_path, caplog):
    root = make_image_folder(tmp_path / "f", n_train=3, n_test=2)
    bad = [root / "train" / "ant" / "0000.png", root / "test" / "cat" / "0001.png", root / "train" / "bee" / "x.txt"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(bad[1].read_bytes()[:40])
    bad[2].write_text("notes")
    with caplog.at_level(logging.WARNING, logger="deepres.data"):
        ds = load_dataset(_cfg(root, on_bad_image="skip", cache_dir=str(tmp_path / "c")))
    assert len(ds.train) == 8 and len(ds.test) == 5
    assert ds.counts()["train"] == [2, 3, 3] and ds.counts()["test"] == [2, 2, 1]
    text = caplog.text
    for path in bad:
        assert str(path) in text
    assert "skipped 3 bad file(s)" in text
    # The cached result remembers what was left out, and says so again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepres.data"):
        again = load_dataset(_cfg(root, on_bad_image="skip", cache_dir=str(tmp_path / "c")))
    assert len(again.train) == 8 and str(bad[0]) in caplog.text
    # The same folder with on_bad_image=error is not served from the skip-mode cache.
    with pytest.raises(ValueError, match="x.txt"):
        load_dataset(_cfg(root, cache_dir=str(tmp_path / "c")))


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "f", n_train=2, n_test=1)
    (root / "train" / "dog").mkdir()
    (root / "test" / "dog").mkdir()
    (root / "test" / "dog" / "0.png").write_bytes(image_bytes(Image.fromarray(pattern(0, 0)), "PNG"))
    with pytest.raises(ValueError, match=f"class folder {root / 'train' / 'dog'} holds no images"):
        load_dataset(_cfg(root, on_bad_image="skip", cache_dir=str(tmp_path / "c")))


def test_split_classes_must_match_train(tmp_path):
    root = make_image_folder(tmp_path / "f", n_train=2, n_test=1)
    (root / "test" / "bee").rename(root / "test" / "wasp")
    with pytest.raises(ValueError, match=r"classes of .*test differ from .*train: only in train: \['bee'\]; "
                                         r"only in test: \['wasp'\]"):
        load_dataset(_cfg(root, cache_dir=str(tmp_path / "c")))


def test_missing_test_split_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "f", n_train=2, n_test=1)
    (root / "test").rename(root / "other")
    with pytest.raises(FileNotFoundError, match="no test/ or val/"):
        load_dataset(_cfg(root, cache_dir=str(tmp_path / "c")))


def test_images_of_another_size_are_an_error_unless_resized(tmp_path):
    root = make_image_folder(tmp_path / "f", n_train=2, n_test=1, size=8)
    odd = root / "train" / "cat" / "0001.png"
    odd.write_bytes(image_bytes(Image.fromarray(_rgb(10, 12)), "PNG"))
    with pytest.raises(ValueError, match=f"{odd} is 10x12 but .* is 8x8: every image must share a size"):
        load_dataset(_cfg(root, cache_dir=str(tmp_path / "c")))
    # The worker loader names the file too (it said "images of different sizes in one batch ([(3, 8, 8), ...])")
    from deepres.data import build_data

    workers = _cfg(root, loader="workers", num_workers=0, preset="none")
    with pytest.raises(ValueError, match=f"{odd} is 10x12 but .* is 8x8: every image must share a size"):
        build_data(workers, batch_size=4, eval_batch_size=4, seed=0)
    # One in the test split is found from its header before training, not by the test at the end of the run
    other = make_image_folder(tmp_path / "g", n_train=2, n_test=1, size=8)
    late = other / "test" / "cat" / "0000.png"
    late.write_bytes(image_bytes(Image.fromarray(_rgb(10, 12)), "PNG"))
    with pytest.raises(ValueError, match=f"{late} is 10x12 but the training images are 8x8"):
        build_data(_cfg(other, loader="workers", num_workers=0, preset="none"), batch_size=4, eval_batch_size=4,
                   seed=0)
    ds = load_dataset(_cfg(root, image_size=6, cache_dir=str(tmp_path / "c")))
    assert ds.train.images.shape == (6, 3, 6, 6)


def test_mixed_modes_in_one_folder(tmp_path):
    """Grayscale, CMYK, RGBA, palette and 16-bit files decode into one RGB split; all-gray folders stay 1 channel."""
    root = make_image_folder(tmp_path / "f", classes=("a", "b"), n_train=1, n_test=1, size=8)
    extra = root / "train" / "a"
    base = Image.fromarray(_rgb(8, 8))
    base.convert("L").save(extra / "gray.png")
    base.convert("CMYK").save(extra / "cmyk.jpg")
    base.convert("RGBA").save(extra / "rgba.png")
    base.convert("P").save(extra / "palette.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(extra / "deep.png")
    base.save(extra / "scan.tiff")  # torchvision ImageFolder's other extensions, and GIF
    base.convert("L").save(extra / "gray.pgm")
    base.convert("P").save(extra / "anim.gif")
    ds = load_dataset(_cfg(root, cache_dir=str(tmp_path / "c")))
    assert ds.train.images.shape == (10, 3, 8, 8)
    names = sorted(p.name for p in extra.iterdir())
    deep = ds.train.images[names.index("deep.png")]
    assert (deep == 255).all(), "16-bit white is 8-bit white, in every channel"

    gray_root = tmp_path / "g"
    for split in ("train", "test"):
        for cls in ("x", "y"):
            (gray_root / split / cls).mkdir(parents=True)
            Image.fromarray(pattern(0, 0)[..., 0]).save(gray_root / split / cls / "0.png")
    assert load_dataset(_cfg(gray_root, cache_dir=str(tmp_path / "c"))).channels == 1
    assert load_dataset(_cfg(gray_root, channels=3, cache_dir=str(tmp_path / "c"))).channels == 3
    assert load_dataset(_cfg(root, channels=1, cache_dir=str(tmp_path / "c"))).channels == 1


def test_hidden_files_are_ignored(tmp_path):
    root = make_image_folder(tmp_path / "f", n_train=2, n_test=1)
    (root / "train" / ".DS_Store").write_text("junk")
    (root / "train" / "ant" / ".thumbs").write_text("junk")
    assert len(load_dataset(_cfg(root, cache_dir=str(tmp_path / "c"))).train) == 6


def test_parallel_decoding_matches_serial(tmp_path, monkeypatch):
    from deepres.data import folders

    root = make_image_folder(tmp_path / "f", n_train=20, n_test=5, size=8)
    index = folders.scan_image_folder(root)
    serial = folders.decode_folder(index, workers=1)
    monkeypatch.setattr(folders, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(folders, "_CHUNK", 7)
    parallel = folders.decode_folder(index, workers=2)
    assert torch.equal(serial.train.images, parallel.train.images)
    assert torch.equal(serial.test.labels, parallel.test.labels)
