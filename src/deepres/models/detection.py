"""Our ResNets as backbones of torchvision's detectors (He et al. 2016, section 4.3 and appendix A).

The paper detects objects with Faster R-CNN (Ren et al. 2015) on ResNet-101. Two ways to put any of our ResNets
into :class:`torchvision.models.detection.FasterRCNN`:

- **C4, the paper's design** (:func:`faster_rcnn_c4`): the layers of stride at most 16 (conv1 .. conv4_x, 91 conv
  layers in ResNet-101) compute one feature map of the whole image, shared by the region proposal network and the
  detector; each region is pooled from it "before conv5_1", then all of conv5_x and the global average pooling run
  per region, "playing the roles of VGG-16's fc layers", and two sibling layers classify and regress the box
  (appendix A). Regions are pooled with RoIAlign to 14x14, which conv5_1's stride brings to 7x7 (the C4 form of
  Mask R-CNN and Detectron); ``out_channels`` is 1024 for ResNet-50/101/152 (256 for ResNet-18/34).
- **VGG-16, the paper's baseline** (:func:`faster_rcnn_vgg`): Faster R-CNN as Ren et al. built it, the detector
  the paper's Tables 7 and 8 compare ResNet-101 against: conv1_1 .. conv5_3 (stride 16, 512 channels) shared, each
  region pooled 7x7 into fc6 and fc7 (4096 each, with dropout), then the two sibling layers.
- **FPN** (:func:`resnet_fpn_backbone`, :func:`faster_rcnn_fpn`): a feature pyramid (Lin et al. 2017) on
  conv2_x .. conv5_x, torchvision's own ``BackboneWithFPN``. Its parameter names are torchvision's
  (``backbone.body.layer1.0.conv1.weight``, ``backbone.fpn.inner_blocks.0.0.weight`` ...), so the state dict of
  torchvision's ``fasterrcnn_resnet50_fpn`` loads into ``faster_rcnn_fpn("resnet50", 91, model_options={"stride_on":
  "3x3"})`` unchanged.

Freezing follows torchvision's convention. ``trainable_layers`` counts the stages that train from the top (conv5_x
first; the stem, conv1 with its BN, is the last): 3 with pretrained weights (conv1 and conv2_x frozen, as Detectron),
all of them from scratch. ``frozen_bn`` turns every BN layer into :class:`torchvision.ops.misc.FrozenBatchNorm2d`,
a fixed per-channel scale and offset; the default is on with pretrained weights, as the paper ("the BN layers are
fixed during fine-tuning for object detection ... mainly for reducing memory consumption", appendix A), and off from
scratch, where BN statistics are still to be learned. Class counts include the background, as torchvision's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .features import RESNET_FAMILIES, ResNetFeatures, _is_resnet, feature_extractor
from .registry import create_model

__all__ = [
    "ResNetC4Backbone",
    "ResNetC5Head",
    "VGGConvBackbone",
    "VGGFcHead",
    "faster_rcnn_c4",
    "faster_rcnn_fpn",
    "faster_rcnn_vgg",
    "freeze_batch_norm",
    "freeze_stages",
    "resnet_fpn_backbone",
]


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every :class:`~torch.nn.BatchNorm2d` in ``module`` (in place; the module itself if it is one) by a
    :class:`~torchvision.ops.misc.FrozenBatchNorm2d` holding its statistics and affine parameters: the same function
    as the BN layer in eval mode, with nothing left to train or update. Returns ``module`` (or its replacement)."""
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None:
            raise ValueError(f"cannot freeze {module}: it keeps no running statistics (track_running_stats=False)")
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps).to(module.running_mean)
        with torch.no_grad():
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
        return frozen
    for name, child in module.named_children():
        replacement = freeze_batch_norm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def _stage_names(model: nn.Module) -> list[str]:
    """The freezing units of a ResNet from the top: ``layerN`` .. ``layer1``, then the stem ``conv1``."""
    return [f"layer{i}" for i in range(model.num_stages, 0, -1)] + ["conv1"]


def freeze_stages(model: nn.Module, trainable_layers: int) -> nn.Module:
    """Stop the gradients of all but the top ``trainable_layers`` stages of a ResNet (or its feature extractor):
    0 freezes every stage, ``num_stages + 1`` none; the stem's BN goes with conv1. torchvision's convention
    (``trainable_backbone_layers``, 0..5 for the ImageNet nets). BN layers of frozen stages still update their
    running statistics in training mode unless they are frozen too (:func:`freeze_batch_norm`)."""
    names = _stage_names(model)
    _check_trainable(trainable_layers, len(names), f"stages {', '.join(names)}, top first")
    frozen = names[trainable_layers:]
    if "conv1" in frozen:
        frozen.append("bn1")
    for name in frozen:
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(False)
    return model


