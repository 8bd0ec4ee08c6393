"""EfficientNet B0-B7 (Tan and Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
arXiv:1905.11946).

B0 (Table 1) is a 3x3 stem conv, seven stages of :class:`MBConv` blocks (mobile inverted bottlenecks, Sandler et al.
2018, with squeeze-and-excitation) and a 1x1 conv to 1280 channels, all with swish (SiLU) activations. Compound
scaling (section 3.3) widens every layer by a width factor (channels rounded to multiples of 8), deepens every stage by
a depth factor (layers rounded up) and raises the input resolution; :data:`SCALING` holds the factors of B0-B7 and
the dropout before the classifier. Residual blocks use stochastic depth (Huang et al. 2016), the drop probability
rising linearly with block index from 0 towards ``stochastic_depth`` (0.2, the paper's "drop connect" rate).

Names and shapes are torchvision's, so its state dicts load unchanged. Batch norm: torchvision's B0-B4 weights were
trained in PyTorch with its defaults (eps 1e-5, momentum 0.1), its B5-B7 weights are ports of the paper's TensorFlow
models (eps 1e-3, momentum 0.01, i.e. TensorFlow's 0.99); each net defaults to the values its weights need
(``bn_eps``, ``bn_momentum``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torchvision.ops

from .checkpointing import GradCheckpointing
from .registry import ClassifierHead, register_model
from .senet import SqueezeExcite

__all__ = ["SCALING", "ConvBNAct", "EfficientNet", "MBConv", "efficientnet"]

# Table 1 (B0), stages 2-8: expansion ratio, kernel, stride of the first block, output channels, layers.
B0_STAGES: list[tuple[int, int, int, int, int]] = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
B0_STEM = 32

# width factor, depth factor, resolution, dropout (the paper's scaling of B0 and its released models).
SCALING: dict[str, tuple[float, float, int, float]] = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}
PORTED_FROM_TENSORFLOW = ("b5", "b6", "b7")  # BN eps 1e-3, momentum 0.01 (see the module docstring)


def round_channels(channels: float, divisor: int = 8) -> int:
    """``channels`` to the nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below it."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class ConvBNAct(nn.Sequential):
    """Conv (no bias, "same" padding), BN, then ``activation`` (None: linear, as the projection convs)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        activation: type[nn.Module] | None = nn.SiLU,
    ):
        padding = (kernel_size - 1) // 2
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            norm(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class MBConv(nn.Module):
    """1x1 expansion (unless the ratio is 1), kxk depthwise conv, squeeze-and-excitation, linear 1x1 projection;
    an identity shortcut with stochastic depth when the block keeps shape."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_prob: float = 0.0,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        expanded = round_channels(in_channels * expand_ratio)
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvBNAct(in_channels, expanded, 1, norm=norm))
        layers += [
            ConvBNAct(expanded, expanded, kernel_size, stride, groups=expanded, norm=norm),
            # The squeeze width is a quarter of the block's input channels (SE ratio 0.25 in the released models).
            SqueezeExcite(expanded, max(1, in_channels // 4), activation=nn.SiLU),
            ConvBNAct(expanded, out_channels, 1, norm=norm, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            # Drops the whole branch per sample during training ("row" mode), rescaling the survivors.
            out = torchvision.ops.stochastic_depth(out, self.drop_prob, "row", self.training) + x
        return out

    def extra_repr(self) -> str:
        return f"use_residual={self.use_residual}, drop_prob={self.drop_prob:.4f}"


class EfficientNet(ClassifierHead, GradCheckpointing, nn.Module):
    """B0 scaled by ``width`` and ``depth`` factors: stem, MBConv stages, 1x1 head conv, pooling, dropout, classifier.

    ``features`` holds the stem (``features.0``), the seven stages (``features.1`` .. ``features.7``) and the head
    conv (``features.8``); ``classifier`` is dropout then the linear layer. ``small_input=True`` makes the stem
    stride 1, the usual CIFAR form: a 32x32 image ends at 2x2 instead of 1x1.
    """

    def __init__(
        self,
        width: float = 1.0,
        depth: float = 1.0,
        dropout: float = 0.2,
        *,
        stochastic_depth: float = 0.2,
        num_classes: int = 1000,
        in_channels: int = 3,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        small_input: bool = False,
    ):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
        stages = [
            (expand, kernel, stride, round_channels(out * width), math.ceil(layers * depth))
            for expand, kernel, stride, out, layers in B0_STAGES
        ]
        channels = round_channels(B0_STEM * width)
        features: list[nn.Module] = [ConvBNAct(in_channels, channels, 3, stride=1 if small_input else 2, norm=norm)]
        total_blocks = sum(stage[-1] for stage in stages)
        index = 0
        for expand, kernel, stride, out_channels, num_layers in stages:
            blocks = []
            for i in range(num_layers):
                drop_prob = stochastic_depth * index / total_blocks
                blocks.append(MBConv(channels, out_channels, kernel, stride if i == 0 else 1, expand, drop_prob, norm))
                channels = out_channels
                index += 1
            features.append(nn.Sequential(*blocks))
        head_channels = 4 * channels  # 1280 for B0
        features.append(ConvBNAct(channels, head_channels, 1, norm=norm))
        self.features = nn.Sequential(*features)
        self.num_features = head_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout, inplace=True),
            nn.Linear(head_channels, num_classes) if num_classes > 0 else nn.Identity(),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # The released models' dense initialiser: uniform in +-1/sqrt(classes).
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The head conv's feature map (N, num_features, H/32, W/32)."""
        return self.run_sequence(self.features, x)  # checkpointed stage by stage

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output, before the head conv (320 channels for B0): the deepest map of
        ``features_only``, as timm gives it."""
        return self.run_sequence(self.features[:-1], x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, dropout, then the classifier (skipped when ``pre_logits``)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier[1]

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: no classifier, features out)."""
        self.classifier[1] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def efficientnet(variant: str, **options) -> EfficientNet:
    """EfficientNet-``variant`` ("b0" .. "b7") with the paper's scaling factors and dropout."""
    if variant not in SCALING:
        raise ValueError(f"EfficientNet variant must be one of {', '.join(SCALING)}; got {variant!r}")
    width, depth, _, dropout = SCALING[variant]
    if variant in PORTED_FROM_TENSORFLOW:
        options = {"bn_eps": 1e-3, "bn_momentum": 0.01, **options}
    return EfficientNet(width, depth, options.pop("dropout", dropout), **options)


def _register(variant: str):
    def builder(**options) -> EfficientNet:
        return efficientnet(variant, **options)

    width, depth, size, dropout = SCALING[variant]
    builder.__name__ = f"efficientnet_{variant}"
    builder.__doc__ = f"EfficientNet-{variant.upper()}: width x{width}, depth x{depth}, {size} px, dropout {dropout}."
    return register_model(family="efficientnet", input_size=(size, size))(builder)


(
    efficientnet_b0,
    efficientnet_b1,
    efficientnet_b2,
    efficientnet_b3,
    efficientnet_b4,
    efficientnet_b5,
    efficientnet_b6,
    efficientnet_b7,
) = (_register(v) for v in SCALING)
