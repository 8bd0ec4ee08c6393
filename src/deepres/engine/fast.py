"""The fast path for small nets on in-memory data: what ``train`` does for a classification recipe, with the host
taken out of the step.

The paper's CIFAR nets are narrow: at batch 128 a ResNet-56 step is a few hundred small kernels and one GPU finishes
each faster than Python can launch it. So this path (1) keeps the training split on the device and augments a whole
epoch at once (the paper's pad-4 crop and flip, section 4.2), (2) captures forward, backward and the fused SGD update
as one CUDA graph that is replayed every step (the learning rate is a device tensor the graph reads), (3) runs under
bf16 autocast in channels_last, optionally through ``torch.compile``, and (4) reads statistics back only every
``log_every`` steps. On the CPU it is the same step run eagerly in fp32.

Compared with :func:`deepres.engine.train` it draws its own random stream (so its batches differ from the
device-resident loader's, with the same distribution), writes one checkpoint at the end (``checkpoints/last.pt``, in
the loop's format: ``deepres eval``, ``export`` and the layer-response analysis read it; an interrupted run starts
again from step 0) and supports the classification task only (label smoothing included; no mixing, RandAugment, EMA,
DDP or fine-tuning). It writes ``config.yaml``, ``metrics.jsonl`` (the loop's row keys, so the reports read it) and
``summary.json`` in the run folder. A loss that turns NaN/inf stops the run with :class:`NonFiniteLossError`; the
command line then records ``{"diverged": true}`` as the summary and exits with status 3.

    python -m deepres.engine.fast --recipe paper/cifar10_resnet56 --set data.source=imagefolder \\
        --set data.data_dir=../shared/data/cifar10-jpeg.tar.gz --run-dir runs/r56-fast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__
from ..config import Config, ConfigError, to_dict, to_yaml
from ..data import Normalizer, load_dataset
from .checkpoint import save_checkpoint
from .logging import MetricsWriter
from .loop import NonFiniteLossError, RunPaths, build_model, data_fingerprint, load_run_dataset
from .optim import Schedule, build_optimizer

__all__ = ["DIVERGED_EXIT", "FastOptions", "check_fast_supported", "train_fast"]

DIVERGED_EXIT = 3  # the command line's exit status for a run whose loss became NaN/inf

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class FastOptions:
    """How the fast path runs (the recipe says what is trained)."""

    graph: bool = True  # capture the whole step as a CUDA graph (CUDA only; ignored with compile "reduce-overhead")
    compile_mode: str | None = None  # torch.compile the model with this mode; None: eager kernels (cuDNN)
    eval_every: int = 0  # test-set evaluation every N steps; 0: at the end only
    log_every: int = 100
    stop_at_accuracy: float | None = None  # stop at the first evaluation with test accuracy >= this (percent)
    warmup_steps: int = 3  # eager steps on a side stream before capture (cuDNN autotuning, optimizer state)
    quiet: bool = False


def _device(config: Config) -> torch.device:
    name = config.train.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_fast_supported(config: Config) -> None:
    """Raise :class:`ConfigError` naming the first setting the fast path does not implement."""
    unsupported = {
        "task.name": config.task.name != "classification",
        "data.cutmix_alpha": config.data.cutmix_alpha > 0,
        "data.mixup_alpha": config.data.mixup_alpha > 0,
        "data.randaugment_n": config.data.randaugment_n > 0,
        "data.preset": config.data.preset not in ("paper_cifar", "none"),
        "train.ema_decay": bool(config.train.ema_decay),
        "finetune.backbone_lr_scale": config.finetune.backbone_lr_scale != 1.0,
        "optim.grad_clip": bool(config.optim.grad_clip),
    }
    for key, bad in unsupported.items():
        if bad:
            raise ConfigError(key, "is not supported by the fast path (deepres.engine.fast); use deepres train")


class EpochAugmenter:
    """Whole epochs of augmented, normalised batches built on the device in a handful of kernels.

    The padded training split is kept once (uint8); each epoch draws a permutation, crop offsets and flips from a
    device generator and gathers every training image at once (paper section 4.2: pad 4, random crop, flip).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalizer: Normalizer, batch_size: int,
                 device: torch.device, seed: int, padding: int = 4, augment: bool = True,
                 memory_format=torch.contiguous_format):
        self.n, self.c, self.h, self.w = images.shape
        self.padding = padding if augment else 0
        self.augment = augment
        p = self.padding
        self.padded = F.pad(images.to(device), (p, p, p, p))
        self.labels = labels.to(device)
        self.mean = normalizer.mean.to(device)
        self.std = normalizer.std.to(device)
        self.batch_size = batch_size
        self.steps_per_epoch = self.n // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"train.batch_size={batch_size} is larger than the training split ({self.n} images)")
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.memory_format = memory_format
        self.epoch_images: torch.Tensor | None = None
        self.epoch_labels: torch.Tensor | None = None

    def new_epoch(self) -> None:
        n, c, h, w, p, g = self.n, self.c, self.h, self.w, self.padding, self.generator
        order = torch.randperm(n, device=self.device, generator=g)
        width = w + 2 * p
        rows = torch.arange(h, device=self.device).expand(n, h)
        cols = torch.arange(w, device=self.device).expand(n, w)
        if self.augment:
            rows = rows + torch.randint(0, 2 * p + 1, (n, 1), device=self.device, generator=g)
            cols = cols + torch.randint(0, 2 * p + 1, (n, 1), device=self.device, generator=g)
            flip = torch.rand(n, 1, device=self.device, generator=g) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        source = (rows[:, :, None] * width + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        crops = self.padded[order].view(n, c, -1).gather(2, source).view(n, c, h, w)
        x = crops.float().div_(255.0).sub_(self.mean).div_(self.std)
        self.epoch_images = x.contiguous(memory_format=self.memory_format)
        self.epoch_labels = self.labels[order]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = step % self.steps_per_epoch
        if i == 0 or self.epoch_images is None:
            self.new_epoch()
        lo = i * self.batch_size
        return self.epoch_images[lo:lo + self.batch_size], self.epoch_labels[lo:lo + self.batch_size]


@torch.no_grad()
def evaluate_resident(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int, autocast) -> dict:
    """Top-1 error and mean loss of ``model`` on normalised images already on the device."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), device=images.device, dtype=torch.float64)
    loss = torch.zeros((), device=images.device, dtype=torch.float64)
    for lo in range(0, len(labels), batch_size):
        x, y = images[lo:lo + batch_size], labels[lo:lo + batch_size]
        with autocast():
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        wrong += (logits.argmax(1) != y).sum().double()
    model.train(was_training)
    n = len(labels)
    return {"top1_error": 100.0 * wrong.item() / n, "loss": loss.item() / n}


def train_fast(config: Config, run_dir: str | Path | None = None, options: FastOptions | None = None,
               dataset=None) -> dict:
    """Train ``config`` on the fast path; returns the summary (also ``summary.json``).

    Summary times: ``train_seconds`` counts from the first step (data already on the device) to the last, including
    compilation, autotuning and graph capture, excluding evaluations; ``eval_seconds`` the evaluations;
    ``setup_seconds`` reading the data and moving it to the device.
    """
    options = options or FastOptions()
    check_fast_supported(config)
    run = Path(run_dir) if run_dir else None
    if run is not None and RunPaths(run).last.exists():
        raise FileExistsError(f"{run} already holds a checkpoint ({RunPaths(run).last}); the fast path starts "
                              f"runs from step 0: choose another run folder")
    t_setup = time.perf_counter()
    device = _device(config)
    tc = config.train
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(tc.seed)
    if dataset is None:
        dataset = load_run_dataset(config.data) or load_dataset(config.data)
    if getattr(dataset.train, "images", None) is None:
        raise ValueError("the fast path needs a dataset held in memory (32x32-sized images); use deepres train")
    normalizer = Normalizer.fit(dataset.train.images, config.data.normalize)
    memory_format = torch.channels_last if (tc.channels_last and gpu) else torch.contiguous_format
    augmenter = EpochAugmenter(dataset.train.images, dataset.train.labels, normalizer, tc.batch_size, device, tc.seed,
                               augment=config.data.preset == "paper_cifar", memory_format=memory_format)
    test_x = normalizer(dataset.test.images.to(device)).contiguous(memory_format=memory_format)
    test_y = dataset.test.labels.to(device)

    torch.manual_seed(tc.seed)
    model = build_model(config.model, dataset.num_classes, dataset.channels).to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, config.optim, device)
    schedule = Schedule(config.schedule, config.optim.lr, tc.iterations)
    amp = tc.amp if tc.amp != "auto" else ("bf16" if gpu else "off")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is torch.float16:
        raise ConfigError("train.amp", "fp16 needs loss scaling, which the fast path does not do; use bf16")

    def autocast():
        # No weight-cast cache: a captured graph must recompute the casts from the live fp32 weights.
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext()

    compile_mode = options.compile_mode
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {compile_mode!r}")
    step_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    use_graph = options.graph and gpu and compile_mode not in ("reduce-overhead", "max-autotune")

    lr = torch.tensor(schedule.lr_at(0), device=device) if use_graph else None
    if use_graph:
        for group in optimizer.param_groups:
            group["lr"] = lr  # fused SGD reads a tensor lr from device memory: one graph for every lr
    smoothing = config.task.label_smoothing
    x_static = torch.zeros((tc.batch_size, dataset.channels, augmenter.h, augmenter.w), device=device)
    x_static = x_static.contiguous(memory_format=memory_format)
    y_static = torch.zeros(tc.batch_size, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    wrong_sum = torch.zeros((), device=device, dtype=torch.float32)
    last_wrong = torch.zeros((), device=device, dtype=torch.float32)

    def step_body():
        with autocast():
            logits = step_model(x_static)
            loss = F.cross_entropy(logits, y_static, label_smoothing=smoothing)
        loss.backward()
        optimizer.step()
        wrong = (logits.detach().argmax(1) != y_static).sum().float()
        loss_sum.add_(loss.detach().float())
        wrong_sum.add_(wrong)
        last_wrong.copy_(wrong)

    def set_lr(step: int, current: list) -> float:
        value = schedule.lr_at(step)
        if value != current[0]:
            if use_graph:
                lr.fill_(value)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = value
            current[0] = value
        return value

    writer = None
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(to_yaml(config))
        writer = MetricsWriter(run, tensorboard=False)
        writer.truncate_after(-1)  # an interrupted fast run starts again: its old rows go
    setup_seconds = time.perf_counter() - t_setup

    eval_seconds = 0.0
    curve: list[dict] = []
    graph = None
    current_lr = [None]
    window_steps, window_t0 = 0, time.perf_counter()
    model.train()
    if gpu:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    step = 0
    reached = None

    def train_elapsed() -> float:
        return time.perf_counter() - t0 - eval_seconds

    def log_eval(at_step: int) -> dict:
        nonlocal eval_seconds
        if gpu:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        seconds = start - t0 - eval_seconds
        result = evaluate_resident(model, test_x, test_y, tc.eval_batch_size, autocast)
        eval_seconds += time.perf_counter() - start
        row = {"step": at_step, "test_loss": result["loss"], "test_top1_error": result["top1_error"],
               "train_seconds": seconds, "elapsed_s": time.perf_counter() - t0}
        curve.append({"step": at_step, "seconds": seconds, "test_accuracy": 100.0 - result["top1_error"]})
        if writer:
            writer.write(row)
        if not options.quiet:
            print(f"step {at_step}: test error {result['top1_error']:.2f}% after {seconds:.1f} s of training",
                  flush=True)
        return row

    try:
        while step < tc.iterations:
            current = set_lr(step, current_lr)
            x, y = augmenter.batch(step)
            x_static.copy_(x)
            y_static.copy_(y)
            if graph is not None:
                graph.replay()
            elif use_graph and step >= options.warmup_steps:
                # Capture: grads are freed so the graph allocates them from its own pool, as PyTorch's
                # whole-network capture example does; the captured step is also this step's update.
                optimizer.zero_grad(set_to_none=True)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step_body()
                graph.replay()
            elif use_graph:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    optimizer.zero_grad(set_to_none=True)
                    step_body()
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                optimizer.zero_grad(set_to_none=True)
                step_body()
            window_steps += 1
            if not schedule.error_warmup_done:  # the paper's ResNet-110 warmup: a host read per step, ~400 steps
                if schedule.observe_train_error(100.0 * last_wrong.item() / tc.batch_size) and not options.quiet:
                    print(f"step {step + 1}: training error below {config.schedule.warmup_until_train_error}%",
                          flush=True)
            step += 1
            if step % options.log_every == 0 or step == tc.iterations:
                loss_value = loss_sum.item() / window_steps
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(f"the training loss became NaN/inf between steps "
                                             f"{step - window_steps + 1} and {step}")
                row = {"step": step, "lr": current, "train_loss": loss_value,
                       "train_top1_error": 100.0 * wrong_sum.item() / (window_steps * tc.batch_size),
                       "images_per_s": window_steps * tc.batch_size / max(time.perf_counter() - window_t0, 1e-9),
                       "elapsed_s": time.perf_counter() - t0}
                if writer:
                    writer.write(row)
                loss_sum.zero_(), wrong_sum.zero_()
                window_steps, window_t0 = 0, time.perf_counter()
            if options.eval_every and step % options.eval_every == 0 and step < tc.iterations:
                row = log_eval(step)
                if options.stop_at_accuracy is not None and 100.0 - row["test_top1_error"] >= options.stop_at_accuracy:
                    reached = row
                    break
        if gpu:
            torch.cuda.synchronize(device)
        train_seconds = train_elapsed()
        final = reached or log_eval(step)
    finally:
        if writer:
            writer.close()
    summary = {
        "run_dir": str(run) if run else None,
        "model": config.model.name,
        "data": dataset.name,
        "iterations": step,
        "test_top1_error": final["test_top1_error"],
        "test_accuracy": 100.0 - final["test_top1_error"],
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "setup_seconds": setup_seconds,
        "seconds_per_step": train_seconds / max(step, 1),
        "curve": curve,
        "reached_accuracy": options.stop_at_accuracy if reached else None,
        "device": str(device),
        "amp": amp,
        "channels_last": memory_format == torch.channels_last,
        "cuda_graph": graph is not None,
        "compile_mode": compile_mode,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None,
        "elapsed_s": setup_seconds + train_seconds + eval_seconds,
        "engine": "fast",
    }
    if run is not None:
        if use_graph:
            for group in optimizer.param_groups:
                group["lr"] = float(lr)  # a plain number in the checkpoint, as the loop keeps it
        save_checkpoint({
            "step": step,
            "config": to_dict(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "ema": None,
            "rng": {"torch": torch.get_rng_state()},
            "classes": list(dataset.classes),
            "normalization": normalizer.state_dict(),
            "image_size": [augmenter.h, augmenter.w],
            "in_channels": dataset.channels,
            "data_fingerprint": data_fingerprint(dataset),
            "best_val_error": math.inf,
            "deepres_version": __version__,
        }, RunPaths(run).last)
        (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def record_divergence(run_dir: Path, config: Config, exc: Exception) -> dict:
    """The summary of a run whose loss became NaN/inf (a result of the run, as the reproduce reports treat it)."""
    summary = {"run_dir": str(run_dir), "model": config.model.name, "diverged": True, "message": str(exc),
               "engine": "fast"}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    from ..config import load_config

    parser = argparse.ArgumentParser(prog="python -m deepres.engine.fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--no-graph", dest="graph", action="store_false", help="eager steps, no CUDA graph")
    parser.add_argument("--compile", dest="compile_mode", default=None, choices=COMPILE_MODES)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--stop-at-accuracy", type=float, default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.recipe, args.overrides)
    options = FastOptions(graph=args.graph, compile_mode=args.compile_mode, eval_every=args.eval_every,
                          log_every=args.log_every, stop_at_accuracy=args.stop_at_accuracy, quiet=args.quiet)
    try:
        summary = train_fast(config, args.run_dir, options)
    except NonFiniteLossError as exc:
        if args.run_dir:
            record_divergence(Path(args.run_dir), config, exc)
        print(f"diverged: {exc}", flush=True)
        return DIVERGED_EXIT
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