def _check_trainable(trainable_layers, count: int, units: str) -> None:
    """``trainable_layers`` an int in 0..``count``, or a ValueError naming the ``units`` it counts."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not (
            0 <= trainable_layers <= count):
        raise ValueError(f"trainable_layers must be an int in 0..{count} ({units}); got {trainable_layers!r}")


def _resnet(name: str, pretrained: bool, trainable_layers: int | None, frozen_bn: bool | None,
            model_options: dict | None) -> nn.Module:
    """Every stage of the ResNet ``name`` (its classifier dropped), weights loaded, BN and stages frozen as asked.
    A model that is no ResNet fails here with a ValueError naming it, before any weights are downloaded."""
    with torch.device("meta"):  # the family first, before any weights are downloaded
        if not _is_resnet(create_model(name, **(model_options or {}))):
            raise ValueError(f"model '{name}' is no ResNet: the detection backbones take a model built on the ResNet "
                             f"class ({RESNET_FAMILIES}); faster_rcnn_vgg takes the VGG nets")
    model = create_model(name, pretrained=pretrained, features_only=True, **(model_options or {}))
    if frozen_bn is None:
        frozen_bn = pretrained
    if trainable_layers is None:
        trainable_layers = min(3, model.num_stages + 1) if pretrained else model.num_stages + 1
    if frozen_bn:
        freeze_batch_norm(model)
    return freeze_stages(model, trainable_layers)


def resnet_fpn_backbone(
    name: str,
    *,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    returned_layers: Sequence[int] | None = None,
    out_channels: int = 256,
    extra_blocks: ExtraFPNBlock | None = None,
    norm_layer: type[nn.Module] | None = None,
    model_options: dict | None = None,
) -> BackboneWithFPN:
    """One of our ResNets under a feature pyramid: a torchvision ``BackboneWithFPN`` for ``FasterRCNN``.

    Args:
        name: a registered ResNet (``resnet50``, ``resnet101``, ``resnext50_32x4d``, ``resnet20`` ...).
        pretrained: load the published ImageNet weights (``create_model(name, pretrained=True)``).
        trainable_layers: stages that train, from the top (None: 3 with pretrained weights, all without).
        frozen_bn: BN as FrozenBatchNorm2d (None: the same as ``pretrained``).
        returned_layers: the feature maps the pyramid is built on, as ``out_indices`` (0 the stem, 1.. the
            stages; default all stages, conv2_x .. conv5_x). Output keys are ``"0"``, ``"1"`` ... plus ``"pool"``.
        out_channels: the pyramid's width (256, Lin et al. 2017).
        extra_blocks: extra levels after the last (default torchvision's ``LastLevelMaxPool``, the ``"pool"`` map).
        norm_layer: a normalisation layer inside the pyramid's convs (None: none, as torchvision).
        model_options: further options of ``create_model`` (``stride_on``, ``shortcut``, ...).
    """
    model = _resnet(name, pretrained, trainable_layers, frozen_bn, model_options)
    if returned_layers is None:
        returned_layers = tuple(range(1, model.num_stages + 1))
    body = feature_extractor(model, returned_layers)
    info = body.feature_info
    # BackboneWithFPN runs the body's children in order (the feature extractor registers them so) and takes the
    # named ones' outputs.
    if list(info.out_indices) != sorted(info.out_indices):
        raise ValueError(f"model '{name}': returned_layers must run from shallow to deep; got {tuple(returned_layers)}")
    return_layers = {module: str(i) for i, module in enumerate(info.module_name())}
    return BackboneWithFPN(body, return_layers, info.channels(), out_channels,
                           extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
                           norm_layer=norm_layer)


def faster_rcnn_fpn(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    returned_layers: Sequence[int] | None = None,
    model_options: dict | None = None,
    **kwargs,
) -> FasterRCNN:
    """torchvision's Faster R-CNN with FPN on one of our ResNets (:func:`resnet_fpn_backbone`).

    ``kwargs`` go to :class:`~torchvision.models.detection.FasterRCNN` (``min_size``, ``max_size``,
    ``rpn_anchor_generator``, ``box_batch_size_per_image`` ...). Anchors default to torchvision's: one size per
    pyramid level, 32 doubling upwards, three aspect ratios; regions are pooled 7x7 from the stage maps.
    """
    backbone = resnet_fpn_backbone(name, pretrained=pretrained, trainable_layers=trainable_layers,
                                   frozen_bn=frozen_bn, returned_layers=returned_layers, model_options=model_options)
    num_maps = len(backbone.body.return_layers)
    levels = num_maps + 1  # the extra "pool" level
    kwargs.setdefault("rpn_anchor_generator",
                      AnchorGenerator(tuple((32 * 2**i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels))
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign([str(i) for i in range(num_maps)], 7, sampling_ratio=2))
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


class ResNetC4Backbone(nn.Module):
    """conv1 .. conv(N-1)_x of a ResNet: one map of the whole image (stride 16 on ImageNet nets) named ``"0"``."""

    def __init__(self, body: ResNetFeatures):
        super().__init__()
        if len(body.out_indices) != 1:
            raise ValueError(f"a C4 backbone returns one map; the body returns {len(body.out_indices)}")
        self.body = body
        self.out_channels = body.feature_info.channels(0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(x)[0])])


class ResNetC5Head(nn.Sequential):
    """The last stage (conv5_x) on each pooled region, then global average pooling: (R, C, 14, 14) -> (R, C')."""

    def __init__(self, stage: nn.Sequential, stage_name: str = "layer4"):
        super().__init__(OrderedDict([(stage_name, stage), ("avgpool", nn.AdaptiveAvgPool2d(1)),
                                      ("flatten", nn.Flatten(1))]))
        self.out_channels = stage[-1].last_bn.weight.shape[0]  # BN or FrozenBatchNorm2d


def faster_rcnn_c4(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    anchor_sizes: Sequence[int] = (128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    roi_size: int = 14,
    model_options: dict | None = None,
    **kwargs,
) -> FasterRCNN:
    """The paper's detector: Faster R-CNN with conv1 .. conv4_x as the shared backbone and conv5_x as the per-region
    head (appendix A; "C4"). Any of our ResNets works; on a CIFAR net the last of its three stages is the head.

    Args:
        name: a registered ResNet (``resnet101`` as the paper, ``resnet50`` ...).
        num_classes: object classes plus the background.
        pretrained, trainable_layers, frozen_bn, model_options: as :func:`resnet_fpn_backbone`; the head is the top
            stage, so ``trainable_layers=0`` freezes it too.
        anchor_sizes, aspect_ratios: the region proposal network's anchors at each position of the stride-16 map
            (Ren et al. 2015, section 3.3: box areas 128^2, 256^2, 512^2 and ratios 1:2, 1:1, 2:1).
        roi_size: the RoIAlign output (14; conv5_1 strides it to 7).
        kwargs: further :class:`~torchvision.models.detection.FasterRCNN` arguments. The defaults differing from
            torchvision's are the paper's: shorter side 600 pixels (``min_size``, with ``max_size`` 1000 as Faster
            R-CNN) and 300 proposals per image at test (``rpn_post_nms_top_n_test``).
    """
    model = _resnet(name, pretrained, trainable_layers, frozen_bn, model_options)
    if model.num_stages < 2:
        raise ValueError(f"model '{name}' has {model.num_stages} stage; a C4 detector needs a backbone and a head")
    last = model.num_stages
    backbone = ResNetC4Backbone(feature_extractor(model, (last - 1,)))
    head = ResNetC5Head(getattr(model, f"layer{last}"), f"layer{last}")
    return _single_map_detector(backbone, head, num_classes, anchor_sizes, aspect_ratios, roi_size, kwargs)


def _single_map_detector(backbone: nn.Module, head: nn.Module, num_classes: int, anchor_sizes: Sequence[int],
                         aspect_ratios: Sequence[float], roi_size: int, kwargs: dict) -> FasterRCNN:
    """Faster R-CNN on one stride-16 map (the C4 and VGG detectors): the paper's image size and test proposals unless
    ``kwargs`` set them, one anchor set, regions pooled ``roi_size`` square into ``head``."""
    kwargs.setdefault("min_size", 600)
    kwargs.setdefault("max_size", 1000)
    kwargs.setdefault("rpn_post_nms_top_n_test", 300)
    kwargs.setdefault("rpn_anchor_generator", AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),)))
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(["0"], roi_size, sampling_ratio=2))
    return FasterRCNN(backbone, num_classes=None, box_head=head,
                      box_predictor=FastRCNNPredictor(head.out_channels, num_classes), **kwargs)


