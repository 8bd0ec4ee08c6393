"""Decoding one image file to a uint8 (C, H, W) tensor, with every colour mode brought to 1 or 3 channels.

JPEG goes through torchvision's libjpeg-turbo decoder (measured on 2 CPU cores: 0.05 ms vs PIL's 0.19 ms for a
32x32 CIFAR JPEG, 3.0 ms vs 3.6 ms for a 500x375 one); everything else, and any JPEG it cannot take (CMYK, unusual
encodings, damaged files, so that PIL names the problem), goes through PIL.
Conversions, all explicit:

- grayscale (``1``, ``L``) stays one channel; RGB-like modes (``RGB``, ``YCbCr``, ``CMYK``, ``LAB``, ``HSV``) become
  RGB;
- palette (``P``, ``PA``) is expanded through its palette, with transparency when it has any;
- alpha (``RGBA``, ``LA``, palette transparency) is composited over a white background (``ALPHA_BACKGROUND``), so
  transparent pixels become white rather than whatever colour the encoder left under them;
- 16-bit (``I;16*``, and ``I`` holding 16-bit values) is scaled to 8 bits by rounding ``v * 255 / 65535``, the full
  range preserved (never clipped at 255).

A file that cannot be decoded (truncated, empty, not an image) raises :class:`BadImageError` naming it, and so does
one whose header announces more than ``max_image_pixels`` pixels (``data.max_image_pixels``; default Pillow's 89.5
Mpx), checked before anything is decoded, for every format: a decompression bomb is a bad image like any other, which
``data.on_bad_image=skip`` skips. Training, evaluation and ``deepres predict`` all decode through here.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "BadImageError",
    "decode_image_bytes",
    "file_image_size",
    "image_pixels",
    "read_image",
    "resize_square",
    "set_max_image_pixels",
    "to_channels",
]

# torchvision ImageFolder's extensions, and GIF (its first frame)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
# Alpha is composited over white (255); change here to composite over another grey level.
ALPHA_BACKGROUND = 255
# The most pixels an image may have (Pillow's own limit, 89.5 Mpx); set_max_image_pixels changes it for this
# process (build_data sets data.max_image_pixels).
MAX_IMAGE_PIXELS = 89_478_485
_max_pixels = MAX_IMAGE_PIXELS


def set_max_image_pixels(limit: int) -> None:
    """The pixel limit :func:`decode_image_bytes` checks in this process (and the worker processes it forks)."""
    global _max_pixels
    if limit < 1:
        raise ValueError(f"data.max_image_pixels must be at least 1; got {limit}")
    _max_pixels = int(limit)


def image_pixels(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, without decoding it; None when PIL cannot read the header
    (the decode then names the problem)."""
    return _header_size(io.BytesIO(data))


def file_image_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) of an image file from its header alone (nothing decoded, the file not read whole); None when
    PIL cannot read the header (the loader then names the file)."""
    size = _header_size(path)
    return None if size is None else (size[1], size[0])


def _header_size(source) -> tuple[int, int] | None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read here; our own limit is checked on its size
    try:
        with Image.open(source) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any unreadable header is left to the decoder
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit

# torchvision 0.29 marks its decoders deprecated in favour of torchcodec (not installed); they remain the fastest
# decoder we have, the warning is silenced per call, and the PIL path takes over if they are ever removed.
_TV_WARNING = "The image decoding and encoding capabilities of TorchVision"

_tvio = None  # torchvision.io, imported on first use (it is slow to import)
_jpeg_op = None


def _torchvision_io():
    global _tvio, _jpeg_op
    if _tvio is None:
        try:
            import torchvision.io as tvio
        except ImportError:  # pragma: no cover
            _tvio = False
            return _tvio
        _tvio = tvio
        # The registered op itself skips the Python wrapper's per-call deprecation warning (a third of the time on
        # 32x32 images); the wrapper is the fallback.
        _jpeg_op = getattr(getattr(torch.ops, "image", None), "decode_jpeg", None)
    return _tvio


def _tv_decode_jpeg(data: torch.Tensor) -> torch.Tensor:
    tvio = _torchvision_io()
    unchanged = tvio.ImageReadMode.UNCHANGED
    if _jpeg_op is not None:
        try:
            return _jpeg_op(data, unchanged.value, False)
        except (TypeError, AttributeError):  # pragma: no cover - another op signature
            pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_WARNING)
        return tvio.decode_jpeg(data, mode=unchanged)


_JPEG_MAGIC = b"\xff\xd8\xff"
_RGB_LIKE = {"RGB", "YCbCr", "CMYK", "LAB", "HSV", "RGBX"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class BadImageError(ValueError):
    """An image file that cannot be decoded; ``path`` names it."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image {path}: {reason}")

    def __reduce__(self):  # rebuilt whole from a loader worker's process (the default would pass only the message)
        return type(self), (self.path, self.reason)


