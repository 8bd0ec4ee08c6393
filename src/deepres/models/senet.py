"""Squeeze-and-excitation ResNets (Hu et al. 2018, "Squeeze-and-Excitation Networks", arXiv:1709.01507).

:class:`SqueezeExcite` squeezes each channel to one number (global average pooling) and excites: FC to C/r, ReLU, FC
back to C, sigmoid; the result rescales the channels (section 3). The fully connected layers are 1x1 convs on the
1x1 map, with biases. In an SE-ResNet every residual block applies it to its branch before the addition (Figure 3),
with reduction r = 16 (section 6.1); SE-ResNet-50 has 28.09M parameters against ResNet-50's 25.56M.

The blocks extend :mod:`deepres.models.resnet`'s, so every option of the ResNets applies (``shortcut``, ``stride_on``
(the SENet models put the stride on the first 1x1, the default), ``zero_init_residual``) and a ResNet state dict loads
with ``strict=False`` (only the ``se`` weights are missing). ``small_input=True`` gives the CIFAR stem (3x3 conv,
no max pool).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model
from .resnet import IMAGENET_DEPTHS, BasicBlock, Bottleneck, ResNet, ShortcutOption, imagenet_resnet

__all__ = ["SEBasicBlock", "SEBottleneck", "SqueezeExcite", "se_resnet"]


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(act(fc1(avgpool(x))))): channel weights from the global context.

    Args:
        channels: C, the channels rescaled.
        squeeze_channels: the bottleneck width (C / r in SENet; a quarter of the block input in EfficientNet).
        activation: the non-linearity between the two layers (ReLU in SENet, SiLU in EfficientNet).
    """

    def __init__(self, channels: int, squeeze_channels: int, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, kernel_size=1)
        self.activation = activation(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, kernel_size=1)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class _ExciteThenAdd:
    """What SE adds to a residual block: rescale the branch, then the shortcut addition and the final ReLU."""

    reduction = 16  # r (section 6.1)

    def _add_se(self, channels: int) -> None:
        self.se = SqueezeExcite(channels, channels // self.reduction)

    def _excite_and_add(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.se(out)
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class SEBasicBlock(_ExciteThenAdd, BasicBlock):
    """:class:`~deepres.models.resnet.BasicBlock` with squeeze-and-excitation on its branch."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: ShortcutOption | None = "B", **options):
        super().__init__(in_planes, planes, stride, shortcut, **options)
        self._add_se(planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._excite_and_add(self.bn2(self.conv2(out)), x)


class SEBottleneck(_ExciteThenAdd, Bottleneck):
    """:class:`~deepres.models.resnet.Bottleneck` with squeeze-and-excitation on its branch (Figure 3, right)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: ShortcutOption | None = "B", **options):
        super().__init__(in_planes, planes, stride, shortcut, **options)
        self._add_se(planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._excite_and_add(self.bn3(self.conv3(out)), x)


SE_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {BasicBlock: SEBasicBlock, Bottleneck: SEBottleneck}


def se_resnet(depth: int, **options) -> ResNet:
    """SE-ResNet-``depth`` (18, 34, 50, 101, 152): the ResNet of Table 1 of He et al. with SE in every block;
    ``options`` as :func:`~deepres.models.resnet.imagenet_resnet` (``small_input``, ``shortcut``, ``stride_on`` ...)."""
    return imagenet_resnet(depth, block_types=SE_BLOCKS, **options)


def _register(depth: int):
    def builder(**options) -> ResNet:
        return se_resnet(depth, **options)

    builder.__name__ = f"se_resnet{depth}"
    builder.__doc__ = f"SE-ResNet-{depth} (Hu et al. 2018), reduction 16."
    return register_model(family="senet", input_size=(224, 224))(builder)


se_resnet18, se_resnet34, se_resnet50, se_resnet101, se_resnet152 = (_register(d) for d in IMAGENET_DEPTHS)
