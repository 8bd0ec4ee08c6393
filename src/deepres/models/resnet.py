"""Deep residual networks (He et al. 2016, arXiv:1512.03385), written to read like the paper.

- Blocks (section 3): :class:`BasicBlock` (two 3x3 convs), :class:`Bottleneck` (1x1 reduce, 3x3, 1x1 expand x4) and
  :class:`PlainBlock` (the same two 3x3 convs with no shortcut). BN follows every conv; ReLU follows the addition.
- Shortcuts (section 4.1, Table 3): option ``"A"`` identity with zero-padded, subsampled shortcuts where dimensions
  grow (no parameters); ``"B"`` projections (1x1 conv + BN) only where dimensions grow; ``"C"`` projections everywhere.
- ImageNet nets (Table 1): :func:`imagenet_resnet` with depth 18/34/50/101/152, option B by default.
- CIFAR-10 nets (section 4.2): :func:`cifar_resnet` for any depth 6n+2, option A by default.

Parameter and buffer names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.downsample.0`` ...), so a
torchvision state dict loads unchanged into the matching net (torchvision trains ``stride_on="3x3"``, "v1.5").
"""

from __future__ import annotations

import warnings
from os import PathLike
from typing import Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpointing import GradCheckpointing
from .registry import ClassifierHead, register_model

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PlainBlock",
    "ResNet",
    "ShortcutA",
    "cifar_resnet",
    "imagenet_resnet",
    "load_torchvision_weights",
]

