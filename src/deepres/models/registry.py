"""The model registry: every model is a builder function registered once under its name."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable, Sequence

import torch.nn as nn

from .features import feature_extractor, feature_info

__all__ = ["ClassifierHead", "ModelEntry", "create_model", "list_models", "model_entry", "register_model"]


class ClassifierHead:
    """timm's ``num_classes`` attribute for a model with ``get_classifier()`` and ``reset_classifier(n)``: the logits
    layer's outputs, 0 once the classifier is removed (pooled features come out), following every reset."""

    @property
    def num_classes(self) -> int:
        head = self.get_classifier()
        return head.out_features if isinstance(head, nn.Linear) else 0


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


def create_model(name: str, pretrained: bool = False, *, num_classes: int | None = None,
                 in_chans: int | None = None, drop_rate: float | None = None, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, **options) -> nn.Module:
    """Build a registered model. ``options`` go to its builder (``num_classes``, ``in_channels``, ``shortcut``, ...).

    timm's names work too: ``in_chans`` for ``in_channels``, ``drop_rate`` for dropout on the classifier's input (in
    training). ``pretrained=True`` loads published weights (:mod:`deepres.models.pretrained`): the model is built as
    they were trained, a ``num_classes`` other than theirs gets a fresh classifier, ``in_chans=1`` adapts the first
    convolution. Models with weights carry ``pretrained_cfg``.

    ``features_only=True`` returns the stem and stage feature maps ``out_indices`` (default: all) as a list, with
    ``feature_info`` describing them (:mod:`deepres.models.features`); weights load into the full model first.
    """
    from .pretrained import PRETRAINED, load_pretrained, pretrained_cfg

    entry = model_entry(name)
    if out_indices is not None and not features_only:
        raise ValueError(f"model '{name}': out_indices={out_indices!r} needs features_only=True")
    if features_only and drop_rate:
        raise ValueError(f"model '{name}': drop_rate acts on the classifier's input, which features_only removes")
    if in_chans is not None:
        if options.get("in_channels", in_chans) != in_chans:
            raise ValueError(f"model '{name}': in_chans={in_chans} and in_channels={options['in_channels']} disagree")
        options["in_channels"] = in_chans
    if num_classes is not None:
        options["num_classes"] = num_classes
    if pretrained:
        if name not in PRETRAINED:
            raise ValueError(f"no pretrained weights for '{name}'; models with weights: {', '.join(PRETRAINED)} "
                             f"(deepres models --pretrained)")
        for key, value in PRETRAINED[name].items():
            if options.get(key, value) != value:
                raise ValueError(f"model '{name}' with pretrained=True: option {key}={options[key]!r} contradicts "
                                 f"the weights, which were trained with {key}={value!r}")
            options[key] = value
    try:
        model = entry.builder(**options)
    except TypeError as exc:
        raise TypeError(f"model '{name}': {exc}") from None
    model.model_name = name
    model.input_size = entry.input_size
    if name in PRETRAINED:
        model.pretrained_cfg = pretrained_cfg(name)
    if features_only:
        feature_info(model, out_indices)  # an unsupported model or a bad index fails before any download
    if pretrained:
        load_pretrained(model, name, options.get("num_classes", model.pretrained_cfg["num_classes"]))
    if features_only:
        return feature_extractor(model, out_indices)
    if drop_rate:
        from .noise import add_noise

        add_noise(model, dropout=drop_rate)
    return model


def list_models(pattern: str | Sequence[str] = "*", family: str | None = None, pretrained: bool = False,
                exclude_filters: str | Sequence[str] = ()) -> list[str]:
    """Registered names matching a shell-style pattern (or any of several; empty: all), sorted naturally (resnet18
    before resnet101). As timm's: ``pretrained=True`` keeps the models with published weights, ``exclude_filters``
    drops the names matching its patterns; ``family`` keeps one family ("resnet", "vgg", ...)."""
    from .pretrained import PRETRAINED

    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    patterns = [p for p in patterns if p] or ["*"]
    excluded = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    names = [n for n, e in _REGISTRY.items()
             if any(fnmatch.fnmatch(n, p) for p in patterns) and not any(fnmatch.fnmatch(n, p) for p in excluded)
             and (family is None or e.family == family) and (not pretrained or n in PRETRAINED)]
    return sorted(names, key=_natural_key)


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
