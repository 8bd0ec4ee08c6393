"""Feature maps of every stage, the input of detection and segmentation heads (timm's ``features_only``).

``create_model(name, features_only=True, out_indices=(1, 2, 3, 4))`` returns a module whose forward gives a list of
feature maps, one per index, in the order given. Index 0 is the stem (conv1, BN, ReLU: stride 2 on the ImageNet
nets, taken before the max pooling, as timm does), indices 1.. the stages: conv2_x .. conv5_x of Table 1
(``layer1`` .. ``layer4``) for the ImageNet nets, the three stages of 16, 32 and 64 filters for the CIFAR nets
(section 4.2). Negative indices count from the deepest map, as in timm (-1: the last stage).

``module.feature_info`` says what each returned map is: ``channels()``, ``reduction()`` (input size over map size)
and ``module_name()`` are lists in the order of ``out_indices``; ``get_dicts()`` gives ``{num_chs, reduction, module,
index}`` per map. Every model built on :class:`~deepres.models.resnet.ResNet` (the ImageNet and CIFAR ResNets and
plain nets, ResNeXt, wide, SE and deformable ResNets) gives its stem and stages as above (:class:`ResNetFeatures`).

The other families (AlexNet, VGG, GoogLeNet, DenseNet, EfficientNet) give one map per resolution of their
``forward_features`` (:class:`HookFeatures`): at each resolution the output of the last module (a child of the model or
of its ``features``) that computes at it, the deepest map being ``forward_features``' own output (DenseNet's after its
final ReLU). A model whose ``forward_features`` ends in a head conv that is no stage (EfficientNet's 1x1 conv to 1,280
channels) has ``forward_stages``, the same without it: that is run instead, and the head's weights stay out of the
feature module (as in timm). Which modules those are is read once from a forward on the meta device at the model's
native input size (no memory, no arithmetic); ``reduction`` is that resolution's stride, rounded to a power of two
(AlexNet's 224 -> 55 is 4). VGG-16: 64, 128, 256, 512, 512 channels at 1, 2, 4, 8, 16 and 512 at 32; EfficientNet-B0:
16, 24, 40, 112, 320 at 2 .. 32, timm's channels.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from .checkpointing import GradCheckpointing

__all__ = ["FeatureInfo", "HookFeatures", "ResNetFeatures", "feature_extractor", "feature_info", "resolve_out_indices"]

RESNET_FAMILIES = "resnet*, plain*, resnext50_32x4d, wide_resnet50_2, se_resnet*, deform_resnet50"
SUPPORTED = (f"{RESNET_FAMILIES} (stem and stages); alexnet, vgg*, googlenet, densenet*, efficientnet_b* (one map per "
             "resolution)")


class FeatureInfo:
    """What the returned feature maps are. ``info`` describes every feature map the model has (stem first);
    ``out_indices`` picks the returned ones. Methods taking ``idx`` index the returned maps (None: all of them)."""

    def __init__(self, info: Sequence[dict], out_indices: Sequence[int]):
        self.info = [{**entry, "index": i} for i, entry in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None):
        """``key`` of the returned map ``idx`` (a list for None or a sequence of positions)."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [self.info[self.out_indices[i]][key] for i in idx]
        return self.info[self.out_indices[idx]][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None):
        """The description of each returned map (a dict, restricted to ``keys`` when given)."""
        if isinstance(idx, int):
            return self._dict(self.out_indices[idx], keys)
        positions = range(len(self.out_indices)) if idx is None else idx
        return [self._dict(self.out_indices[p], keys) for p in positions]

    def _dict(self, index: int, keys: Sequence[str] | None) -> dict:
        entry = self.info[index]
        return dict(entry) if keys is None else {k: entry[k] for k in keys}

    def channels(self, idx: int | Sequence[int] | None = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None):
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None):
        return self.get("module", idx)

    def __len__(self) -> int:
        return len(self.out_indices)

    def __getitem__(self, position: int) -> dict:
        return self.get_dicts(idx=position)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.get_dicts()})"


def _is_resnet(model: nn.Module) -> bool:
    # Duck typing: the ResNet class lives above this module's imports (resnet.py imports the registry, which
    # imports this module), and every family built on it shares these names.
    if not all(isinstance(getattr(model, n, None), nn.Module) for n in ("conv1", "bn1", "relu", "maxpool")):
        return False
    num_stages = getattr(model, "num_stages", None)
    return isinstance(num_stages, int) and all(
        isinstance(getattr(model, f"layer{i}", None), nn.Sequential) for i in range(1, num_stages + 1))


def _stride(module: nn.Module) -> int:
    stride = getattr(module, "stride", 1)
    return stride[0] if isinstance(stride, tuple) else int(stride)


