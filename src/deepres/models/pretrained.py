"""Pretrained weights, the way torchvision and timm give them: ``create_model(name, pretrained=True)``.

Every model here whose architecture torchvision publishes ImageNet weights for takes torchvision's default weights,
downloaded once through ``torch.hub`` (its file name carries the SHA-256 prefix torch.hub checks on download) and
cached in ``$TORCH_HOME/hub/checkpoints``. The model is built as the weights were trained: ResNet-50/101/152 with the
stride on the 3x3 convolution (torchvision's "v1.5"; the paper's nets put it on the 1x1), which the build says; an
option that contradicts the weights is an error naming it. ``num_classes`` other than 1,000 keeps every pretrained
layer and gives the model a fresh classifier; ``in_chans=1`` sums the first convolution's RGB filters (exactly the RGB
net on a grey image repeated three times).

``pretrained_cfg(name)`` describes the weights (source, file, input size, resize and crop, mean and std,
interpolation, the 1,000 class names and their published accuracy); ``eval_transform(cfg)`` builds the matching
preprocessing. The CIFAR nets have no published weights: asking for them says which models have some.
GoogLeNet's weights were trained on inputs scaled to [-1, 1]: it is built with ``transform_input=True``, which maps the
ImageNet-normalised input it is given to that (torchvision does the same; with ``in_chans=1``, grey input normalised
with the channels' average mean and std, as ``data.normalize=imagenet`` does); like torchvision's, its auxiliary heads
load the file's untrained ones (built with ``aux_logits=False``, it has none). ``deform_resnet50`` starts from
ResNet-50's weights, as Dai et al. start from an ImageNet-trained ResNet: its offsets start at zero, so it computes
exactly ResNet-50's function until training moves them.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..config import ConfigError

__all__ = ["PRETRAINED", "eval_normalization", "eval_resize", "eval_transform", "fetch_pretrained", "load_pretrained",
           "pretrained_cfg", "pretrained_weights", "read_pretrained"]

# A model that starts from another's weights -> that model (its own parameters, here the offsets, start fresh).
WEIGHTS_OF = {"deform_resnet50": "resnet50"}
# Our name -> the options that build the architecture torchvision's weights were trained as.
PRETRAINED: dict[str, dict] = {
    "resnet18": {}, "resnet34": {},
    "resnet50": {"stride_on": "3x3"}, "resnet101": {"stride_on": "3x3"}, "resnet152": {"stride_on": "3x3"},
    "resnext50_32x4d": {}, "wide_resnet50_2": {},
    "deform_resnet50": {"stride_on": "3x3"},
    "alexnet": {},
    "googlenet": {"transform_input": True},
    **{f"vgg{d}{bn}": {} for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    **{f"densenet{d}": {} for d in (121, 161, 169, 201)},
    **{f"efficientnet_b{i}": {} for i in range(8)},
}


def pretrained_cfg(name: str) -> dict | None:
    """What ``create_model(name, pretrained=True)`` loads, or None when there are no weights for ``name``."""
    if name not in PRETRAINED:
        return None
    from torchvision.models import get_model_weights

    weights = get_model_weights(WEIGHTS_OF.get(name, name)).DEFAULT
    transform = weights.transforms()
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    crop = int(transform.crop_size[0])
    return {
        "source": "torchvision",
        "weights": str(weights),
        "url": weights.url,
        "file_name": weights.url.rsplit("/", 1)[-1],
        "input_size": (3, crop, crop),
        "resize_size": int(transform.resize_size[0]),
        "crop_size": crop,
        "interpolation": transform.interpolation.value,
        "mean": tuple(transform.mean),
        "std": tuple(transform.std),
        "num_classes": len(weights.meta["categories"]),
        "classes": list(weights.meta["categories"]),
        "top1": metrics.get("acc@1"),
        "top5": metrics.get("acc@5"),
        "options": dict(PRETRAINED[name]),
        "weights_of": WEIGHTS_OF.get(name, name),
    }


def eval_resize(cfg: dict):
    """The weights' evaluation resize: the shorter side to ``resize_size`` with their interpolation (antialiased)."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Resize(cfg["resize_size"], interpolation=InterpolationMode(cfg["interpolation"]), antialias=True)