ShortcutOption = Literal["A", "B", "C"]
SHORTCUT_OPTIONS = ("A", "B", "C")
STRIDE_OPTIONS = ("1x1", "3x3")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Option A where dimensions grow: subsample by ``stride`` and append zero channels. No parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A cannot shrink channels ({in_planes} -> {out_planes}); use option B or C")
        self.stride = stride
        self.extra_channels = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # The same positions a 1x1 stride-s convolution samples (top-left of each s x s cell).
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def make_shortcut(option: str | None, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """The shortcut module of one block; None means the identity (or, with option None, no shortcut at all)."""
    if option is None:
        return None
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut must be one of {', '.join(SHORTCUT_OPTIONS)}; got {option!r}")
    grows = stride != 1 or in_planes != out_planes
    if option == "C" or (option == "B" and grows):
        return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    if option == "A" and grows:
        return ShortcutA(in_planes, out_planes, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs: y = relu(BN(W2 relu(BN(W1 x))) + shortcut(x)). ``shortcut=None``: no addition (plain)."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: ShortcutOption | None = "B",
        stride_on: str = "1x1",  # no 1x1 conv here: the first 3x3 conv strides either way
        groups: int = 1,
        width_per_group: int = 64,
    ):
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError(
                f"BasicBlock supports only groups=1 and width_per_group=64 (got {groups}, {width_per_group}); "
                "grouped and wide nets use Bottleneck"
            )
        self.residual = shortcut is not None
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = make_shortcut(shortcut, in_planes, planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class PlainBlock(BasicBlock):
    """The plain counterpart of :class:`BasicBlock`: the same two 3x3 convs, no shortcut, no addition."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut=None, stride_on: str = "1x1", **widths):
        super().__init__(in_planes, planes, stride, shortcut=None, **widths)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4); the stride sits on the first 1x1 (paper) or on the 3x3 (v1.5).

    ``groups`` and ``width_per_group`` widen or split the middle: its width is ``planes * width_per_group / 64 *
    groups`` and the 3x3 conv has ``groups`` groups (ResNeXt's cardinality, Xie et al. 2017; wide ResNets double
    ``width_per_group``). The defaults, 1 and 64, give the paper's bottleneck.
    """

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        shortcut: ShortcutOption | None = "B",
        stride_on: str = "1x1",
        groups: int = 1,
        width_per_group: int = 64,
    ):
        super().__init__()
        if stride_on not in STRIDE_OPTIONS:
            raise ValueError(f"stride_on must be one of {', '.join(STRIDE_OPTIONS)}; got {stride_on!r}")
        if groups < 1 or width_per_group < 1:
            raise ValueError(f"groups and width_per_group must be positive; got {groups}, {width_per_group}")
        stride_1x1, stride_3x3 = (stride, 1) if stride_on == "1x1" else (1, stride)
        width = planes * width_per_group // 64 * groups
        out_planes = planes * self.expansion
        self.residual = shortcut is not None
        self.conv1 = conv1x1(in_planes, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, in_planes, out_planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class ResNet(ClassifierHead, GradCheckpointing, nn.Module):
    """A stem, stages of blocks (``layer1`` ...), global average pooling and a fully connected classifier.

    Args:
        block: the block class of every stage (BasicBlock, Bottleneck or PlainBlock).
        layers: blocks per stage, e.g. [3, 4, 6, 3] for ResNet-34/50, [n, n, n] for CIFAR 6n+2.
        widths: filters per stage (before the bottleneck's x4).
        stem: ``"imagenet"`` (7x7/2 conv 64, BN, ReLU, 3x3/2 max pool) or ``"cifar"`` (3x3 conv widths[0], BN, ReLU).
        shortcut: ``"A"``, ``"B"`` or ``"C"`` (section 4.1), or None for a plain net.
        stride_on: ``"1x1"`` (paper) or ``"3x3"`` (v1.5): where a bottleneck puts its stride.
        zero_init_residual: start each residual branch's last BN at zero, so every block starts as the identity.
        groups, width_per_group: the bottleneck's cardinality and width (ResNeXt, wide ResNets); see
            :class:`Bottleneck`. The defaults (1, 64) are the paper's nets.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: list[int],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        stem: Literal["imagenet", "cifar"] = "imagenet",
        num_classes: int = 1000,
        in_channels: int = 3,
        shortcut: ShortcutOption | None = "B",
        stride_on: str = "1x1",
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
    ):
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {layers} and widths {widths} must have the same length")
        if stride_on not in STRIDE_OPTIONS:
            raise ValueError(f"stride_on must be one of {', '.join(STRIDE_OPTIONS)}; got {stride_on!r}")
        if shortcut is not None and shortcut not in SHORTCUT_OPTIONS:
            raise ValueError(f"shortcut must be one of {', '.join(SHORTCUT_OPTIONS)}; got {shortcut!r}")
        if block is PlainBlock:
            shortcut = None
        self.shortcut = shortcut
        self.stride_on = stride_on
        self.block = block
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = conv3x3(in_channels, widths[0])
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar'; got {stem!r}")
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for index, (num_blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2  # the first block of every later stage halves the feature map
            blocks = []
            for i in range(num_blocks):
                blocks.append(
                    block(
                        in_planes,
                        width,
                        stride if i == 0 else 1,
                        shortcut=shortcut,
                        stride_on=stride_on,
                        groups=groups,
                        width_per_group=width_per_group,
                    )
                )
                in_planes = width * block.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.num_features = in_planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes) if num_classes > 0 else nn.Identity()  # 0: features out (timm)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 ("MSRA") initialisation, as the paper (section 3.4); the fan-out form, as torchvision.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and m.residual:
                    nn.init.zeros_(m.last_bn.weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, num_features, H/32, W/32 for ImageNet nets)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = self.run_sequence(stage, x)  # checkpointed block by block, as timm's ResNets
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then the classifier (skipped when ``pre_logits``)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier for ``num_classes`` (0: no classifier, features out)."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


# ---------------------------------------------------------------------------------------------------------------
# ImageNet nets (Table 1)

IMAGENET_DEPTHS: dict[int, tuple[type[nn.Module], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


def imagenet_resnet(
    depth: int,
    *,
    plain: bool = False,
    num_classes: int = 1000,
    in_channels: int = 3,
    shortcut: ShortcutOption = "B",
    stride_on: str = "1x1",
    zero_init_residual: bool = False,
    small_input: bool = False,
    groups: int = 1,
    width_per_group: int = 64,
    block_types: Mapping[type[nn.Module], type[nn.Module]] | None = None,
) -> ResNet:
    """A Table 1 net: depth 18, 34 (basic blocks) or 50, 101, 152 (bottlenecks); ``plain`` drops every shortcut.

    ``small_input=True`` swaps the stem for a 3x3 stride-1 conv without max pooling, the usual form of these nets on
    32x32 images (the four stages then run at 32, 16, 8 and 4). ``groups`` and ``width_per_group`` split or widen the
    bottleneck (ResNeXt, wide ResNets); ``block_types`` replaces the depth's block class with another built the same
    way (SE blocks).
    """
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}; got {depth}")
    block, layers = IMAGENET_DEPTHS[depth]
    if plain and block is BasicBlock:
        block = PlainBlock
    if block_types:
        block = block_types[block]
    return ResNet(
        block,
        layers,
        widths=(64, 128, 256, 512),
        stem="cifar" if small_input else "imagenet",
        num_classes=num_classes,
        in_channels=in_channels,
        shortcut=None if plain else shortcut,
        stride_on=stride_on,
        zero_init_residual=zero_init_residual,
        groups=groups,
        width_per_group=width_per_group,
    )


def cifar_resnet(
    depth: int,
    *,
    plain: bool = False,
    num_classes: int = 10,
    in_channels: int = 3,
    shortcut: ShortcutOption = "A",
    zero_init_residual: bool = False,
    widths: tuple[int, int, int] = (16, 32, 64),
) -> ResNet:
    """The section 4.2 net: a 3x3 conv, then 3 stages of n blocks (2n 3x3 convs) at 16, 32, 64 filters; depth 6n+2."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); got {depth}")
    n = (depth - 2) // 6
    return ResNet(
        PlainBlock if plain else BasicBlock,
        [n, n, n],
        widths=tuple(widths),
        stem="cifar",
        num_classes=num_classes,
        in_channels=in_channels,
        shortcut=None if plain else shortcut,
        zero_init_residual=zero_init_residual,
    )


def _register_imagenet(depth: int, plain: bool):
    def builder(**options) -> ResNet:
        return imagenet_resnet(depth, plain=plain, **options)

    builder.__name__ = f"{'plain' if plain else 'resnet'}{depth}"
    builder.__doc__ = f"{'Plain' if plain else 'Residual'} {depth}-layer ImageNet net (Table 1)."
    return register_model(family="resnet", input_size=(224, 224))(builder)


def _register_cifar(depth: int, plain: bool):
    def builder(**options) -> ResNet:
        return cifar_resnet(depth, plain=plain, **options)

    builder.__name__ = f"{'plain' if plain else 'resnet'}{depth}"
    builder.__doc__ = f"{'Plain' if plain else 'Residual'} {depth}-layer CIFAR-10 net (section 4.2)."
    return register_model(family="resnet_cifar", input_size=(32, 32))(builder)


resnet18, resnet34, resnet50, resnet101, resnet152 = (_register_imagenet(d, False) for d in (18, 34, 50, 101, 152))
plain18, plain34 = (_register_imagenet(d, True) for d in (18, 34))
resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202 = (
    _register_cifar(d, False) for d in (20, 32, 44, 56, 110, 1202)
)
plain20, plain32, plain44, plain56, plain110 = (_register_cifar(d, True) for d in (20, 32, 44, 56, 110))


# ---------------------------------------------------------------------------------------------------------------
# torchvision weights


def load_torchvision_weights(model: ResNet, source: str | PathLike | dict, strict: bool = True):
    """Load a torchvision ResNet state dict (a file written by ``torch.save`` or the dict itself) into ``model``.

    Names and shapes are torchvision's, so nothing is renamed. torchvision trains its bottleneck nets with the
    stride on the 3x3 conv ("v1.5"); loading them into a net built with the paper's ``stride_on="1x1"`` runs, but
    computes something the weights were not trained for, so it warns.
    """
    if isinstance(source, dict):
        state = source
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"torchvision weights file not found: {source}") from None
        for key in ("state_dict", "model"):  # common wrappers around a state dict
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{source} does not hold a state dict")
    if getattr(model, "stride_on", None) == "1x1" and getattr(model, "block", None) is Bottleneck:
        warnings.warn(
            "loading torchvision weights into a bottleneck ResNet with stride_on='1x1' (the paper's); torchvision's "
            "weights were trained with stride_on='3x3' (v1.5): build the model with stride_on='3x3' to match them",
            stacklevel=2,
        )
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched:
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:5])
        raise ValueError(f"weights do not fit the model: shape mismatch in {details}")
    return model.load_state_dict(state, strict=strict)
