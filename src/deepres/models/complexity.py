"""Parameters and multiply-adds, the two columns of the paper's tables ("FLOPs" there are multiply-adds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["count_macs", "count_parameters", "describe_model", "describe_models", "models_table", "write_models_table"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    per_output = (module.in_channels // module.groups) * kh * kw
    return output.numel() * per_output


def _counted_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that count themselves (a ``macs`` method) and leaves outside them, each once.

    A module with ``macs`` accounts for everything inside it, so its children are not visited (a deformable
    convolution counts the conv that predicts its offsets).
    """
    counted, seen, stack = [], set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        children = list(module.children())
        if callable(getattr(module, "macs", None)) or not children:
            counted.append(module)
        else:
            stack.extend(children)
    return counted


def count_macs(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass per image at ``input_size`` (C, H, W), counting convolutions and linear layers.

    Runs one forward pass on a zero input on the model's device. Modules may define ``macs(output)`` to count
    themselves and everything inside them (e.g. deformable convolutions).
    """
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        counter = getattr(module, "macs", None)
        if callable(counter):
            total += counter(output)
        elif isinstance(module, nn.Conv2d):
            total += _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            total += output.numel() // output.shape[-1] * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in _counted_modules(model)]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(batch_size, *input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // batch_size


def describe_model(name: str, **options) -> dict:
    """Parameters, multiply-adds at the native input size, shortcut option and input size of a registered model.

    The model is built on the meta device: shapes without storage or arithmetic, so the whole zoo (VGG's 140M
    parameters, EfficientNet-B7 at 600x600) is described in seconds. Parameters and multiply-adds depend on shapes only.
    """
    from .registry import create_model, model_entry

    with torch.device("meta"):
        model = create_model(name, **options)
    in_channels = options.get("in_channels", 3)
    input_size = (in_channels, *model.input_size)
    return {
        "name": name,
        "params": count_parameters(model),
        "macs": count_macs(model, input_size),
        "shortcut": getattr(model, "shortcut", "-") or "none",
        "input_size": list(input_size),
        "family": model_entry(name).family,
    }


# The zoo's descriptions, computed once and shipped with the package (``deepres models`` answers from it at once);
# tests/test_zoo.py checks it against describe_model and says how to rewrite it after a change.
TABLE = Path(__file__).with_name("table.json")


def models_table() -> dict[str, dict]:
    """name -> describe_model(name) for the shipped zoo (empty when the table is missing)."""
    try:
        return {row["name"]: row for row in json.loads(TABLE.read_text())}
    except (OSError, ValueError):
        return {}


def describe_models(names: list[str]) -> list[dict]:
    """describe_model of each name, from the shipped table where it has the name."""
    table = models_table()
    return [table.get(name) or describe_model(name) for name in names]


def write_models_table() -> Path:
    """Recompute the shipped table (after a model's architecture changed)."""
    from .registry import list_models

    TABLE.write_text(json.dumps([describe_model(name) for name in list_models()], indent=1) + "\n")
    return TABLE