def _block_stride(block: nn.Module) -> int:
    # The convs of the residual branch (conv1, conv2, ...): the shortcut's stride is the same by construction.
    return math.prod(_stride(m) for m in block.children() if isinstance(m, nn.Conv2d))


def _channels(norm: nn.Module) -> int:
    return norm.weight.shape[0]  # a BN layer or a FrozenBatchNorm2d (detection), which has no num_features


def _resnet_info(model: nn.Module) -> list[dict]:
    reduction = _stride(model.conv1)
    info = [{"num_chs": _channels(model.bn1), "reduction": reduction, "module": "relu"}]
    reduction *= _stride(model.maxpool) if isinstance(model.maxpool, nn.MaxPool2d) else 1
    for i in range(1, model.num_stages + 1):
        stage = getattr(model, f"layer{i}")
        reduction *= math.prod(_block_stride(block) for block in stage)
        info.append({"num_chs": _channels(stage[-1].last_bn), "reduction": reduction, "module": f"layer{i}"})
    return info


def _model_name(model: nn.Module) -> str:
    return getattr(model, "model_name", type(model).__name__)


def resolve_out_indices(out_indices: Sequence[int] | None, count: int, name: str) -> tuple[int, ...]:
    """``out_indices`` with negative indices resolved (None: every map), checked against ``count`` maps."""
    if out_indices is None:
        return tuple(range(count))
    if not isinstance(out_indices, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
        raise TypeError(f"model '{name}': out_indices must be a sequence of ints, e.g. (1, 2, 3, 4); "
                        f"got {out_indices!r}")
    allowed = f"{-count}..{count - 1} (0: the stem, 1..{count - 1}: the stages, negative: from the deepest)"
    if not out_indices:
        raise ValueError(f"model '{name}': out_indices is empty; pick indices in {allowed}")
    bad = [i for i in out_indices if not -count <= i < count]
    if bad:
        raise ValueError(f"model '{name}' has {count} feature maps: out_indices must be in {allowed}; "
                         f"got {tuple(out_indices)}")
    resolved = tuple(i % count for i in out_indices)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"model '{name}': out_indices {tuple(out_indices)} name the same map twice "
                         f"(as {resolved})")
    return resolved


HOOKED_FAMILIES = ("AlexNet", "VGG", "GoogLeNet", "DenseNet", "EfficientNet")


