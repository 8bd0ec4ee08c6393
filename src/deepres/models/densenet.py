"""Densely connected networks (Huang et al. 2017, "Densely Connected Convolutional Networks", arXiv:1608.06993).

Inside a :class:`DenseBlock` every layer receives the concatenation of all earlier feature maps of the block and adds
``growth_rate`` (k) new channels (section 3). Each :class:`DenseLayer` is the bottleneck composite function of
DenseNet-B: BN-ReLU-Conv1x1 (4k) then BN-ReLU-Conv3x3 (k). A :class:`Transition` between blocks is BN, ReLU, 1x1 conv
and 2x2 average pooling, keeping ``compression`` (theta = 0.5, DenseNet-C) of the channels.

- ImageNet nets (Table 1): ``densenet121/161/169/201``, a 7x7/2 conv and 3x3/2 max pool, four blocks; names and
  shapes are torchvision's, so its state dicts load unchanged. ``small_input=True`` swaps the stem for the CIFAR one.
- CIFAR nets (section 3, "Implementation details"): ``densenet_bc(depth=100, growth_rate=12)``, a 3x3 conv with 2k
  filters and three blocks of (depth - 4) / 6 bottleneck layers; ``bottleneck=False`` gives the basic DenseNet
  (a single BN-ReLU-Conv3x3 per layer, (depth - 4) / 3 layers a block, 16 stem filters).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpointing import GradCheckpointing
from .registry import ClassifierHead, register_model

__all__ = ["DenseBlock", "DenseLayer", "DenseNet", "Transition", "densenet_bc"]


class DenseLayer(nn.Module):
    """H_l on the concatenated input: BN-ReLU-Conv1x1 (``bn_size * growth_rate``) then BN-ReLU-Conv3x3
    (``growth_rate``); with ``bn_size=None``, BN-ReLU-Conv3x3 alone (no bottleneck)."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int | None = 4, drop_rate: float = 0.0):
        super().__init__()
        self.bottleneck = bn_size is not None
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        if self.bottleneck:
            self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, dim=1))))
        if self.bottleneck:
            x = self.conv2(self.relu2(self.norm2(x)))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; layer l sees the block input and the outputs of layers 1..l-1 (equation 2)."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int | None, drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, dim=1)