def eval_normalization(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights' mean and std as (3, 1, 1) float32 tensors."""
    return tuple(torch.tensor(cfg[k], dtype=torch.float32).view(3, 1, 1) for k in ("mean", "std"))


def eval_transform(cfg: dict, normalize: bool = True):
    """The preprocessing the weights were evaluated with, for PIL images and uint8 or float (C, H, W) tensors: resize
    the shorter side, centre crop, scale to [0, 1], normalise (``normalize=False``: [0, 1] out, for a model that
    normalises itself). Grey images are repeated to the three channels the weights take, an alpha channel is
    dropped."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.Lambda(_three_channels), eval_resize(cfg), v2.CenterCrop(cfg["crop_size"]),
             v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps + [v2.Normalize(cfg["mean"], cfg["std"])] * normalize + [v2.ToPureTensor()])


def _three_channels(image: torch.Tensor) -> torch.Tensor:
    channels = image.shape[-3]
    if channels in (1, 2):  # grey, grey + alpha
        return image[..., :1, :, :].expand(*image.shape[:-3], 3, *image.shape[-2:]).clone()
    if channels == 4:  # RGBA
        return image[..., :3, :, :].clone()
    if channels != 3:
        raise ValueError(f"an image of {channels} channels; the weights take RGB (3) or grey (1) images")
    return image


# torchvision's DenseNet files predate its module names ("norm.1" for "norm1"); it renames them when loading.
_DENSENET_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _renamed(name: str, state: dict, model: nn.Module) -> dict:
    if name == "googlenet" and not model.aux_logits:  # the file holds the auxiliary heads torchvision trains with
        return {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    if name in WEIGHTS_OF:  # the parameters the other model lacks keep their initial values
        return {**{k: v for k, v in model.state_dict().items() if k not in state}, **state}
    if not name.startswith("densenet"):
        return state
    out = {}
    for key, value in state.items():
        match = _DENSENET_OLD.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _download(cfg: dict) -> dict:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / cfg["file_name"]
    try:
        return torch.hub.load_state_dict_from_url(cfg["url"], map_location="cpu", check_hash=True, progress=False,
                                                  file_name=cfg["file_name"], weights_only=True)
    except (OSError, RuntimeError) as exc:  # no network, or a download whose hash does not match
        raise RuntimeError(f"cannot get the pretrained weights {cfg['url']} ({exc}); with no network, place the "
                           f"file at {cache}") from None


def fetch_pretrained(name: str) -> Path:
    """The cached file of ``name``'s weights, downloaded first when missing (a run fetches them before it reads its
    data, so a missing network shows at once)."""
    cfg = pretrained_cfg(name)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / cfg["file_name"]
    if not cache.is_file():
        _download(cfg)
    return cache


def pretrained_weights(name: str, model: nn.Module) -> tuple[dict, list[str], str, dict]:
    """``name``'s published weights as :func:`deepres.models.transfer.load_init` takes them (``model.init=pretrained``):
    (state dict, ImageNet's class names, "pretrained", the weights' name to report)."""
    try:
        state, cfg = read_pretrained(name, model)
    except ValueError as exc:
        raise ConfigError("model.init", str(exc)) from None
    return state, cfg["classes"], "pretrained", {"init_weights": cfg["weights"]}


def read_pretrained(name: str, model: nn.Module) -> tuple[dict, dict]:
    """(state dict renamed for ``model``, pretrained cfg) of ``name``'s published weights (downloaded into the
    torch.hub cache the first time); ``model.init=pretrained`` starts a run from them."""
    cfg = pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"model {name} has no pretrained weights (deepres models --pretrained lists those that have)")
    return _renamed(name, _download(cfg), model), cfg


def load_pretrained(model: nn.Module, name: str, num_classes: int) -> dict:
    """Load ``name``'s pretrained weights into ``model`` (built with :data:`PRETRAINED`'s options); a classifier of
    another size stays fresh, a first convolution of another channel count is adapted."""
    from .transfer import load_fitted

    state, cfg = read_pretrained(name, model)
    load_fitted(model, state, keep_head=num_classes == cfg["num_classes"], source=cfg["file_name"])
    if "stride_on" in cfg["options"]:
        warnings.warn(f"{name}: torchvision's weights were trained as stride_on={cfg['options']['stride_on']!r} (the "
                      "paper's ResNets put the stride on the 1x1); the model is built that way", stacklevel=3)
    return cfg
