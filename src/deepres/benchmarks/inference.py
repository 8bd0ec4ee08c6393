"""ResNet-50 inference images/s at batch 256: ours (bf16, channels_last, compiled) against torchvision eager fp32,
same device, same run; peak GPU memory of each. Ours is measured eager first and written, then compiled
(``measure_ours``). ``--smoke``: ResNet-18, 64x64, batch 8 on the CPU (CI)."""

from __future__ import annotations

import torch
import torchvision

from ..engine.steps import compile_model
from ..models import create_model
from .common import images_per_s, measure_ours, parse_model_arguments, write_result


@torch.no_grad()
def measure(args, device: torch.device, ours: bool, compiled: bool = False) -> tuple[float, float | None]:
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    if ours:
        model = create_model(args.model, stride_on="3x3").to(device).eval()
        if gpu:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            model = compile_model(model) if compiled else model
        dtype = torch.bfloat16 if gpu else None
    else:
        model = getattr(torchvision.models, args.model)().to(device).eval()
        dtype = None

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x)

    return images_per_s(step, device, args)


def main(argv=None) -> int:
    args, device = parse_model_arguments("deepres benchmark inference", __doc__, argv)
    gpu = device.type == "cuda"
    reference, ref_mem = measure(args, device, ours=False)

    def record(fields: dict) -> None:
        write_result(f"inference-{args.model}", device, "inference images/s", fields.pop("ours"), reference,
                     target=None, out=args.out, batch_size=args.batch_size, image_size=args.size, **fields,
                     peak_memory_mib_reference=ref_mem,
                     # PyTorch's default on CUDA: the reference's fp32 convolutions run on the TF32 tensor cores
                     reference_tf32_convolutions=torch.backends.cudnn.allow_tf32 if gpu else None)

    measure_ours(lambda compiled: measure(args, device, ours=True, compiled=compiled), args.compile and gpu, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
