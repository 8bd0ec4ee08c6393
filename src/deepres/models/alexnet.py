"""AlexNet (Krizhevsky, Sutskever and Hinton 2012, "ImageNet Classification with Deep Convolutional Neural Networks").

Five convolutions (the first 11x11 with stride 4), ReLU after every layer (section 3.1), overlapping 3x3 stride-2 max
pooling (section 3.4), then three fully connected layers with dropout 0.5 in front of the first two (section 4.2).

- ``lrn=True`` adds the paper's local response normalisation after the first two ReLUs (section 3.3: n=5, k=2,
  alpha=1e-4, beta=0.75). It is off by default because torchvision's weights were trained without it. It holds no
  parameters and sits inside the ReLU's slot, so parameter names are the same either way.
- ``small_input=True`` is a CIFAR-size form (32x32): the first conv becomes 5x5 with stride 1, the three overlapping
  pools take 32 to 15, 7 and 3, the head averages to that 3x3 grid and its hidden layers are 1024 wide (5.7M
  parameters instead of 61M, most of which a 32x32 image could not use).
- Widths are torchvision's single-tower ones (64-192-384-256-256), so its state dict loads unchanged (61,100,840
  parameters); the paper's two-GPU split (96-256-384-384-256 with cross-GPU connections only in some layers) is not
  modelled.

:class:`ConvFCNet` is the layout AlexNet and VGG share: a convolutional ``features`` stack, adaptive average pooling to
a fixed grid, and a ``classifier`` of two hidden fully connected layers and the logits layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .checkpointing import GradCheckpointing
from .registry import ClassifierHead, register_model

__all__ = ["AlexNet", "ConvFCNet", "alexnet"]


class ConvFCNet(ClassifierHead, GradCheckpointing, nn.Module):
    """Convolutional features, adaptive average pooling to ``pool_size``, then FC-ReLU-FC-ReLU-FC with dropout 0.5.

    Args:
        features: the convolutional stack; its output has ``feature_channels`` channels.
        pool_size: the grid the last feature map is averaged to (6 for AlexNet, 7 for VGG: their 224x224 map sizes,
            so the pooling is the identity at the native size and any larger input still fits the classifier).
        hidden: width of the two hidden fully connected layers (4096 in both papers).
        dropout_first: dropout in front of each hidden layer (AlexNet, torchvision's order) rather than after (VGG).
    """

    def __init__(
        self,
        features: nn.Sequential,
        feature_channels: int,
        pool_size: int,
        hidden: int,
        num_classes: int,
        dropout: float = 0.5,
        dropout_first: bool = False,
    ):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        layers: list[nn.Module] = []
        for in_features in (feature_channels * pool_size * pool_size, hidden):
            fc = [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
            layers += [nn.Dropout(dropout), *fc] if dropout_first else [*fc, nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity())
        self.classifier = nn.Sequential(*layers)
        self.num_features = hidden
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015: deep stacks of 3x3 convs train from scratch with it (VGG's paper pre-trained the
                # shallow net A to start the deeper ones instead).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)  # both papers: zero-mean Gaussian, standard deviation 0.01
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map, after its max pooling."""
        if not self._checkpointing_now():
            return self.features(x)
        return self.run_blocks(_pooled_groups(self.features), x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling to the fixed grid, the hidden layers, then the logits layer (skipped when ``pre_logits``)."""
        x = torch.flatten(self.avgpool(x), 1)
        *hidden, logits = self.classifier
        for layer in hidden:
            x = layer(x)
        return x if pre_logits else logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised logits layer for ``num_classes`` (0: none, the hidden features come out)."""
        self.classifier[-1] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _pooled_groups(features: nn.Sequential) -> list[nn.Sequential]:
    """The layers of ``features`` in groups that each end with a pooling layer (the last group: whatever follows the
    last pooling), the units gradient checkpointing keeps the inputs of."""
    groups: list[list[nn.Module]] = [[]]
    for layer in features:
        groups[-1].append(layer)
        if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            groups.append([])
    return [nn.Sequential(*group) for group in groups if group]


def _relu(lrn: bool) -> nn.Module:
    relu = nn.ReLU(inplace=True)
    if not lrn:
        return relu
    # Section 3.3: b = a / (k + alpha * sum over n=5 neighbouring channels of a^2)^beta. PyTorch divides alpha by n,
    # so alpha is passed as n * 1e-4 to give the paper's formula.
    return nn.Sequential(relu, nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0))


class AlexNet(ConvFCNet):
    """Conv 11x11/4 (64), pool, conv 5x5 (192), pool, conv 3x3 (384, 256, 256), pool, FC 4096, FC 4096, FC classes."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        lrn: bool = False,
        dropout: float = 0.5,
        small_input: bool = False,
    ):
        stem = (
            nn.Conv2d(in_channels, 64, kernel_size=5, stride=1, padding=2)
            if small_input
            else nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
        )
        features = nn.Sequential(
            stem,
            _relu(lrn),
            nn.MaxPool2d(kernel_size=3, stride=2),  # overlapping: window 3 > stride 2 (section 3.4)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            _relu(lrn),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        pool_size, hidden = (3, 1024) if small_input else (6, 4096)
        super().__init__(
            features, 256, pool_size=pool_size, hidden=hidden, num_classes=num_classes, dropout=dropout,
            dropout_first=True,
        )
        self.lrn = lrn
        # The hidden fully connected layers get He init like the convs. At the papers' standard deviation of 0.01
        # each of them shrinks the signal several-fold, and without batch normalisation the net then sits at chance
        # for a long stretch before its loss moves (the paper countered it with biases of 1). The logits layer keeps
        # the 0.01 of both papers; VGG, whose _bn variants train from the start, keeps torchvision's init throughout.
        for m in list(self.classifier)[:-1]:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


@register_model(family="alexnet", input_size=(224, 224))
def alexnet(**options) -> AlexNet:
    """AlexNet (Krizhevsky et al. 2012); ``lrn=True`` for the paper's local response normalisation."""
    return AlexNet(**options)
