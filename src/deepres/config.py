"""Typed configuration: the one schema every run is described by.

A run is a :class:`Config` made of sections (``model``, ``data``, ``optim``, ``schedule``, ``train``, ``task``,
``finetune``). Recipes are YAML files with the same sections; ``--set section.key=value`` overrides are coerced to
the field's type. An unknown key or a value of the wrong type is a :class:`ConfigError` naming the key and what is
allowed. Defaults are the paper's CIFAR-10 recipe (PAPER.md section 5); each deviation is a named field.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "find_recipe",
    "from_dict",
    "load_config",
    "load_recipe",
    "recipe_dirs",
    "to_dict",
    "to_yaml",
]


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed. ``key`` names it (dotted)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


@dataclass
class ModelConfig:
    name: str = "resnet20"
    # None: taken from the data source (its class list and channel count).
    num_classes: int | None = None
    in_channels: int | None = None
    # None: the model's own default (the paper's: A for CIFAR nets, B for ImageNet nets).
    shortcut: Literal["A", "B", "C"] | None = None
    # None: the model's own default ("1x1", the paper; "3x3" is the v1.5 variant torchvision trains).
    stride_on: Literal["1x1", "3x3"] | None = None
    # The paper does not zero-initialise; Goyal et al. 2017 found it helps large-batch training.
    zero_init_residual: bool | None = None
    # Start from these weights (one of our checkpoints or a torchvision state-dict file); see deepres.tasks.transfer.
    init: str | None = None
    # The classifier when starting from model.init. auto: keep it when the checkpoint names the same classes (a
    # torchvision file: when its shape fits), else a new one; keep: always (must fit); new: always a fresh one.
    init_head: Literal["auto", "keep", "new"] = "auto"
    # Noise for Noisy Student (Xie et al. 2020); the paper uses neither. dropout: on the classifier's input in
    # training. stochastic_depth: drop probability of the last residual block's branch, rising linearly from 0
    # over the blocks (Huang et al. 2016).
    dropout: float = 0.0
    stochastic_depth: float = 0.0
    # Further keyword options passed to the model builder (family specific, e.g. growth_rate).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: Literal["cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder"] = "cifar10"
    # Where the data lives; None: $DEEPRES_DATA, then ./data.
    data_dir: str | None = None
    # Images carved from train, deterministically, for validation (5000: the paper's 45k/5k split).
    val_size: int = 5000
    # Use only the first N training images (after the validation split); None: all.
    train_subset: int | None = None
    # Use only the first N test images; None: all.
    test_subset: int | None = None
    preset: Literal["paper_cifar", "paper_imagenet", "none"] = "paper_cifar"
    # The paper subtracts the per-pixel mean; per-channel mean/std normalisation is the common alternative.
    normalize: Literal["pixel_mean", "channel"] = "pixel_mean"
    # Side length images are prepared at (image folders); None: the source's native size.
    image_size: int | None = None
    # error: a bad image file is an error naming it; skip: log it (logger "deepres.data") and leave it out.
    on_bad_image: Literal["error", "skip"] = "error"
    # Image folders: channels images are converted to; None: 1 when every image is grayscale, else 3 (RGB).
    channels: Literal[1, 3] | None = None
    # Where extracted archives and decoded image folders are cached; None: $DEEPRES_DATA/cache, else
    # $XDG_CACHE_HOME/deepres (~/.cache/deepres).
    cache_dir: str | None = None
    # device: the whole split on the training device; workers: DataLoader worker processes; auto: by size.
    loader: Literal["auto", "device", "workers"] = "auto"
    num_workers: int = 4
    # Augmentations beyond the paper (0 disables).
    randaugment_n: int = 0
    randaugment_m: int = 9
    cutmix_alpha: float = 0.0
    mixup_alpha: float = 0.0
    # Few labels: keep the first N training images of each class (after the validation split) labeled; the rest
    # form the unlabeled set pseudo-labeling and distillation use. None: every training image is labeled.
    labeled_per_class: int | None = None
    # Use only N unlabeled images (a fixed, seed-independent sample); None: all.
    unlabeled_subset: int | None = None
    # Test on the first N test images of each class (a balanced subset, also of class-sorted folders); None: all.
    test_per_class: int | None = None


@dataclass
class OptimConfig:
    name: Literal["sgd"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    # The paper decays every weight; False exempts BN parameters and biases (chosen by module type).
    decay_norm_and_bias: bool = True
    # Clip the global gradient norm to this value; None: no clipping (the paper does not clip).
    grad_clip: float | None = None


@dataclass
class ScheduleConfig:
    name: Literal["multistep", "cosine", "onecycle", "constant"] = "multistep"
    # Iterations at which the learning rate is multiplied by gamma (paper CIFAR: 32k and 48k).
    milestones: list[int] = field(default_factory=lambda: [32000, 48000])
    gamma: float = 0.1
    # Linear warmup from warmup_lr to lr over this many iterations (0: none).
    warmup_iterations: int = 0
    warmup_lr: float = 0.01
    # Paper, ResNet-110/1202: hold warmup_lr until training error falls below this (percent), then lr.
    warmup_until_train_error: float | None = None
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    iterations: int = 64000
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    eval_every: int = 2000
    # Also log test error every this many iterations, for curves like the paper's figures (0: only at the end).
    # It never influences training or the choice of best.pt.
    test_every: int = 0
    checkpoint_every: int = 2000
    log_every: int = 100
    device: str = "auto"
    # auto: bf16 autocast on GPU, off on CPU.
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    # Exponential moving average of the weights; None: off.
    ema_decay: float | None = None
    # Deterministic algorithms (bit-exact resume on CPU).
    deterministic: bool = False


@dataclass
class TaskConfig:
    # classification: cross-entropy; distillation: Hinton et al. 2015; pseudo_label: a teacher labels the
    # unlabeled set (data.labeled_per_class) and the model trains on both (deepres.tasks).
    name: Literal["classification", "distillation", "pseudo_label"] = "classification"
    label_smoothing: float = 0.0
    # distillation and pseudo_label: the teacher, one of our checkpoints.
    teacher: str | None = None
    # distillation: softmax temperature T and the weight alpha of the T^2-scaled KL term against (1 - alpha) x the
    # cross-entropy with the labels; alpha=1 is the labels-free mode (KL only).
    temperature: float = 4.0
    alpha: float = 0.9
    # pseudo_label: hard (the teacher's top class) or soft (its softmax) labels, kept where the teacher's top
    # probability is at least threshold.
    pseudo_labels: Literal["hard", "soft"] = "hard"
    threshold: float = 0.0


@dataclass
class FinetuneConfig:
    # full: every layer trains. feature_extraction: only the classifier trains; the backbone's weights are frozen
    # and its BN layers stay in eval mode, so their running statistics are frozen too (PAPER.md section 7).
    mode: Literal["full", "feature_extraction"] = "full"
    # Learning rate of every layer but the classifier, as a multiple of the schedule's (fine-tuning: low, e.g. 0.1).
    backbone_lr_scale: float = 1.0


@dataclass
class Config:
    # Run name; the run folder is runs/<name> unless --run-dir says otherwise.
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# ---------------------------------------------------------------------------------------------------------------
# Type handling


def _describe(tp: Any) -> str:
    """A short human description of an annotation, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        tail = " or null" if type(None) in args else ""
        return " or ".join(parts) + tail
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a section with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


