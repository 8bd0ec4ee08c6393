"""Run folders: their paths, checkpoint read/write, and the model a run or checkpoint describes.

A run folder (``runs/<name>/``) holds ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``tensorboard/`` and
``checkpoints/{last,best}.pt``. Checkpoints are plain dicts of tensors and numbers, written atomically and read
with ``weights_only=True``. Everything here sits below the training loop, the tasks and the experiments, which all
read runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .config import ConfigError, from_dict
from .data import Normalizer
from .models import create_model
from .models.noise import add_noise
from .models.transfer import checkpoint_weights

__all__ = [
    "FORMAT",
    "CheckpointError",
    "RunFolderBusy",
    "RunLock",
    "RunPaths",
    "build_model",
    "check_teacher",
    "data_fingerprint",
    "load_checkpoint",
    "load_for_inference",
    "load_teacher",
    "atomic_write",
    "read_safetensors",
    "save_checkpoint",
    "write_safetensors",
]

FORMAT = "deepres-checkpoint-v1"


class CheckpointError(ValueError):
    """A file is not a readable deepres checkpoint (or is corrupted)."""


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder."""


# The files of a run, besides its checkpoints; a folder that holds any of them holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


@dataclass
class RunPaths:
    root: Path
    checkpoints: Path = field(init=False)
    last: Path = field(init=False)
    best: Path = field(init=False)

    def __post_init__(self):
        self.root = Path(self.root)
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"

    def run_files(self) -> list[str]:
        """The files of an earlier run in this folder (its checkpoints and logs), by name."""
        found = [name for name in RUN_FILES if (self.root / name).exists()]
        return found + [f"checkpoints/{p.name}" for p in (self.last, self.best) if p.exists()]

    def remove_partial_writes(self) -> None:
        """Temporary files a crash left in the middle of writing a checkpoint (the checkpoints themselves are whole:
        they are renamed into place)."""
        if self.checkpoints.is_dir():
            for tmp in self.checkpoints.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


class RunLock:
    """A run folder belongs to one run: an exclusive lock on ``<run>/.lock`` (``flock``), held for the run's life and
    released by the system when the process ends, however it ends; the file names the holder's pid."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(f"{self.path.parent} is in use by another run (pid {holder}): wait for it to end, or "
                                f"choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_failure(path: Path, exc: BaseException) -> OSError:
    """One clear error naming the file and the cause, for a write that failed (a full disk, a read-only folder, no
    permission), including the C++ errors torch.save raises without a path."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return OSError(exc.errno, f"cannot write {path}: {os.strerror(exc.errno)}", str(path))
    try:
        if shutil.disk_usage(path.parent).free < 1 << 20:
            return OSError(errno.ENOSPC, f"cannot write {path}: {os.strerror(errno.ENOSPC)}", str(path))
    except OSError:
        pass
    return OSError(errno.EIO, f"cannot write {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                   str(path))


def atomic_write(path: str | os.PathLike, write) -> Path:
    """``write(file)`` into a temporary file beside ``path``, fsync it, then rename over ``path``, with the mode the
    user's umask gives new files. A crash or a failed write leaves the old file (or none), never a torn one, and no
    temporary file; a failure is an OSError naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_failure(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise _write_failure(path, exc) from None
        raise
    return path


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` atomically (:func:`atomic_write`): a crash at any point leaves either the old file or the new
    one, never a torn file."""
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint read with ``weights_only=True`` after its zip records' CRCs are verified: a file with flipped
    bytes is an error naming it, never weights that load silently wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: not a complete PyTorch file ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: record {bad} fails its CRC check")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deepres checkpoint (format {FORMAT})")
    return state


def build_model(cfg, num_classes: int, in_channels: int) -> nn.Module:
    """The model of a ModelConfig; class count and channels default to the data's. ``model.init`` is not loaded
    here (the loop loads it into a fresh run only); dropout and stochastic depth are added (training-only hooks)."""
    options = dict(cfg.options)
    if cfg.init == "pretrained":  # built as the published weights were trained (the config's own choices win)
        from .models.pretrained import PRETRAINED

        options = {**PRETRAINED.get(cfg.name, {}), **options}
    options["num_classes"] = cfg.num_classes or num_classes
    options["in_channels"] = cfg.in_channels or in_channels
    for key in ("shortcut", "stride_on", "zero_init_residual"):
        value = getattr(cfg, key)
        if value is not None:
            options[key] = value
    return add_noise(create_model(cfg.name, **options), cfg.dropout, cfg.stochastic_depth)


def check_model(cfg) -> None:
    """Build a ModelConfig's model on the meta device (no memory, no arithmetic: milliseconds) so that an unknown
    name or an option its builder refuses is a ConfigError before any data is read or downloaded. Class count and
    channels the config leaves to the data are placeholders here."""
    from .models import list_models
    from .models.pretrained import PRETRAINED

    if cfg.init == "pretrained" and cfg.name not in PRETRAINED:
        raise ConfigError("model.init", f"model {cfg.name} has no pretrained weights (deepres models --pretrained "
                                        f"lists those that have)")
    try:
        with torch.device("meta"):
            build_model(cfg, 10, 3)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        foreign = _options_not_taken(cfg) if cfg.name in list_models() else []
        if foreign:  # a recipe's ResNet choice (imagefolder_fast: stride_on 3x3) under another family's model
            values = ", ".join(f"{key}={_yaml_value(getattr(cfg, key))}" for key in foreign)
            raise ConfigError(", ".join(f"model.{key}" for key in foreign),
                              f"model '{cfg.name}' takes no {' or '.join(foreign)} (this config sets {values}, for "
                              f"the model it was written for): unset with "
                              + " ".join(f"--set model.{key}=null" for key in foreign)) from None
        raise ConfigError("model.name" if cfg.name not in list_models() else "model.options", str(exc)) from None
    except Exception:  # noqa: BLE001 - a builder that needs real tensors: the build after the data says what fails
        pass


