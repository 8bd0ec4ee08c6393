"""Model noise for Noisy Student (Xie et al. 2020): dropout before the classifier and stochastic depth.

Both are added to a built model as forward hooks, so the parameter names, the state dict and inference are
unchanged, and they act only in training mode:

- dropout: on the classifier's input (``model.get_classifier()``), as Noisy Student's final-layer dropout.
- stochastic depth (Huang et al. 2016): every residual block's branch (its output up to ``last_bn``, just before the
  addition) is dropped per sample with a probability rising linearly from ``p/L`` at the first block to ``p`` at
  the last; kept branches are scaled by 1/(1 - p) so that evaluation needs no change (``torchvision.ops``' "row" form).
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth as _stochastic_depth

from ..config import ConfigError

__all__ = ["add_noise", "residual_blocks"]


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks with a shortcut addition whose branch ends in ``last_bn`` (BasicBlock, Bottleneck and their kin)."""
    return [m for m in model.modules() if getattr(m, "residual", False) and isinstance(getattr(m, "last_bn", None),
                                                                                       nn.Module)]


def _dropout_input(p: float, module: nn.Module, inputs: tuple):
    return (F.dropout(inputs[0], p, training=module.training), *inputs[1:])


def _drop_branch(p: float, module: nn.Module, inputs: tuple, output):
    return _stochastic_depth(output, p, "row", training=module.training)


def add_noise(model: nn.Module, dropout: float = 0.0, stochastic_depth: float = 0.0) -> nn.Module:
    """Add classifier-input dropout and stochastic depth to ``model`` in place (0 leaves it as it is)."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1); got {dropout}")
    if not 0.0 <= stochastic_depth < 1.0:
        raise ConfigError("model.stochastic_depth", f"must be in [0, 1); got {stochastic_depth}")
    if dropout > 0:
        if not hasattr(model, "get_classifier"):
            raise ConfigError("model.dropout", f"model {type(model).__name__} has no get_classifier()")
        model.get_classifier().register_forward_pre_hook(partial(_dropout_input, dropout))
    if stochastic_depth > 0:
        blocks = residual_blocks(model)
        if not blocks:
            raise ConfigError("model.stochastic_depth", f"model {type(model).__name__} has no residual blocks to drop")
        for index, block in enumerate(blocks):
            p = stochastic_depth * (index + 1) / len(blocks)
            block.last_bn.register_forward_hook(partial(_drop_branch, p))
    return model
