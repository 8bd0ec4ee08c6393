"""Model zoo: every model is registered by name and shares one interface.

``forward(x) -> logits``, ``forward_features(x)`` (the last feature map), ``forward_head(features)`` and
``reset_classifier(num_classes)``. Build one with :func:`create_model`; list names with :func:`list_models`.
GoogLeNet in training mode returns :class:`AuxOutputs` ``(logits, aux1, aux2)``, main logits first.
"""

# Importing a family module registers its models.
from . import alexnet, deform, densenet, efficientnet, googlenet, resnet, resnext, senet, speedrun, vgg  # noqa: F401
from .alexnet import AlexNet, ConvFCNet
from .complexity import count_macs, count_parameters, describe_model, describe_models
from .deform import DeformConv2d, DeformConvCPU, deform_resnet
from .densenet import DenseBlock, DenseLayer, DenseNet, Transition, densenet_bc
from .efficientnet import EfficientNet, MBConv, efficientnet
from .features import FeatureInfo, ResNetFeatures, feature_extractor, feature_info
from .googlenet import AuxOutputs, GoogLeNet, Inception, InceptionAux
from .pretrained import eval_transform, pretrained_cfg
from .registry import ModelEntry, create_model, list_models, model_entry, register_model
from .resnet import (
    BasicBlock,
    Bottleneck,
    PlainBlock,
    ResNet,
    ShortcutA,
    cifar_resnet,
    imagenet_resnet,
    load_torchvision_weights,
)
from .senet import SEBasicBlock, SEBottleneck, SqueezeExcite, se_resnet
from .vgg import VGG, vgg

__all__ = [
    "AlexNet",
    "AuxOutputs",
    "BasicBlock",
    "Bottleneck",
    "ConvFCNet",
    "DeformConv2d",
    "DeformConvCPU",
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "EfficientNet",
    "FeatureInfo",
    "GoogLeNet",
    "Inception",
    "InceptionAux",
    "MBConv",
    "ModelEntry",
    "PlainBlock",
    "ResNet",
    "ResNetFeatures",
    "SEBasicBlock",
    "SEBottleneck",
    "ShortcutA",
    "SqueezeExcite",
    "Transition",
    "VGG",
    "cifar_resnet",
    "count_macs",
    "count_parameters",
    "create_model",
    "deform_resnet",
    "densenet_bc",
    "describe_model",
    "describe_models",
    "efficientnet",
    "eval_transform",
    "feature_extractor",
    "feature_info",
    "imagenet_resnet",
    "list_models",
    "load_torchvision_weights",
    "model_entry",
    "pretrained_cfg",
    "register_model",
    "se_resnet",
    "vgg",
]