class VGGConvBackbone(nn.Module):
    """A VGG net's convolutions without their last max pooling (conv1_1 .. conv5_3 and its ReLU for VGG-16): one map
    of the whole image at stride 16, named ``"0"``."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        if not isinstance(features[-1], nn.MaxPool2d):
            raise ValueError("a VGG conv stack ends with a max pooling, dropped here for stride 16")
        self.body = features[:-1]
        self.out_channels = [m for m in self.body if isinstance(m, nn.Conv2d)][-1].out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(x))])


class VGGFcHead(nn.Sequential):
    """fc6 and fc7 of a VGG net (each with its ReLU and dropout) on each pooled region: (R, 512, 7, 7) -> (R, 4096)."""

    def __init__(self, classifier: nn.Sequential):
        layers = list(classifier)
        hidden = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
        if len(hidden) != 3:
            raise ValueError(f"a VGG classifier has three linear layers (fc6, fc7, fc8); got {len(hidden)}")
        super().__init__(nn.Flatten(1), *layers[: hidden[-1]])  # all but the class layer fc8
        self.out_channels = layers[hidden[1]].out_features


def _vgg_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """The freezing units of a VGG detector from the top: the fc head, then conv5_x .. conv1_x (split at the pools)."""
    blocks, block = [], []
    for module in model.backbone.body:
        block.append(module)
        if isinstance(module, nn.MaxPool2d):
            blocks.append(block)
            block = []
    blocks.append(block)  # conv5_x: its pooling was dropped
    return [[model.roi_heads.box_head], *reversed(blocks)]


def faster_rcnn_vgg(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    frozen_bn: bool | None = None,
    anchor_sizes: Sequence[int] = (128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    model_options: dict | None = None,
    **kwargs,
) -> FasterRCNN:
    """Faster R-CNN on a VGG net (Ren et al. 2015): the detector the paper replaces VGG-16 by ResNet-101 in (section
    4.3, Tables 7 and 8), for the same comparison here.

    The convolutions up to conv5_3 compute one stride-16 map of the whole image for the region proposal network and
    the detector; each region is pooled to the grid VGG's fc6 takes (7x7; RoIAlign, where Faster R-CNN max-pooled)
    and runs through fc6 and fc7 with their dropout, then the two sibling layers classify and regress the box.

    Args:
        name: ``vgg16`` (the paper's baseline), or another of ``vgg11`` .. ``vgg19``, ``vgg*_bn``.
        num_classes: object classes plus the background.
        pretrained: the published ImageNet weights (fc6 and fc7 included).
        trainable_layers: units that train from the top: the fc head first, then conv5_x .. conv1_x (0..6). None:
            4 with pretrained weights (conv3_1 and up, as Fast and Faster R-CNN fine-tune VGG-16), all without.
        frozen_bn: the ``_bn`` nets' BN as FrozenBatchNorm2d (None: the same as ``pretrained``).
        anchor_sizes, aspect_ratios, model_options, kwargs: as :func:`faster_rcnn_c4` (shorter side 600, at most
            1000, 300 proposals at test, unless set).
    """
    from .vgg import VGG

    with torch.device("meta"):  # the family first, before any weights are downloaded
        if not isinstance(create_model(name, **(model_options or {})), VGG):
            raise ValueError(f"model '{name}' is no VGG net: faster_rcnn_vgg takes vgg11 .. vgg19 or their _bn forms")
    vgg = create_model(name, pretrained=pretrained, **(model_options or {}))
    backbone, head = VGGConvBackbone(vgg.features), VGGFcHead(vgg.classifier)
    detector = _single_map_detector(backbone, head, num_classes, anchor_sizes, aspect_ratios, vgg.avgpool.output_size,
                                    kwargs)
    if frozen_bn if frozen_bn is not None else pretrained:
        freeze_batch_norm(backbone)
    units = _vgg_blocks(detector)
    if trainable_layers is None:
        trainable_layers = 4 if pretrained else len(units)
    _check_trainable(trainable_layers, len(units), "the fc head, then conv5_x .. conv1_x")
    for unit in units[trainable_layers:]:
        for module in unit:
            for parameter in module.parameters():
                parameter.requires_grad_(False)
    return detector