def _yaml_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _options_not_taken(cfg) -> list[str]:
    """The set ones of model.shortcut, stride_on and zero_init_residual that model ``cfg.name`` has no option for."""
    foreign = []
    for key in ("shortcut", "stride_on", "zero_init_residual"):
        value = getattr(cfg, key)
        if value is None:
            continue
        try:
            with torch.device("meta"):
                create_model(cfg.name, **{key: value})
        except TypeError as exc:
            if f"'{key}'" in str(exc):
                foreign.append(key)
        except Exception:  # noqa: BLE001 - another failure is not this option's
            pass
    return foreign


def load_for_inference(checkpoint: dict, device: torch.device | str = "cpu", model: nn.Module | None = None
                       ) -> tuple[nn.Module, Normalizer, object]:
    """The model of a checkpoint in eval mode (EMA weights when the run kept them), its normalizer and config.
    ``model``: the network to load the weights into (its own are replaced), needed for a run that trained a model
    given in Python (``deepres.train(model=...)``; the checkpoint names its class); default: ``config.model`` built."""
    config = from_dict(checkpoint["config"])
    if model is None:
        if checkpoint.get("model_class"):
            raise ValueError(f"this checkpoint holds the weights of your own model ({checkpoint['model_class']}), "
                             f"not of a registered one: build that model and pass it, e.g. "
                             f"deepres.load_model(checkpoint, model=net) (predict, evaluate and export take model= "
                             f"too)")
        model = build_model(config.model, len(checkpoint["classes"]), int(checkpoint["in_channels"]))
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model: an nn.Module to load the checkpoint's weights into; got {type(model).__name__}")
    try:
        model.load_state_dict(checkpoint_weights(checkpoint))
    except RuntimeError as exc:
        saved = checkpoint.get("model_class") or config.model.name
        raise ValueError(f"the checkpoint's weights (of {saved}) do not fit the given model "
                         f"({type(model).__module__}.{type(model).__qualname__}): {exc}") from None
    return model.to(device).eval(), Normalizer.from_state_dict(checkpoint["normalization"]), config


def check_teacher(path: str | Path | None, key: str = "task.teacher") -> None:
    """A ConfigError unless ``path`` names an existing file (checked before any data is read)."""
    if not path:
        raise ConfigError(key, "this task needs a teacher checkpoint, e.g. "
                               "--set task.teacher=runs/teacher/checkpoints/last.pt")
    if not Path(path).is_file():
        raise ConfigError(key, f"teacher checkpoint not found: {path}")


def load_teacher(path: str | Path | None, classes: list[str], device: torch.device, key: str = "task.teacher"):
    """(model, normalizer) of a checkpoint: eval mode, parameters frozen, on ``device``; its classes must be ours."""
    check_teacher(path, key)
    ckpt = load_checkpoint(path)
    if list(ckpt["classes"]) != list(classes):
        raise ConfigError(key, f"the teacher {path} was trained on classes {ckpt['classes'][:5]}..., the data has "
                               f"{classes[:5]}...")
    model, normalizer, _ = load_for_inference(ckpt, device)
    model.requires_grad_(False)
    return model.eval(), normalizer


def data_fingerprint(dataset) -> str:
    """A short hash of what the run trains on: source, class list, split sizes, labels and a sample of pixels."""
    h = hashlib.sha1()
    h.update(json.dumps([dataset.name, dataset.classes]).encode())
    for split in (dataset.train, dataset.val, dataset.test):
        if split is None:
            continue
        h.update(split.labels.numpy().tobytes())
        images = getattr(split, "images", None)
        if images is not None:  # in memory: shape and a sample of pixels
            h.update(str(tuple(images.shape)).encode())
            h.update(images[:: max(1, len(split) // 64)].numpy().tobytes())
        else:  # an image folder read by workers: its file list
            h.update("\n".join(split.paths).encode())
    return h.hexdigest()[:16]


# safetensors (https://github.com/huggingface/safetensors, the format's specification): an 8-byte little-endian header
# length, a JSON header (each tensor's dtype, shape and byte range; string metadata under "__metadata__"), then the
# tensors' bytes. Written and read here so that exporting needs no extra package.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (name -> tensor) and string ``metadata`` as a safetensors file, atomically."""
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"safetensors: tensor {name} has dtype {t.dtype}, which the format does not hold")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # 0-d tensors too
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset,
                                                                                          offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)

    return atomic_write(path, write)


def read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    metadata = header.pop("__metadata__", {})
    body = memoryview(data)[8 + size:]
    tensors = {}
    for name, spec in header.items():
        start, end = spec["data_offsets"]
        raw = torch.frombuffer(bytearray(body[start:end]), dtype=torch.uint8) if end > start else \
            torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.view(names[spec["dtype"]]).reshape(spec["shape"])
    return tensors, metadata
