"""Transfer learning (PAPER.md section 7): start from trained weights, then either train only a new classifier on
the frozen network (feature extraction) or train everything, the pretrained layers at a lower rate (fine-tuning).

``model.init`` names the weights: one of our checkpoints (its EMA weights when it kept them), a torchvision state
dict file (``torch.save(torchvision.models.resnet18().state_dict(), path)``; names are shared, see
:mod:`deepres.models.resnet`), or ``pretrained``: the published weights of ``model.name`` (``deepres models
--pretrained``; the model is then built as they were trained, e.g. ResNet-50 with ``stride_on="3x3"``, unless the
config says otherwise). Loading is strict apart from two adaptations:

- the classifier (``model.init_head``): a new one when the class list differs (``auto``), so a 1000-class ImageNet
  net or a CIFAR-10 net moves to other classes;
- the input channels of the first convolution: 3 -> 1 sums the RGB filters, which computes exactly what the RGB net
  computes on a grey image repeated over three channels; 1 -> 3 spreads each filter equally, 1/3 per channel.

Feature extraction (``finetune.mode=feature_extraction``) freezes every parameter but the classifier's and holds
every frozen BN layer in eval mode, so its running mean and variance stay the pretrained ones: with a few labels,
batch statistics of the new data would otherwise shift the features the classifier is being fitted to.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..config import ConfigError

__all__ = ["checkpoint_weights", "classifier_parameters", "freeze_backbone", "load_fitted", "load_init",
           "read_weights"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase,)


def checkpoint_weights(checkpoint: dict) -> dict:
    """The weights of one of our checkpoints a model is used with: its EMA weights when the run kept them."""
    if checkpoint.get("ema") is not None:
        return {k[len("module."):]: v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
    return checkpoint["model"]


def read_weights(path: str | Path) -> tuple[dict, list[str] | None, str]:
    """(state dict, class names or None, kind) of one of our checkpoints ("checkpoint") or a state-dict file
    ("state_dict"; a dict under "state_dict" or "model" is unwrapped)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError("model.init", f"weights file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a config error naming it
        raise ConfigError("model.init", f"cannot read {path} as a PyTorch file: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("model.init", f"{path} does not hold a state dict")
    if "config" in data and isinstance(data.get("model"), dict):
        return checkpoint_weights(data), list(data.get("classes") or []) or None, "checkpoint"
    for key in ("state_dict", "model"):
        if isinstance(data.get(key), dict):
            data = data[key]
    if not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConfigError("model.init", f"{path} is neither one of our checkpoints nor a state dict of tensors")
    return data, None, "state_dict"


def _trained_model(path: str | Path) -> str | None:
    """The registered model a checkpoint of ours trained (None: a model given in Python, or unreadable)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return None if data.get("model_class") else str(data["config"]["model"]["name"])
    except Exception:  # noqa: BLE001 - only a hint: the error it joins names the misfit already
        return None


def _paper_bottleneck(model: nn.Module) -> bool:
    """A bottleneck ResNet (blocks that widen their output) with the paper's stride on the first 1x1."""
    return getattr(model, "stride_on", None) == "1x1" and getattr(getattr(model, "block", None), "expansion", 1) > 1


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of the layers that map features to classes: the classifier, and the auxiliary heads'
    last layers where a model has them (GoogLeNet's ``aux_classifiers()``)."""
    heads = [model.get_classifier(), *getattr(model, "aux_classifiers", list)()]
    names = {id(module): name for name, module in model.named_modules()}
    if id(heads[0]) not in names:
        raise ValueError("the model's classifier is not one of its modules")
    return tuple(names[id(head)] + "." for head in heads)


def _adapt_channels(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """A first-conv weight (O, Cs, k, k) for Ct input channels, or None when the shapes differ otherwise."""
    if source.dim() != 4 or source.shape[0] != target.shape[0] or source.shape[2:] != target.shape[2:]:
        return None
    cs, ct = source.shape[1], target.shape[1]
    if cs == 3 and ct == 1:
        return source.sum(dim=1, keepdim=True)
    if cs == 1 and ct == 3:
        return source.expand(-1, 3, -1, -1) / 3.0
    return None


def load_init(model: nn.Module, path: str | Path, classes: list[str] | None = None, head: str = "auto",
              weights: tuple[dict, list[str] | None, str, dict] | None = None) -> dict:
    """Load ``model.init`` weights into ``model`` (see the module doc); returns what was done.

    ``classes``: the data's class names (to compare with a checkpoint's). ``weights``: the weights already read, as
    (state dict, class names or None, kind, what to report), e.g. the published ones of ``model.init=pretrained``
    (:func:`deepres.models.pretrained.pretrained_weights`); None: read from ``path``. Raises ConfigError (key
    ``model.init``) naming the parameters that neither fit nor adapt.
    """
    if head not in ("auto", "keep", "new"):
        raise ConfigError("model.init_head", f"must be auto, keep or new; got {head!r}")
    if weights is None and str(path) == "pretrained":
        raise ConfigError("model.init", "pretrained: the published weights are read by the caller (weights=...)")
    state, source_classes, kind, extra = weights if weights is not None else (*read_weights(path), {})
    if kind == "state_dict" and _paper_bottleneck(model):
        warnings.warn(f"model.init={path}: torchvision trains its bottleneck ResNets with the stride on the 3x3 conv; "
                      "this model puts it on the 1x1 (the paper's): set model.stride_on=3x3 to match the weights",
                      stacklevel=2)
    own = model.state_dict()
    prefix = _classifier_prefixes(model)
    head_keys = [k for k in own if k.startswith(prefix)]
    fits = all(k in state and tuple(state[k].shape) == tuple(own[k].shape) for k in head_keys)
    if head == "auto":
        keep_head = fits and (source_classes is None or classes is None or source_classes == list(classes))
    elif head == "keep":
        if not fits:
            raise ConfigError("model.init_head", f"the classifier of {path} does not fit the model "
                                                 f"({len(classes or [])} classes); use auto or new")
        keep_head = True
    else:
        keep_head = False
    try:
        adapted = load_fitted(model, state, keep_head, str(path))
    except ValueError as exc:
        trained = _trained_model(path) if weights is None and kind == "checkpoint" else None
        hint = (f"; it holds the weights of model {trained}: set model.name={trained} (and the options it was "
                f"built with) to start from them" if trained and trained != getattr(model, "model_name", None) else "")
        raise ConfigError("model.init", str(exc) + hint) from None
    return {"init": str(path), "init_kind": kind, **extra, "init_head": "kept" if keep_head else "new",
            "init_adapted": adapted}


def load_fitted(model: nn.Module, state: dict, keep_head: bool, source: str) -> list[str]:
    """Load ``state`` into ``model``: every weight must fit, except the classifier (kept only when ``keep_head``, else
    the model's fresh one stays) and a first convolution of another channel count (adapted, see the module doc).
    Returns the adapted keys; raises ValueError naming what neither fits nor adapts."""
    own = model.state_dict()
    prefix = _classifier_prefixes(model)
    new_state, adapted, bad = {}, [], []
    for key, value in own.items():
        if key.startswith(prefix) and not keep_head:
            new_state[key] = value
            continue
        if key not in state:
            if key.endswith("num_batches_tracked"):  # files from before BN counted its batches (PyTorch allows it)
                new_state[key] = value
            else:
                bad.append(f"{key} missing")
            continue
        src = state[key]
        if tuple(src.shape) == tuple(value.shape):
            new_state[key] = src.to(value.dtype)
            continue
        fitted = _adapt_channels(src, value)
        if fitted is None:
            bad.append(f"{key} {tuple(src.shape)} vs {tuple(value.shape)}")
        else:
            new_state[key] = fitted.to(value.dtype)
            adapted.append(key)
    unexpected = sorted(k for k in state if k not in own and not k.startswith(prefix))
    bad += [f"{k} unexpected" for k in unexpected]
    if bad:
        name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(f"{source} does not fit model {name}: "
                         + ", ".join(bad[:6]) + (f" (and {len(bad) - 6} more)" if len(bad) > 6 else ""))
    model.load_state_dict(new_state)
    return adapted


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def _hold_eval(module: nn.Module, inputs) -> None:
    # Whatever model.train() set, a frozen BN normalises with (and never updates) its running statistics.
    module.training = False


def freeze_backbone(model: nn.Module) -> int:
    """Feature extraction: freeze every parameter outside the classifier and hold the frozen BN layers in eval
    mode; returns how many parameters were frozen."""
    head = {id(p) for p in classifier_parameters(model)}
    frozen = 0
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(False)
            frozen += p.numel()
    head_modules = set(map(id, model.get_classifier().modules()))
    for module in model.modules():
        if isinstance(module, _NORM_TYPES) and id(module) not in head_modules:
            module.eval()
            module.register_forward_pre_hook(_hold_eval)
    return frozen