def _composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite uint8 ``color`` (H, W[, C]) over ALPHA_BACKGROUND with uint8 ``alpha`` (H, W)."""
    a = alpha.astype(np.uint32)
    if color.ndim == 3:
        a = a[..., None]
    out = (color.astype(np.uint32) * a + ALPHA_BACKGROUND * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _scale16(values: np.ndarray, path) -> np.ndarray:
    """16-bit values (0..65535) to 8 bits, rounding v * 255 / 65535 (65535 -> 255, 257 * k -> k)."""
    v = values.astype(np.int64)
    if v.size and (v.min() < 0 or v.max() > 65535):
        raise BadImageError(path, f"integer pixel values {v.min()}..{v.max()} are outside the 16-bit range")
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _decode_pil(data: bytes, path) -> np.ndarray:
    """PIL decode to uint8 (H, W) grayscale or (H, W, 3) RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            if mode == "P" or mode == "PA":
                im = im.convert("RGBA") if (mode == "PA" or "transparency" in im.info) else im.convert("RGB")
                mode = im.mode
            if mode in ("1", "L"):
                return np.asarray(im.convert("L"))
            if mode in _SIXTEEN_BIT:
                return _scale16(np.asarray(im), path)
            if mode in ("LA", "La"):
                arr = np.asarray(im.convert("LA"))
                return _composite(arr[..., 0], arr[..., 1])
            if mode in ("RGBA", "RGBa"):
                arr = np.asarray(im.convert("RGBA"))
                return _composite(arr[..., :3], arr[..., 3])
            if mode in _RGB_LIKE:
                return np.asarray(im.convert("RGB"))
            raise BadImageError(path, f"unsupported image mode {mode!r}")
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:  # a header the size check could not read, caught by Pillow's own
        raise BadImageError(path, f"too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(path, f"truncated or corrupt image data ({exc or type(exc).__name__})") from None


def decode_image_bytes(data: bytes, path="<bytes>") -> torch.Tensor:
    """Decode an encoded image to uint8 (C, H, W), C = 1 for grayscale sources, 3 otherwise (see module doc)."""
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    size = image_pixels(data)
    if size is not None and size[0] * size[1] > _max_pixels:
        raise BadImageError(path, f"{size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, more than "
                                  f"data.max_image_pixels={_max_pixels:,} (decoding it would take "
                                  f"{size[0] * size[1] * 3 / 2**30:.1f} GiB)")
    if data[:3] == _JPEG_MAGIC and _torchvision_io():
        try:
            t = _tv_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError:
            t = None  # truncated or unusual: PIL decides, and names the problem
        if t is not None and t.shape[0] in (1, 3):
            return t
    arr = _decode_pil(data, path)
    t = torch.from_numpy(np.array(arr, copy=True))
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def read_image(path: str | Path) -> torch.Tensor:
    """Read and decode one image file (see :func:`decode_image_bytes`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadImageError(path, str(exc)) from None
    return decode_image_bytes(data, path)


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) or (N, C, H, W) with C in {1, 3} to ``channels``: gray -> RGB repeats; RGB -> gray is ITU-R
    601-2 luma (PIL's ``convert("L")``)."""
    c = image.shape[-3]
    if c == channels:
        return image
    if c == 1 and channels == 3:
        return image.expand(*image.shape[:-3], 3, *image.shape[-2:]).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([299, 587, 114], dtype=torch.int32).view(3, 1, 1)
        luma = (image.to(torch.int32) * w).sum(dim=-3, keepdim=True)
        return ((luma + 500) // 1000).to(torch.uint8)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and take the centre ``size`` x ``size`` square:
    the aspect ratio is kept and the borders of the longer side are cut."""
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    if min(h, w) != size:
        image = TF.resize(image, [size], antialias=True)
    return TF.center_crop(image, [size, size])
