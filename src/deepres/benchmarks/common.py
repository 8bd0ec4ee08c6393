"""What every benchmark shares: naming the device, timing a step function, writing the result file."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch

# Result files go to benchmarks/results/ under the working directory (in a source checkout, run from its root: the
# committed results folder); --out names another folder.
RESULTS = Path("benchmarks") / "results"


def default_cifar_data() -> str:
    """The CIFAR-10 JPEG set where deepres looks for it ($DEEPRES_DATA, ../shared/data, ./data)."""
    from ..experiments.base import find_cifar10_jpeg

    found = find_cifar10_jpeg()
    if found is None:
        raise FileNotFoundError("the CIFAR-10 JPEG set (cifar10-jpeg.tar.gz) is not in $DEEPRES_DATA, ../shared/data "
                                "or ./data; pass --data PATH")
    return str(found)


def cpu_label(model: str, flags: list[str]) -> str:
    """<vendor>-<family>[-amx|-bf16] from a CPU's model name and flags: 'Intel(R) Xeon(R) Platinum 8488C' with
    amx_bf16 -> intel-xeon-amx, 'AMD EPYC 9R14 96-Core Processor' with avx512_bf16 -> amd-epyc-bf16."""
    words = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b|@.*", " ", model.lower()).split()
    label = "-".join(re.sub(r"[^a-z0-9]+", "", w) for w in words[:2] if w != "unknown") or "unknown"
    return label + ("-amx" if "amx_bf16" in flags else "-bf16" if "avx512_bf16" in flags else "")


def device_name(device: torch.device) -> str:
    """A file-name-safe device label: the GPU's name, or cpu-<cores>core-<cpu_label> (results of different CPUs land
    in different files)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").replace("/", "-")
    from ..engine.steps import cpu_description

    cpu = cpu_description()
    return f"cpu-{os.cpu_count()}core-{cpu_label(cpu['cpu_model'], cpu['cpu_flags'])}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def measure_ours(measure: Callable[[bool], tuple[float, float | None]], compile_wanted: bool,
                 record: Callable[[dict], object]) -> dict:
    """Ours eager (``measure(False)``: images/s, peak MiB), then compiled (``measure(True)``) when ``compile_wanted``.
    The eager number is recorded first (``record(fields)`` writes the result file; it gets a dict of its own), marked
    ``unfinished``, so a compilation that fails, or never finishes before the caller is stopped, still leaves a
    result saying so; the compiled number replaces it as ``ours`` when it comes. Returns the result's fields:
    ``ours``, ``peak_memory_mib_ours``, ``ours_eager``, ``compiled`` and, when compilation failed,
    ``compile_error``."""
    rate, memory = measure(False)
    fields = {"ours": rate, "peak_memory_mib_ours": memory, "ours_eager": rate, "compiled": False}
    if compile_wanted:
        record({**fields, "unfinished": "the compiled measurement was still running"})
        try:
            rate, memory = measure(True)
            fields.update(ours=rate, peak_memory_mib_ours=memory, compiled=True)
        except Exception as exc:  # any compiler failure: the eager result stands, with the reason
            fields["compile_error"] = f"{type(exc).__name__}: {exc}"[:600]
            print(f"compiled measurement failed, keeping the eager one: {fields['compile_error']}", flush=True)
    record(dict(fields))
    return fields


def images_per_s(step: Callable[[], None], device: torch.device, args) -> tuple[float, float | None]:
    """Images/s of ``step`` (one batch of ``args.batch_size``) over ``args.steps`` after ``args.warmup`` untimed
    steps, and the peak GPU memory (MiB) it took (None on a CPU)."""
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(step, device, args.warmup, args.steps)
    return args.batch_size / seconds, torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None


def parse_model_arguments(prog: str, description: str, argv) -> tuple[argparse.Namespace, torch.device]:
    """The command line of a model-speed benchmark (``model_arguments``) and its device, defaults filled in."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    model_arguments(parser)
    args = parser.parse_args(argv)
    return args, resolve_model_arguments(args)


def model_arguments(parser) -> None:
    """The options of the model-speed benchmarks; defaults depend on the device (see resolve_model_arguments)."""
    parser.add_argument("--model", default=None, help="resnet50 (GPU default) or resnet18 (CPU default)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="a tiny run on the CPU (CI)")
    parser.add_argument("--out", help="folder for the result file (default benchmarks/results)")


def resolve_model_arguments(args) -> torch.device:
    """The device, and the defaults the user left open: ResNet-50 at 224, batch 256 on a GPU; tiny on a CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    small = args.smoke or device.type == "cpu"
    defaults = {"model": "resnet18" if small else "resnet50", "batch_size": 8 if small else 256,
                "size": 64 if small else 224, "steps": 3 if small else 50, "warmup": 1 if small else 15}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return device


def write_result(name: str, device: torch.device, metric: str, ours: float, reference: float, target: float | None,
                 higher_is_better: bool = True, out: Path | None = None, **extra) -> Path:
    """benchmarks/results/<name>-<device>.json with the keys every benchmark reports."""
    ratio = ours / reference if higher_is_better else reference / ours
    result = {"benchmark": name, "device": device_name(device), "torch": torch.__version__, "metric": metric,
              "ours": ours, "reference": reference, "ratio": ratio, "target": target, **extra}
    out_dir = Path(out) if out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device_name(device)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def tiny_image_folder(root: Path, classes: int = 2, per_class: int = 16, test_per_class: int = 4, size: int = 32,
                      seed: int = 0) -> Path:
    """root/{train,test}/<class>/<i>.jpg: a small JPEG folder of noisy class-coloured squares for the --smoke runs
    (each class a colour, so a few steps already learn something)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = Path(root) / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(60 * c) % 256, (120 + 90 * c) % 256, (200 - 50 * c) % 256], dtype=np.float64)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return Path(root)


def gpu_or_cpu(smoke: bool) -> torch.device:
    """CUDA unless there is none or a --smoke run asks for the CPU. A CPU smoke run keeps one intra-op thread: its
    ops are tiny, and on a busy machine a thread pool mostly waits for its slowest thread."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type == "cpu" and smoke:
        torch.set_num_threads(1)
    return device