class Transition(nn.Sequential):
    """BN, ReLU, 1x1 conv to ``out_channels``, 2x2 average pooling (section 3, "Pooling layers")."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(in_channels),
                relu=nn.ReLU(inplace=True),
                conv=nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                pool=nn.AvgPool2d(kernel_size=2, stride=2),
            )
        )


class DenseNet(ClassifierHead, GradCheckpointing, nn.Module):
    """A stem, dense blocks joined by transitions, a final BN-ReLU, global average pooling and a linear classifier.

    Args:
        growth_rate: k, channels each dense layer adds.
        block_config: layers per dense block, e.g. (6, 12, 24, 16) for DenseNet-121.
        num_init_features: filters of the stem conv (2k in the paper's nets).
        bn_size: bottleneck width as a multiple of k (4 in the paper); None for layers without bottleneck.
        compression: theta, the fraction of channels a transition keeps (0.5 for -C/-BC nets, 1 for none).
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or ``"cifar"`` (one 3x3 conv).
        drop_rate: dropout after each dense layer (the paper: 0.2 on CIFAR without augmentation only).
    """

    def __init__(
        self,
        growth_rate: int,
        block_config: tuple[int, ...],
        num_init_features: int,
        *,
        bn_size: int | None = 4,
        compression: float = 0.5,
        stem: Literal["imagenet", "cifar"] = "imagenet",
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_channels: int = 3,
    ):
        super().__init__()
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1]; got {compression}")
        if stem == "imagenet":
            layers = OrderedDict(
                conv0=nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False),
                norm0=nn.BatchNorm2d(num_init_features),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        elif stem == "cifar":
            # The first dense layer starts with BN-ReLU, so the stem is a bare conv.
            layers = OrderedDict(conv0=nn.Conv2d(in_channels, num_init_features, kernel_size=3, padding=1, bias=False))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar'; got {stem!r}")
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bn_size, drop_rate)
            layers[f"denseblock{i + 1}"] = block
            channels = block.out_channels
            if i < len(block_config) - 1:
                out_channels = int(channels * compression)
                layers[f"transition{i + 1}"] = Transition(channels, out_channels)
                channels = out_channels
        layers[f"norm{len(block_config) + 1}"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(layers)
        self.num_features = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # He et al. 2015, as the authors' code
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's feature map after the final BN and ReLU."""
        if not self._checkpointing_now():
            return F.relu(self.features(x))
        for module in self.features:  # checkpointed block by block and transition by transition
            x = self.run_block(module, x) if isinstance(module, (DenseBlock, Transition)) else module(x)
        return F.relu(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then the classifier (skipped when ``pre_logits``)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: no classifier, features out)."""
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


# Table 1: growth rate, layers per block, stem filters.
IMAGENET_CONFIGS: dict[int, tuple[int, tuple[int, ...], int]] = {
    121: (32, (6, 12, 24, 16), 64),
    161: (48, (6, 12, 36, 24), 96),
    169: (32, (6, 12, 32, 32), 64),
    201: (32, (6, 12, 48, 32), 64),
}


def imagenet_densenet(depth: int, *, small_input: bool = False, **options) -> DenseNet:
    """DenseNet-BC ``depth`` (121, 161, 169, 201) of Table 1; ``small_input`` gives it the CIFAR stem."""
    if depth not in IMAGENET_CONFIGS:
        raise ValueError(f"ImageNet DenseNet depth must be one of {sorted(IMAGENET_CONFIGS)}; got {depth}")
    growth_rate, block_config, num_init_features = IMAGENET_CONFIGS[depth]
    stem = "cifar" if small_input else "imagenet"
    return DenseNet(growth_rate, block_config, num_init_features, stem=stem, **options)


def _register_imagenet(depth: int):
    def builder(**options) -> DenseNet:
        return imagenet_densenet(depth, **options)

    builder.__name__ = f"densenet{depth}"
    builder.__doc__ = f"DenseNet-{depth} (Table 1), k={IMAGENET_CONFIGS[depth][0]}."
    return register_model(family="densenet", input_size=(224, 224))(builder)


densenet121, densenet161, densenet169, densenet201 = (_register_imagenet(d) for d in IMAGENET_CONFIGS)


@register_model(family="densenet_cifar", input_size=(32, 32))
def densenet_bc(
    depth: int = 100,
    growth_rate: int = 12,
    *,
    bottleneck: bool = True,
    compression: float = 0.5,
    num_classes: int = 10,
    **options,
) -> DenseNet:
    """The CIFAR DenseNet: three dense blocks at 32, 16 and 8 pixels; DenseNet-BC (L=100, k=12) by default (0.8M).

    ``depth`` counts the stem conv, the layers' convs, the two transition convs and the classifier.
    """
    convs_per_layer = 2 if bottleneck else 1
    if depth < 4 or (depth - 4) % (3 * convs_per_layer):
        kind = "6n+4 with bottleneck layers" if bottleneck else "3n+4 without bottleneck layers"
        raise ValueError(f"CIFAR DenseNet depth must be {kind}; got {depth}")
    n = (depth - 4) // (3 * convs_per_layer)
    # Section 3: the stem has 16 filters, or 2k for DenseNet-BC.
    num_init_features = 2 * growth_rate if bottleneck and compression < 1 else 16
    return DenseNet(
        growth_rate,
        (n, n, n),
        num_init_features,
        bn_size=4 if bottleneck else None,
        compression=compression,
        stem="cifar",
        num_classes=num_classes,
        **options,
    )
