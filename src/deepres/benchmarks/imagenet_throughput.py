"""ResNet training throughput with data already on the device: ours (bf16 autocast, channels_last, torch.compile,
fused SGD) against torchvision's resnet trained eager with fp16 autocast in NCHW, same device, same run. Ours is
measured eager first and written, then compiled (``measure_ours``): a compiler that fails or runs past the caller's
timeout still leaves the eager number, marked ``compiled: false``.

GPU (the issue's setting): ``deepres benchmark imagenet-throughput`` (ResNet-50, batch 256, 224x224).
CPU smoke (CI): ``deepres benchmark imagenet-throughput --smoke`` (ResNet-18, 64x64, a few steps, fp32, no compile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision

from ..engine.steps import compile_model
from ..models import create_model
from .common import images_per_s, measure_ours, parse_model_arguments, write_result

# ResNet-50 training at 224 on one H200 (issue 14): at least 4,500 images/s and 1.5x torchvision eager AMP, same run.
RESNET50_IMAGES_PER_S = 4500.0
RATIO_MIN = 1.5


def train_step_fn(model, optimizer, x, y, autocast_dtype):
    def step():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(args, device: torch.device, ours: bool, compiled: bool = False) -> tuple[float, float | None]:
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if ours:
        model = create_model(args.model, stride_on="3x3").to(device)  # v1.5: the same arithmetic as the reference
        if gpu:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                                    **({"fused": True} if gpu else {"foreach": True}))
        step_model = compile_model(model) if compiled else model
        step = train_step_fn(step_model, optimizer, x, y, torch.bfloat16 if gpu else None)
    else:
        model = getattr(torchvision.models, args.model)().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        step = train_step_fn(model, optimizer, x, y, torch.float16 if gpu else None)
    return images_per_s(step, device, args)


def main(argv=None) -> int:
    args, device = parse_model_arguments("deepres benchmark imagenet-throughput", __doc__, argv)
    gpu = device.type == "cuda"
    reference, ref_mem = measure(args, device, ours=False)
    target = {"ratio_min": RATIO_MIN, "images_per_s_min": RESNET50_IMAGES_PER_S} if args.model == "resnet50" else None

    def record(fields: dict) -> None:
        meets = None
        if target:  # the bars (224 px, on a GPU): both must hold
            meets = (gpu and args.size == 224 and fields["ours"] / reference >= RATIO_MIN
                     and fields["ours"] >= RESNET50_IMAGES_PER_S)
        write_result(f"imagenet-throughput-{args.model}", device, "training images/s", fields.pop("ours"), reference,
                     target=target, meets_target=meets, out=args.out, batch_size=args.batch_size,
                     image_size=args.size, **fields, peak_memory_mib_reference=ref_mem,
                     reference_setup="torchvision eager, fp16 autocast, NCHW" if gpu else "torchvision eager fp32")

    measure_ours(lambda compiled: measure(args, device, ours=True, compiled=compiled), args.compile and gpu, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
