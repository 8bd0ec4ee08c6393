"""GoogLeNet, Inception v1 (Szegedy et al. 2015, "Going Deeper with Convolutions", arXiv:1409.4842).

An :class:`Inception` module runs four branches in parallel and concatenates them along channels: a 1x1 conv, a 1x1
reduction then a 3x3 conv, a 1x1 reduction then a "5x5" conv, and a 3x3 max pool then a 1x1 projection (Figure 2b).
The 1x1 reductions keep the cost down. Nine modules (Table 1) make a 22-layer net; global average pooling and one
fully connected layer classify.

Auxiliary classifiers (section 5): two small heads on inception4a and inception4d add gradient to the middle of the
net during training and are dropped at inference. **Their outputs**: in training mode (and with ``aux_logits=True``,
the default) ``forward`` returns an :class:`AuxOutputs` named tuple ``(logits, aux1, aux2)``: the main logits first,
then the auxiliary logits, earliest first. A task adds 0.3 x the loss of each auxiliary output to the main loss (the
paper's weight; :class:`deepres.tasks.classification.ClassificationTask` does) and reads the main logits as item 0.
In eval mode, and hence in export, ``forward`` returns the logits tensor alone and the auxiliary heads do not run.
The outputs travel with the call rather than sitting on the module, so nothing is hidden between steps and replicas
(DataParallel, DDP) behave like any other model.

Differences from the paper, all torchvision's, so its state dict (``torchvision.models.googlenet(aux_logits=True)``)
loads unchanged:

- batch normalisation (eps 1e-3) after every conv (from Inception v2) and no local response normalisation;
- ``branch3_kernel=3``: the "5x5" branch uses a 3x3 kernel (a slip kept in torchvision for its weights); pass
  ``branch3_kernel=5`` for the paper's 5x5 (7.0M parameters instead of 6.6M without the auxiliary heads);
- the auxiliary heads average-pool adaptively to 4x4 (the paper's 5x5/3 pooling gives 4x4 at 224x224) and have BN;
- ``transform_input=True`` re-normalises ImageNet-normalised input to [-1, 1], as torchvision's pretrained weights
  expect (off by default); a grey input (``in_channels=1``) is taken as normalised with the channels' average mean
  and std.

``small_input=True`` is the CIFAR-size form: a 3x3 stride-1 first conv and no first max pool, so a 32x32 image
reaches the inception modules at 16x16, 8x8 and 4x4 (224x224 reaches them at 28, 14 and 7).

Main dropout is the paper's 40%, auxiliary dropout 70%; neither changes parameters or eval-mode outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from .checkpointing import GradCheckpointing
from .registry import ClassifierHead, register_model

__all__ = ["AuxOutputs", "ConvBN", "GoogLeNet", "Inception", "InceptionAux", "googlenet"]

# Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj of each Inception module.
INCEPTION_TABLE: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class AuxOutputs(NamedTuple):
    """A training-mode output with auxiliary classifiers: main logits first, then the auxiliary logits."""

    logits: torch.Tensor
    aux1: torch.Tensor
    aux2: torch.Tensor


class ConvBN(nn.Module):
    """Conv (no bias), BN (eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four parallel branches concatenated along channels (Figure 2b); out = ch1x1 + ch3x3 + ch5x5 + pool_proj."""

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        branch3_kernel: int = 3,
    ):
        super().__init__()
        self.branch1 = ConvBN(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(ConvBN(in_channels, ch3x3red, 1), ConvBN(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(
            ConvBN(in_channels, ch5x5red, 1), ConvBN(ch5x5red, ch5x5, branch3_kernel, padding=branch3_kernel // 2)
        )
        # ceil_mode keeps odd maps whole; with stride 1 and padding 1 it changes nothing but matches torchvision.
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), ConvBN(in_channels, pool_proj, 1)
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class InceptionAux(nn.Module):
    """Section 5: average pool to 4x4, 1x1 conv (128), FC 1024 + ReLU, dropout 70%, FC to the classes."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.conv = ConvBN(in_channels, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(self.avgpool(x)), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


def _trunc_normal_(tensor: torch.Tensor, std: float, a: float, b: float) -> torch.Tensor:
    """Fill ``tensor`` from a zero-mean normal of ``std`` truncated to [a, b], by the inverse CDF of a uniform draw.

    The same seed gives the same weights on every supported PyTorch: ``nn.init.trunc_normal_`` changed its sampling
    between releases (2.11 and 2.14 draw different numbers from one seed)."""
    with torch.no_grad():
        low, high = (0.5 * (1.0 + math.erf(bound / std / math.sqrt(2.0))) for bound in (a, b))
        tensor.uniform_(2.0 * low - 1.0, 2.0 * high - 1.0)
        tensor.erfinv_().mul_(std * math.sqrt(2.0))
        return tensor.clamp_(a, b)


class GoogLeNet(ClassifierHead, GradCheckpointing, nn.Module):
    """The Table 1 net. See the module docstring for the auxiliary outputs and the differences from the paper.

    Args:
        aux_logits: build the two auxiliary classifiers (``aux1`` after inception4a, ``aux2`` after inception4d).
        branch3_kernel: kernel of the third branch's conv (paper: 5; torchvision and its weights: 3).
        transform_input: map ImageNet-normalised input to [-1, 1] first (torchvision's pretrained weights).
        small_input: the CIFAR-size stem (3x3 stride-1 conv, no first pool).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        aux_logits: bool = True,
        branch3_kernel: int = 3,
        transform_input: bool = False,
        dropout: float = 0.4,
        dropout_aux: float = 0.7,
        small_input: bool = False,
    ):
        super().__init__()
        if branch3_kernel not in (3, 5):
            raise ValueError(f"branch3_kernel must be 3 (torchvision) or 5 (the paper); got {branch3_kernel}")
        if transform_input and in_channels not in (1, 3):
            raise ValueError(f"transform_input re-normalises RGB (or grey) input; it needs in_channels 3 or 1, got "
                             f"{in_channels}")
        self.transform_input = transform_input
        if small_input:
            self.conv1 = ConvBN(in_channels, 64, 3, padding=1)
            self.maxpool1 = nn.Identity()
        else:
            self.conv1 = ConvBN(in_channels, 64, 7, stride=2, padding=3)
            self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = ConvBN(64, 64, 1)
        self.conv3 = ConvBN(64, 192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        channels = 192
        for name, widths in INCEPTION_TABLE.items():
            module = Inception(channels, *widths, branch3_kernel=branch3_kernel)
            self.add_module(f"inception{name}", module)
            channels = module.out_channels
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        if aux_logits and num_classes > 0:  # 0: a feature extractor, no auxiliary heads (as reset_classifier(0))
            self.aux1 = InceptionAux(self.inception4a.out_channels, num_classes, dropout_aux)
            self.aux2 = InceptionAux(self.inception4d.out_channels, num_classes, dropout_aux)
        else:
            self.aux1 = self.aux2 = None
        self.num_features = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                _trunc_normal_(m.weight, std=0.01, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def aux_logits(self) -> bool:
        return self.aux1 is not None

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        # From torchvision's ImageNet normalisation ((x - mean) / std) to (x - 0.5) / 0.5 per channel. A grey input is
        # normalised with the channels' average mean and std (data.normalize=imagenet): mapped back with those, it is
        # the grey image's (x - 0.5) / 0.5, which the summed RGB filters of conv1 see as the RGB net sees the image
        # repeated three times.
        mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        if x.shape[1] == 1:
            mean, std = mean.mean(dim=1, keepdim=True), std.mean(dim=1, keepdim=True)
        return x * (std / 0.5) + (mean - 0.5) / 0.5

    def _trunk(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.transform_input:
            x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.run_blocks([self.inception3a, self.inception3b], x))
        x = self.run_block(self.inception4a, x)
        aux = [self.aux1(x)] if with_aux else []
        x = self.run_blocks([self.inception4b, self.inception4c, self.inception4d], x)
        if with_aux:
            aux.append(self.aux2(x))
        x = self.maxpool4(self.run_block(self.inception4e, x))
        x = self.run_blocks([self.inception5a, self.inception5b], x)
        return x, aux

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The inception5b feature map (N, 1024, H/32, W/32); the auxiliary heads do not run."""
        return self._trunk(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, dropout, then the classifier (skipped when ``pre_logits``)."""
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | AuxOutputs:
        """Logits; in training mode with auxiliary heads, :class:`AuxOutputs` (logits, aux1, aux2)."""
        with_aux = self.training and self.aux_logits
        features, aux = self._trunk(x, with_aux)
        logits = self.forward_head(features)
        return AuxOutputs(logits, *aux) if with_aux else logits

    def get_classifier(self) -> nn.Module:
        return self.fc

    def aux_classifiers(self) -> list[nn.Module]:
        """The auxiliary heads' logits layers (empty without the heads): a classifier of another size than a
        checkpoint's leaves them fresh too."""
        return [self.aux1.fc2, self.aux2.fc2] if self.aux_logits else []

    def reset_classifier(self, num_classes: int) -> None:
        """New logits layers for ``num_classes``: the main one and the auxiliary heads' last layers (0: no classifier,
        and no auxiliary heads, since a feature extractor has no use for them)."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if not self.aux_logits:
            return
        if num_classes > 0:
            for aux in (self.aux1, self.aux2):
                aux.fc2 = nn.Linear(aux.fc2.in_features, num_classes)
        else:
            self.aux1 = self.aux2 = None


@register_model(family="googlenet", input_size=(224, 224))
def googlenet(**options) -> GoogLeNet:
    """GoogLeNet / Inception v1 (Szegedy et al. 2015) with auxiliary classifiers; see :class:`GoogLeNet`."""
    return GoogLeNet(**options)
