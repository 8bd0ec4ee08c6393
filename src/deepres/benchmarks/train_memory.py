"""Training memory: what the two memory settings of a run save, and what they cost in time, against the plain step
measured in the same run.

Each setting trains a few steps of the one loop's eager step (SGD, the run's precision) in a process of its own,
from the same weights on the same random batch:

- ``whole``: the whole batch at once (the reference);
- ``micro_batches``: ``train.micro_batches=4`` (gradient accumulation; BN sees each part's statistics);
- ``grad_checkpointing``: ``train.grad_checkpointing=true`` (activations recomputed in the backward pass; its losses
  must equal the reference's, which is checked);
- ``both``: the two together.

Memory is the rise of the peak above the built model's (the gradients and the optimizer state that the first step
creates included): on a CPU the resident high-water mark (on Linux reset to the resident size first, see
:class:`PeakMemory`), on a GPU the peak of allocated memory. Time is seconds per step after a warm-up step.

    deepres benchmark train-memory                      # ResNet-50, batch 32 at 224, train.amp=auto
    deepres benchmark train-memory --smoke --out /tmp/r # a tiny run (CI)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from ..config import OptimConfig
from ..engine.optim import build_optimizer
from ..engine.steps import EagerStep, Precision, cpu_description
from ..models import create_model
from ..tasks import ClassificationTask
from .common import time_steps, write_result

SETTINGS = {"whole": (1, False), "micro_batches": (4, False), "grad_checkpointing": (1, True), "both": (4, True)}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """The rise of the peak above now. GPU: peak allocated memory. CPU on Linux: the resident high-water mark, reset to
    the current resident size first (``/proc/self/clear_refs``), so what imports and construction touched before
    does not hide a smaller step; elsewhere the process's ``ru_maxrss``, whose rise can then read low."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset = False
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.max_memory_allocated(device) / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
            self.reset = _status_kib("VmHWM") is not None
        except OSError:
            pass
        self.start = (_status_kib("VmRSS") if self.reset else self._max_rss_kib()) / 2**10

    @staticmethod
    def _max_rss_kib() -> float:
        try:
            import resource
        except ImportError as exc:  # Windows
            raise RuntimeError("train-memory reads a CPU's memory with the resource module (Linux, macOS); on this "
                               "system measure on a GPU (--device cuda)") from exc
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / 2**10 if sys.platform == "darwin" else peak

    def rise_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
        return (_status_kib("VmHWM") if self.reset else self._max_rss_kib()) / 2**10 - self.start


def measure(setting: str, args) -> dict:
    """One setting, in this process: the peak's rise (MiB), seconds per step and the first step's loss."""
    device = torch.device(args.device)
    micro_batches, checkpointing = SETTINGS[setting]
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000 if args.size > 64 else 10).to(device).train()
    model.set_grad_checkpointing(checkpointing)
    optimizer = build_optimizer(model, OptimConfig(lr=0.01), device)
    step = EagerStep(model, model, ClassificationTask(), optimizer, Precision(args.amp, device),
                     micro_batches=micro_batches)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, args.size, args.size, generator=generator).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
    peak = PeakMemory(device)
    losses = []
    seconds = time_steps(lambda: losses.append(step(images, labels)[0].item()), device, 1, args.steps)
    return {"setting": setting, "micro_batches": micro_batches, "grad_checkpointing": checkpointing,
            "peak_mib_above_model": peak.rise_mib(), "seconds_per_step": seconds, "first_loss": losses[0],
            "precision": step.precision.name}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deepres benchmark train-memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default resnet50 (smoke resnet20)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (smoke 8)")
    parser.add_argument("--size", type=int, default=None, help="image side, default 224 (smoke 32)")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"], help="as train.amp")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting after one warm-up step")
    parser.add_argument("--device", default=None, help="cuda when there is one, else cpu")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, of {', '.join(SETTINGS)}; whole (the reference) is always measured")
    parser.add_argument("--smoke", action="store_true", help="a tiny run (CI)")
    parser.add_argument("--out", default=None, help="folder for the result file (default benchmarks/results)")
    parser.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("resnet20" if args.smoke else "resnet50")
    args.batch_size = args.batch_size or (8 if args.smoke else 32)
    args.size = args.size or (32 if args.smoke else 224)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.child:  # one setting in this process; the parent reads the last line
        print(json.dumps(measure(args.child, args)), flush=True)
        return 0
    wanted = {s.strip() for s in args.settings.split(",") if s.strip()}
    unknown = wanted - set(SETTINGS)
    if unknown:
        parser.error(f"--settings: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SETTINGS)}")
    if "grad_checkpointing" not in wanted:
        parser.error("--settings must include grad_checkpointing (the setting the result file is about)")
    rows = []
    for setting in [s for s in SETTINGS if s == "whole" or s in wanted]:
        command = [sys.executable, "-m", "deepres.benchmarks.train_memory", "--child", setting,
                   "--model", args.model, "--batch-size", str(args.batch_size), "--size", str(args.size),
                   "--amp", args.amp, "--steps", str(args.steps), "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"train-memory: the {setting} process failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{setting:>18}: peak +{rows[-1]['peak_mib_above_model']:,.0f} MiB, "
              f"{rows[-1]['seconds_per_step']:.3f} s/step", flush=True)
    whole = rows[0]
    for row in rows:  # a rise under the 1 KiB resolution (a tiny run reusing freed memory) has no ratio
        row["memory_ratio"] = (row["peak_mib_above_model"] / whole["peak_mib_above_model"]
                               if whole["peak_mib_above_model"] > 0 else None)
        row["time_ratio"] = row["seconds_per_step"] / whole["seconds_per_step"]
    checkpointed = next(row for row in rows if row["setting"] == "grad_checkpointing")
    if abs(checkpointed["first_loss"] - whole["first_loss"]) > 1e-5 * max(1.0, abs(whole["first_loss"])):
        raise RuntimeError(f"train-memory: the checkpointed step's loss {checkpointed['first_loss']} differs from the "
                           f"whole step's {whole['first_loss']}")
    device = torch.device(args.device)
    extra = cpu_description() if device.type == "cpu" else {}
    metric = (f"peak memory above the built model's (MiB; gradients and optimizer state included) of training steps "
              f"of {args.model}, batch {args.batch_size} at {args.size}, {whole['precision']}; ours: "
              f"train.grad_checkpointing; reference: the whole batch at once; lower is better, "
              f"ratio = reference / ours")
    resolution = 1 / 2**10  # MiB: the rises are read in KiB
    write_result("train-memory", device, metric, max(checkpointed["peak_mib_above_model"], resolution),
                 max(whole["peak_mib_above_model"], resolution),
                 target=None, higher_is_better=False, out=Path(args.out) if args.out else None, model=args.model,
                 batch_size=args.batch_size, size=args.size, steps=args.steps, settings=rows, **extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
