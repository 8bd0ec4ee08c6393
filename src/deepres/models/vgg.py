"""VGG nets (Simonyan and Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image Recognition").

Only 3x3 convolutions (stride 1, padding 1) and 2x2 stride-2 max pooling: two stacked 3x3 convs see 5x5, three see
7x7, with fewer weights and more non-linearities than one large filter (section 2.3). Table 1's configurations A, B,
D and E are ``vgg11``, ``vgg13``, ``vgg16`` and ``vgg19`` (weight layers: 8/10/13/16 convs + 3 fully connected).
The ``_bn`` nets put batch normalisation (Ioffe and Szegedy 2015, not in the paper) after every conv, keeping the conv
bias as torchvision does, so torchvision's state dicts load unchanged.

``small_input=True`` is the usual CIFAR form: the five pools take 32x32 to 1x1, so the head averages to 1x1 and its
hidden layers have 512 units instead of 4096 (at 32x32 the ImageNet head would copy one pixel 49 times into a
25088-wide layer).
"""

from __future__ import annotations

import torch.nn as nn

from .alexnet import ConvFCNet
from .registry import register_model

__all__ = ["VGG", "VGG_CONFIGS", "vgg"]

# Table 1: filters of each 3x3 conv, "M" a 2x2 max pool.
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # A
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # B
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],  # D
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],  # E
}


def make_vgg_features(config: list[int | str], in_channels: int = 3, batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(in_channels, entry, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(entry))
        layers.append(nn.ReLU(inplace=True))
        in_channels = entry
    return nn.Sequential(*layers)


class VGG(ConvFCNet):
    """A Table 1 configuration: the conv stack, then FC 4096, FC 4096 (each with dropout 0.5), FC classes."""

    def __init__(
        self,
        depth: int,
        *,
        batch_norm: bool = False,
        num_classes: int = 1000,
        in_channels: int = 3,
        small_input: bool = False,
        dropout: float = 0.5,
    ):
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}; got {depth}")
        features = make_vgg_features(VGG_CONFIGS[depth], in_channels, batch_norm)
        pool_size, hidden = (1, 512) if small_input else (7, 4096)
        super().__init__(features, 512, pool_size, hidden, num_classes, dropout=dropout, dropout_first=False)
        self.depth = depth
        self.batch_norm = batch_norm


def vgg(depth: int, batch_norm: bool = False, **options) -> VGG:
    """VGG-``depth`` (11, 13, 16 or 19), with batch normalisation after every conv when ``batch_norm``."""
    return VGG(depth, batch_norm=batch_norm, **options)


def _register(depth: int, batch_norm: bool):
    def builder(**options) -> VGG:
        return vgg(depth, batch_norm, **options)

    builder.__name__ = f"vgg{depth}{'_bn' if batch_norm else ''}"
    builder.__doc__ = f"VGG-{depth} (Table 1){' with batch normalisation' if batch_norm else ''}."
    return register_model(family="vgg", input_size=(224, 224))(builder)


vgg11, vgg13, vgg16, vgg19 = (_register(d, False) for d in (11, 13, 16, 19))
vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn = (_register(d, True) for d in (11, 13, 16, 19))