def _trunk_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose outputs may be feature maps: the model's children and those of its ``features``, in the
    order they are registered."""
    found = {}
    for name, module in model.named_children():
        found[name] = module
        if name == "features":
            found.update({f"features.{n}": m for n, m in module.named_children()})
    return found


def _input_channels(model: nn.Module) -> int:
    return next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def _probe(model: nn.Module) -> tuple[list[tuple[str, tuple]], set[str], tuple, tuple]:
    """The trunk's forward (:func:`_trunk_forward`) on the meta device at the model's native input size (the model's
    own tensors untouched):
    the 4-D outputs of the trunk modules in the order they ran, the names of the trunk modules that ran, the output's
    shape and the input size."""
    size = tuple(getattr(model, "input_size", None) or (224, 224))
    shapes, ran = [], set()

    def record(name):
        def hook(module, inputs, out):
            ran.add(name)
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                shapes.append((name, tuple(out.shape)))
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in _trunk_modules(model).items()]
    meta = {f"model.{name}": torch.empty_like(t, device="meta") for name, t in
            list(model.named_parameters()) + list(model.named_buffers())}
    modes = [(module, module.training) for module in model.modules()]  # restored one by one (a frozen BN stays so)
    try:
        model.eval()
        x = torch.empty(1, _input_channels(model), *size, device="meta")
        final = torch.func.functional_call(_ForwardFeatures(model), meta, (x,))
    finally:
        for module, training in modes:
            module.training = training
        for hook in hooks:
            hook.remove()
    return shapes, ran, tuple(final.shape), size


def _hooked_info(model: nn.Module) -> list[dict]:
    """One map per resolution of ``forward_features`` (see the module doc)."""
    shapes, _, final, size = _probe(model)
    last_at = {}
    for name, shape in shapes:
        last_at[shape[-2:]] = (name, shape[1])
    info = []
    for (h, _), (name, channels) in sorted(last_at.items(), key=lambda item: -item[0][0]):
        if h > final[-2]:  # the deepest resolution is the trunk's own output, below
            info.append({"num_chs": int(channels), "reduction": 2 ** round(math.log2(size[0] / h)), "module": name})
    info.append({"num_chs": int(final[1]), "reduction": 2 ** round(math.log2(size[0] / final[-2])),
                 "module": _trunk_forward(model)})
    return info


def _trunk_forward(model: nn.Module) -> str:
    """The method that computes the maps: ``forward_stages`` where the model has one (its ``forward_features``
    without a head conv), else ``forward_features``."""
    return "forward_stages" if hasattr(model, "forward_stages") else "forward_features"


class _ForwardFeatures(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, _trunk_forward(self.model))(x)


def feature_info(model: nn.Module, out_indices: Sequence[int] | None = None) -> FeatureInfo:
    """The :class:`FeatureInfo` of ``model``'s maps ``out_indices`` (None: all); a ``ValueError`` naming the model
    when its family does not support feature extraction or an index is out of range."""
    name = _model_name(model)
    if _is_resnet(model):
        info = _resnet_info(model)
    elif type(model).__name__ in HOOKED_FAMILIES and hasattr(model, "forward_features"):
        info = _hooked_info(model)
    else:
        raise ValueError(f"model '{name}' ({type(model).__name__}) does not support features_only; these do: "
                         f"{SUPPORTED}")
    return FeatureInfo(info, resolve_out_indices(out_indices, len(info), name))


class ResNetFeatures(GradCheckpointing, nn.Module):
    """The stem and stages of a ResNet; forward returns the maps ``out_indices`` picks, as a list in that order.

    The children are the model's own modules (shared, not copied) under the same names, registered in the order
    they run: ``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` ... So the model's state dict loads (its
    classifier aside) and torchvision's ``BackboneWithFPN`` can run the children one after another. Stages deeper
    than the deepest index are left out.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None):
        info = feature_info(model, out_indices)
        super().__init__()
        self.feature_info = info
        self.out_indices = info.out_indices
        self.num_stages = max(self.out_indices)
        self.conv1, self.bn1, self.relu, self.maxpool = model.conv1, model.bn1, model.relu, model.maxpool
        for i in range(1, self.num_stages + 1):
            self.add_module(f"layer{i}", getattr(model, f"layer{i}"))
        for attr in ("model_name", "input_size", "pretrained_cfg"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        maps = [x]
        if self.num_stages:
            x = self.maxpool(x)
        for stage in self.stages():
            x = self.run_sequence(stage, x)
            maps.append(x)
        return [maps[i] for i in self.out_indices]


class HookFeatures(nn.Module):
    """The maps of a non-ResNet family (see the module doc): forward runs the model's ``forward_features`` (or
    ``forward_stages``) and returns the outputs of the modules ``feature_info`` names, as a list in the order of
    ``out_indices``.

    The children of the model that it runs are registered under their own names (of ``features``, the children that
    run), so the model's state dict loads (its classifier, auxiliary heads and a head conv aside) and ``.to()`` /
    ``.train()`` reach all of them."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None):
        info = feature_info(model, out_indices)
        super().__init__()
        self.feature_info = info
        self.out_indices = info.out_indices
        object.__setattr__(self, "_model", model)  # not a child: its classifier stays out of this module
        ran = _probe(model)[1]
        for name, module in model.named_children():
            if name not in ran and not any(r.startswith(f"{name}.") for r in ran):
                continue  # not what the trunk runs: the classifier, its hidden layers, auxiliary heads
            if name == "features" and isinstance(module, nn.Sequential):  # the part of it that runs (same names)
                module = nn.Sequential(OrderedDict((n, m) for n, m in module.named_children()
                                                   if f"features.{n}" in ran))
            self.add_module(name, module)
        self._points = [info.info[i]["module"] for i in self.out_indices]
        self._forward = _trunk_forward(model)
        # The modules whose outputs are returned (a plain list: they are registered above, as children or in them).
        modules = _trunk_modules(model)
        self._hooked = [(name, modules[name]) for name in set(self._points) if name != self._forward]
        for attr in ("model_name", "input_size", "pretrained_cfg"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The model's own gradient checkpointing (see :mod:`deepres.models.checkpointing`)."""
        self._model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps: dict[str, torch.Tensor] = {}
        hooks = [module.register_forward_hook(lambda m, i, out, name=name: maps.__setitem__(name, out))
                 for name, module in self._hooked]
        try:
            maps[self._forward] = getattr(self._model, self._forward)(x)
        finally:
            for hook in hooks:
                hook.remove()
        return [maps[name] for name in self._points]


def feature_extractor(model: nn.Module, out_indices: Sequence[int] | None = None) -> nn.Module:
    """Wrap a built model (its weights already loaded) so that forward returns the feature maps ``out_indices``:
    a :class:`ResNetFeatures` for the ResNet families, a :class:`HookFeatures` for the others."""
    return ResNetFeatures(model, out_indices) if _is_resnet(model) else HookFeatures(model, out_indices)
