"""ResNeXt and wide ResNets: ResNet-50 with a split or a wider bottleneck.

- ResNeXt (Xie et al. 2017, "Aggregated Residual Transformations for Deep Neural Networks", arXiv:1611.05431):
  the bottleneck's 3x3 conv becomes a grouped conv of cardinality 32, 4 channels a group at the first stage
  (``resnext50_32x4d``, Table 1: 25.0M parameters, 4.2 GMACs).
- Wide ResNet-50-2 (Zagoruyko and Komodakis 2016, "Wide Residual Networks", arXiv:1605.07146, ImageNet section):
  the bottleneck's inner width doubled (68.9M parameters).

Both are :func:`~deepres.models.resnet.imagenet_resnet` with ``groups`` / ``width_per_group`` (see
:class:`~deepres.models.resnet.Bottleneck`). Their papers stride on the 3x3 conv (ResNeXt section 4: "as suggested
in [fb.resnet.torch]"), the default ``stride_on="3x3"`` here; torchvision's state dicts load unchanged.
``small_input=True`` gives the CIFAR stem (3x3 conv, no max pool).
"""

from __future__ import annotations

from .registry import register_model
from .resnet import ResNet, imagenet_resnet


@register_model(family="resnext", input_size=(224, 224))
def resnext50_32x4d(**options) -> ResNet:
    """ResNeXt-50 (32x4d): cardinality 32, bottleneck width 4 (Xie et al. 2017, Table 1)."""
    return imagenet_resnet(50, groups=32, width_per_group=4, **{"stride_on": "3x3", **options})


@register_model(family="resnext", input_size=(224, 224))
def wide_resnet50_2(**options) -> ResNet:
    """Wide ResNet-50-2: ResNet-50 with bottlenecks twice as wide inside (Zagoruyko and Komodakis 2016)."""
    return imagenet_resnet(50, width_per_group=128, **{"stride_on": "3x3", **options})
