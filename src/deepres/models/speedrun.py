"""A residual net built for training speed on CIFAR-10, not for the paper's comparisons.

The layout of the 9-layer residual net that won the DAWNBench CIFAR-10 training-time entries (Page, "How to train
your ResNet", 2018): a 64-filter stem, three stages that double the width and halve the map with a max pool, a
residual pair of 3x3 convolutions after the first and last stage, global max pooling and a linear classifier whose
output is scaled down. Wide and shallow: few, large kernels that keep a big GPU busy, where the paper's 6n+2 nets
(16-64 filters) are bound by kernel launches. Its residual branch adds after the ReLU, as in that net.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .checkpointing import GradCheckpointing
from .registry import ClassifierHead, register_model

__all__ = ["SpeedrunResNet", "speedrun_resnet9"]


def conv_bn(in_planes: int, out_planes: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 3, padding=1, bias=False), nn.BatchNorm2d(out_planes),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    """y = x + F(x), F two conv-BN-ReLU layers at constant width."""

    def __init__(self, planes: int):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(planes, planes), conv_bn(planes, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class SpeedrunResNet(ClassifierHead, GradCheckpointing, nn.Module):
    """Stem, then per stage: conv-BN-ReLU widening, 2x2 max pool, and (where ``residual``) a residual pair."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256, 512),
                 residual: tuple[bool, ...] = (True, False, True), logit_scale: float = 0.125):
        super().__init__()
        if len(widths) != len(residual) + 1:
            raise ValueError(f"widths {widths} needs one more entry than residual {residual} (the stem's)")
        self.stem = conv_bn(in_channels, widths[0])
        stages = []
        for planes_in, planes, has_residual in zip(widths[:-1], widths[1:], residual):
            layers = [conv_bn(planes_in, planes), nn.MaxPool2d(2)]
            if has_residual:
                layers.append(Residual(planes))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = widths[-1]
        self.pool = nn.AdaptiveMaxPool2d(1)
        # A small logit scale keeps the initial softmax soft at this width (Page 2018 uses 0.125).
        self.logit_scale = logit_scale
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_sequence(self.stages, self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()


@register_model(family="speedrun", input_size=(32, 32))
def speedrun_resnet9(**options) -> SpeedrunResNet:
    """The 9-layer speed-oriented residual net (64-128-256-512 filters, residual pairs at 128 and 512)."""
    return SpeedrunResNet(**options)
