"""The model registry: every model is a builder function registered once under its name."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

__all__ = ["ModelEntry", "create_model", "list_models", "model_entry", "register_model"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    family: str
    # Native input (height, width): what the model was designed for and its multiply-adds are quoted at.
    input_size: tuple[int, int]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(*, family: str, input_size: tuple[int, int] = (224, 224)):
    """Decorator registering a builder under its function name. A name may be registered only once."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model name '{name}' is already registered (by {_REGISTRY[name].builder.__module__})")
        _REGISTRY[name] = ModelEntry(name, fn, family, tuple(input_size))
        return fn

    return wrap


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model '{name}'{hint} (deepres models lists them all)") from None


def create_model(name: str, **options) -> nn.Module:
    """Build a registered model. ``options`` go to its builder (num_classes, in_channels, shortcut, ...)."""
    entry = model_entry(name)
    try:
        model = entry.builder(**options)
    except TypeError as exc:
        raise TypeError(f"model '{name}': {exc}") from None
    model.model_name = name
    model.input_size = entry.input_size
    return model


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered names matching a shell-style pattern (and family), sorted naturally (resnet18 before resnet101)."""
    names = [n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family)]
    return sorted(names, key=_natural_key)


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
