"""Deformable convolution on the CPU: our kernel (:class:`deepres.models.DeformConvCPU`, the one ``DeformConv2d``
runs on a CPU) against torchvision's ``deform_conv2d`` operator, same machine, same run, fp32.

What is timed is forward + backward (input, offsets, weight) of the thirteen deformable 3x3 convs of
``deform_resnet50`` at CIFAR size (``small_input``: stages conv3_x to conv5_x at 16x16, 8x8 and 4x4 with 128, 256 and
512 channels; 4, 6 and 3 blocks), batch 128, offsets drawn at +-0.5 pixels (fractional: the bilinear path), as
seconds per training step of those layers. Target: >= 2x. Both results are checked equal first (fp32 tolerance).

    deepres benchmark deform-cpu                       # deform-cpu-<cpu>.json
    deepres benchmark deform-cpu --smoke --out /tmp/r  # a tiny run (CI)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

from ..engine.steps import cpu_description
from ..models import DeformConvCPU
from .common import time_steps, write_result

TARGET_RATIO = 2.0
# (channels, side, blocks) of deform_resnet50's deformable stages at 32x32 input with the CIFAR stem.
STAGES = [(128, 16, 4), (256, 8, 6), (512, 4, 3)]


def _layer(channels: int, side: int, batch_size: int):
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(batch_size, channels, side, side, generator=g).requires_grad_()
    weight = (torch.randn(channels, channels, 3, 3, generator=g) * 0.02).requires_grad_()
    offset = (torch.rand(batch_size, 18, side, side, generator=g) - 0.5).requires_grad_()
    grad = torch.randn(batch_size, channels, side, side, generator=g)
    ours = lambda: DeformConvCPU.apply(x, offset, weight, None, (1, 1), (1, 1), (1, 1), 1, 1)  # noqa: E731
    theirs = lambda: torchvision.ops.deform_conv2d(x, offset, weight, None, padding=1)  # noqa: E731
    return ours, theirs, (x, offset, weight), grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deepres benchmark deform-cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (smoke 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layer shape (default 3; smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (CI)")
    parser.add_argument("--out", default=None, help="folder for the result file (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    batch_size, steps = args.batch_size or (4 if args.smoke else 128), args.steps or (1 if args.smoke else 3)
    stages = [(c // 16, side, blocks) for c, side, blocks in STAGES] if args.smoke else STAGES
    seconds = {"ours": 0.0, "reference": 0.0}
    per_stage = []
    for channels, side, blocks in stages:
        ours, theirs, inputs, grad = _layer(channels, side, batch_size)
        got = torch.autograd.grad(ours(), inputs, grad)
        want = torch.autograd.grad(theirs(), inputs, grad)
        for a, b, name in zip(got, want, ("input", "offset", "weight")):
            scale = b.abs().max().item()
            if (a - b).abs().max().item() > 1e-4 * max(scale, 1.0):
                raise RuntimeError(f"deform-cpu: the {name} gradients differ from torchvision's at {channels} channels")
        row = {"channels": channels, "side": side, "blocks": blocks}
        for key, fn in (("ours", ours), ("reference", theirs)):
            step = lambda fn=fn: torch.autograd.grad(fn(), inputs, grad)  # noqa: E731
            row[f"seconds_{key}"] = time_steps(step, device, 1, steps)
            seconds[key] += row[f"seconds_{key}"] * blocks
        per_stage.append(row)
    cpu = cpu_description()
    write_result("deform-cpu", device, f"seconds per training step of deform_resnet50's 13 deformable convs (forward + "
                 f"backward, fp32, batch {batch_size}, CIFAR size); ours: DeformConvCPU; reference: torchvision's "
                 f"deform_conv2d; lower is better, ratio = reference / ours", seconds["ours"], seconds["reference"],
                 target={"ratio_min": TARGET_RATIO}, higher_is_better=False,
                 out=Path(args.out) if args.out else None,
                 meets_target=None if args.smoke else seconds["reference"] / seconds["ours"] >= TARGET_RATIO,
                 batch_size=batch_size, steps=steps, stages=per_stage, torchvision=torchvision.__version__, **cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
