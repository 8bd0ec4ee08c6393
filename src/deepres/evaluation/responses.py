"""Layer responses (paper section 4.2, Fig. 7): the standard deviation of each 3x3 layer's output after BN and
before the nonlinearity / addition, over a set of images, in the order the layers are applied."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.resnet import BasicBlock, Bottleneck

__all__ = ["layer_responses"]


def _response_norms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BN layers that follow a 3x3 conv inside the blocks (the stem's conv is 7x7 or 3x3 and counted too)."""
    out = []
    if isinstance(getattr(model, "conv1", None), nn.Conv2d) and isinstance(getattr(model, "bn1", None), nn.BatchNorm2d):
        out.append(("bn1", model.bn1))
    for name, module in model.named_modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                conv = getattr(module, conv_name, None)
                if conv is not None and conv.kernel_size == (3, 3):
                    out.append((f"{name}.{bn_name}", getattr(module, bn_name)))
    return out


@torch.no_grad()
def layer_responses(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> list[dict]:
    """[{"layer", "index", "std"}] for every 3x3 layer of a ResNet/plain net, evaluated in eval mode on ``images``
    (already normalised). The std is over all images, positions and channels of the layer's response, as Fig. 7."""
    norms = _response_norms(model)
    sums = {name: torch.zeros(2, dtype=torch.float64) for name, _ in norms}
    counts = {name: 0 for name, _ in norms}
    handles = []
    for name, bn in norms:
        def hook(module, inputs, output, name=name):
            x = output.detach().double()
            sums[name] += torch.stack([x.sum(), (x * x).sum()]).cpu()
            counts[name] += x.numel()
        handles.append(bn.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(images), batch_size):
            model(images[lo : lo + batch_size])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    rows = []
    for index, (name, _) in enumerate(norms):
        s, ss = sums[name].tolist()
        n = counts[name]
        mean = s / n
        rows.append({"layer": name, "index": index + 1, "std": max(0.0, ss / n - mean * mean) ** 0.5})
    return rows