def _coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError. ``from_text``: value came from the command line."""
    origin = typing.get_origin(tp)
    bad = ConfigError(key, f"{value!r} is not allowed; expected {_describe(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (from_text and isinstance(value, str) and value.strip().lower() in _NULL):
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, from_text)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        if from_text and isinstance(value, str):
            for a in allowed:
                if str(a) == value.strip():
                    return a
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v for v in (p.strip() for p in text.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, inner, from_text or isinstance(v, str)) for i, v in enumerate(value)]
    if origin is dict:
        if from_text and isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_text and isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if number.is_integer():
                return int(number)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, name: str, cls: type) -> ConfigError:
    allowed = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    prefix = f"{key}." if key else ""
    return ConfigError(f"{prefix}{name}", f"unknown key{hint}; allowed keys: {', '.join(allowed)}")


def _build(cls: type, data: Any, key: str, from_text: bool = False) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(key or "<root>", f"expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown(key, str(name), cls)
        sub = f"{key}.{name}" if key else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, sub, from_text)
        else:
            kwargs[name] = _coerce(sub, value, tp, from_text)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a nested mapping (a parsed recipe), validating every key and value."""
    return _build(Config, data, "")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    """The resolved config as YAML; ``load_config`` reads it back to an equal Config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings, each coerced to the field's type. Returns a new Config."""
    config = dataclasses.replace(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override is written key=value, e.g. optim.lr=0.05")
        dotted, text = item.split("=", 1)
        dotted = dotted.strip()
        parts = dotted.split(".")
        target: Any = config
        owner_key = ""
        # Walk down to the dataclass that owns the last part, copying sections so the input is untouched.
        for depth, part in enumerate(parts[:-1]):
            cls = type(target)
            if part not in {f.name for f in dataclasses.fields(cls)}:
                raise _unknown(owner_key, part, cls)
            child = getattr(target, part)
            owner_key = ".".join(parts[: depth + 1])
            if isinstance(child, dict):  # free-form options mapping: model.options.key=value
                child = dict(child)
                setattr(target, part, child)
                child[".".join(parts[depth + 1 :])] = yaml.safe_load(text) if text.strip() else None
                target = None
                break
            if not dataclasses.is_dataclass(child):
                raise ConfigError(owner_key, f"is not a section; set it as {owner_key}=VALUE")
            child = dataclasses.replace(child)
            setattr(target, part, child)
            target = child
        if target is None:
            continue
        cls = type(target)
        last = parts[-1]
        if last not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown(owner_key, last, cls)
        tp = _hints(cls)[last]
        if dataclasses.is_dataclass(tp):
            raise ConfigError(dotted, f"is a section; set one of its keys: {_describe(tp)}")
        setattr(target, last, _coerce(dotted, text, tp, from_text=True))
    return config


# ---------------------------------------------------------------------------------------------------------------
# Recipes


def recipe_dirs() -> list[Path]:
    """Folders searched for recipes by name: $DEEPRES_RECIPES (os.pathsep separated), then the project's recipes/."""
    dirs = [Path(p) for p in os.environ.get("DEEPRES_RECIPES", "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parents[2] / "recipes")
    return dirs


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """Resolve a recipe given as a path, or by name (``demo``, ``paper/cifar10_resnet20``, ``cifar10_resnet20``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return path
    name = str(name_or_path)
    known: list[str] = []
    for root in recipe_dirs():
        if not root.is_dir():
            continue
        for candidate in sorted(root.rglob("*.yaml")):
            rel = candidate.relative_to(root).with_suffix("").as_posix()
            known.append(rel)
            if rel == name or candidate.stem == name:
                return candidate
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known recipes: {', '.join(sorted(set(known)))}"
    raise FileNotFoundError(f"unknown recipe '{name}'{hint}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_recipe(name_or_path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe into a nested mapping, following ``extends: OTHER`` (relative path or recipe name)."""
    path = find_recipe(name_or_path)
    if path.resolve() in _seen:
        raise ConfigError("extends", f"recipe {path} extends itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("<recipe>", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("<recipe>", f"{path} must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is not None:
        local = path.parent / f"{parent}.yaml"
        base = load_recipe(local if local.is_file() else parent, _seen + (path.resolve(),))
        data = _merge(base, data)
    return data


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """The resolved Config of a recipe (or the defaults) with ``key=value`` overrides applied."""
    config = from_dict(load_recipe(recipe)) if recipe is not None else Config()
    return apply_overrides(config, list(overrides or []))
