"""CPU training speed: our training step for the paper's CIFAR nets (``train.amp=auto``: bf16 autocast on a CPU with
native bf16 arithmetic, fp32 elsewhere; channels_last) against the same model trained eager fp32 NCHW with a plain
PyTorch step, same machine, same run, batch 128 at 32x32.

The result file names the CPU model, the flags that decide the precision (avx2, avx512f, avx512_bf16, amx_bf16) and
the intra-op threads. Target: >= 1.8x where the CPU has native bf16; elsewhere auto is fp32 and the ratio is about 1.

    deepres benchmark cpu-train                        # ResNet-20 and ResNet-56: cpu-train-resnet{20,56}-<cpu>.json
    deepres benchmark cpu-train --models plain20 --steps 20
    deepres benchmark cpu-train --smoke --out /tmp/r   # a tiny run (CI)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import OptimConfig
from ..engine.optim import build_optimizer
from ..engine.steps import EagerStep, Precision, cpu_description, resolve_amp
from ..models import create_model
from ..tasks import ClassificationTask
from .common import time_steps, write_result

TARGET_RATIO = 1.8


def _batch(batch_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 3, size, size, generator=g), torch.randint(0, 10, (batch_size,), generator=g)


def ours(name: str, batch_size: int, size: int, amp: str = "auto", channels_last: bool = True):
    """One training step of the loop's eager step with the run's precision and memory format."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = create_model(name)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, OptimConfig(), device)
    step = EagerStep(model, model.train(), ClassificationTask(), optimizer, Precision(amp, device))
    step.set_lr(0.1)
    x, y = _batch(batch_size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return lambda: step(x, y)


def reference(name: str, batch_size: int, size: int):
    """The same model trained eager fp32 NCHW: forward, cross-entropy, backward, SGD."""
    torch.manual_seed(0)
    model = create_model(name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = _batch(batch_size, size)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deepres benchmark cpu-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated (default resnet20,resnet56; smoke resnet20)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (smoke 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="ours in NCHW (default channels_last)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (CI)")
    parser.add_argument("--out", default=None, help="folder for the result files (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    models = (args.models or ("resnet20" if args.smoke else "resnet20,resnet56")).split(",")
    batch_size = args.batch_size or (8 if args.smoke else 128)
    steps, warmup = args.steps or (2 if args.smoke else 10), args.warmup or (1 if args.smoke else 3)
    cpu = cpu_description()
    amp = resolve_amp("auto", device)
    for name in models:
        ours_s = time_steps(ours(name, batch_size, 32, "auto", args.channels_last), device, warmup, steps)
        ref_s = time_steps(reference(name, batch_size, 32), device, warmup, steps)
        setting = f"{'bf16 autocast' if amp == 'bf16' else 'fp32'}{', channels_last' if args.channels_last else ''}"
        write_result(f"cpu-train-{name}", device, f"training images/s, batch {batch_size} at 32x32, forward + backward "
                     f"+ SGD; ours: the loop's step with train.amp=auto ({setting}); reference: eager fp32 NCHW; "
                     f"{steps} timed steps after {warmup}; higher is better, ratio = ours / reference",
                     batch_size / ours_s, batch_size / ref_s, higher_is_better=True,
                     target={"ratio_min": TARGET_RATIO, "where": "a CPU with native bf16 (avx512_bf16 or amx_bf16)"},
                     out=Path(args.out) if args.out else None,
                     meets_target=(batch_size / ours_s) / (batch_size / ref_s) >= TARGET_RATIO if cpu["native_bf16"]
                     and not args.smoke else None,
                     amp=amp, channels_last=args.channels_last, seconds_per_step_ours=ours_s,
                     seconds_per_step_reference=ref_s, steps=steps, warmup=warmup, **cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
