"""Model zoo: every model is registered by name and shares one interface.

``forward(x) -> logits``, ``forward_features(x)`` (the last feature map), ``forward_head(features)`` and
``reset_classifier(num_classes)``. Build one with :func:`create_model`; list names with :func:`list_models`.
"""

from . import resnet  # noqa: F401  (registers the ResNet family)
from .complexity import count_macs, count_parameters, describe_model
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

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ModelEntry",
    "PlainBlock",
    "ResNet",
    "ShortcutA",
    "cifar_resnet",
    "count_macs",
    "count_parameters",
    "create_model",
    "describe_model",
    "imagenet_resnet",
    "list_models",
    "load_torchvision_weights",
    "model_entry",
    "register_model",
]
