"""The training loop: a function over (model, task, loader, optimizer, schedule), iteration based as the paper.

``train(config, run_dir)`` builds everything from a Config, trains for ``train.iterations`` steps, evaluates on the
validation split every ``eval_every`` steps (``best.pt`` by validation error, never test error), tests at the end, and
checkpoints atomically every ``checkpoint_every`` steps and on SIGTERM/SIGINT. Resuming from a checkpoint continues
bit for bit (CPU, deterministic mode): the data order and augmentation are functions of (seed, step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import __version__
from ..config import Config, ConfigError, from_dict, to_dict, to_yaml
from ..data import Normalizer, build_data, load_dataset
from ..evaluation import evaluate, topk_correct
from ..models import create_model
from ..tasks import build_task
from ..tasks.noise import add_noise
from ..tasks.pseudo_label import first_per_class, split_labeled
from ..tasks.transfer import freeze_backbone, load_init
from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .logging import MetricsWriter, Progress
from .optim import Schedule, build_optimizer

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "build_model", "data_fingerprint", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; ``last.pt`` was written at the current step."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by signal {signum} at step {step}; last.pt saved")


def build_model(cfg, num_classes: int, in_channels: int) -> nn.Module:
    """The model of a ModelConfig; class count and channels default to the data's. ``model.init`` is not loaded
    here (the loop loads it into a fresh run only); dropout and stochastic depth are added (training-only hooks)."""
    options = dict(cfg.options)
    options["num_classes"] = cfg.num_classes or num_classes
    options["in_channels"] = cfg.in_channels or in_channels
    for key in ("shortcut", "stride_on", "zero_init_residual"):
        value = getattr(cfg, key)
        if value is not None:
            options[key] = value
    return add_noise(create_model(cfg.name, **options), cfg.dropout, cfg.stochastic_depth)


def load_run_dataset(cfg):
    """The dataset of a run that divides its images by class (``data.labeled_per_class``, ``data.test_per_class``);
    None otherwise (the loaders read the source themselves)."""
    if cfg.labeled_per_class is None and cfg.unlabeled_subset is not None:
        raise ConfigError("data.unlabeled_subset", "needs data.labeled_per_class (which defines the unlabeled set)")
    if cfg.labeled_per_class is None and cfg.test_per_class is None:
        return None
    dataset = load_dataset(cfg)
    if cfg.labeled_per_class is not None:
        dataset = split_labeled(dataset, cfg.labeled_per_class, cfg.unlabeled_subset)
    if cfg.test_per_class is not None:
        dataset.test = first_per_class(dataset.test, cfg.test_per_class, dataset.num_classes, "data.test_per_class")[0]
    return dataset


def data_fingerprint(dataset) -> str:
    """A short hash of what the run trains on: source, class list, split sizes, labels and a sample of pixels."""
    h = hashlib.sha1()
    h.update(json.dumps([dataset.name, dataset.classes]).encode())
    for split in (dataset.train, dataset.val, dataset.test):
        if split is None:
            continue
        h.update(split.labels.numpy().tobytes())
        images = getattr(split, "images", None)
        if images is not None:  # in memory: shape and a sample of pixels
            h.update(str(tuple(images.shape)).encode())
            h.update(images[:: max(1, len(split) // 64)].numpy().tobytes())
        else:  # an image folder read by workers: its file list
            h.update("\n".join(split.paths).encode())
    return h.hexdigest()[:16]


@dataclass
class RunPaths:
    root: Path
    checkpoints: Path = field(init=False)
    last: Path = field(init=False)
    best: Path = field(init=False)

    def __post_init__(self):
        self.checkpoints = self.root / "checkpoints"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"


def _autocast(device: torch.device, amp: str):
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class _SignalCatcher:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps, so the checkpoint is written whole."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resume_source(resume: str | None, paths: RunPaths) -> Path | None:
    if resume is None:
        if paths.last.exists():
            raise FileExistsError(
                f"{paths.root} already holds a checkpoint ({paths.last}); pass --resume auto to continue it or "
                f"choose another --run-dir"
            )
        return None
    if resume == "auto":
        return paths.last if paths.last.exists() else None
    return Path(resume)


def _check_compatible(ckpt: dict, config: Config, classes: list[str], fingerprint: str, path: Path) -> None:
    old = from_dict(ckpt["config"])
    problems = []
    if old.model != config.model:
        problems.append(f"model {old.model} vs {config.model}")
    if ckpt["classes"] != classes:
        problems.append(f"class list {ckpt['classes'][:5]}... vs {classes[:5]}...")
    if ckpt["data_fingerprint"] != fingerprint:
        problems.append("training data differs (source, splits, labels or images)")
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))


def train(config: Config, run_dir: str | Path | None = None, resume: str | None = None, quiet: bool = False) -> dict:
    """Train as ``config`` says; returns the summary (also written to ``summary.json``)."""
    dist = distributed.setup(config.train.device)
    paths = RunPaths(Path(run_dir) if run_dir else Path("runs") / config.name)
    main = dist.is_main
    device = dist.device
    tc = config.train
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    resume_path = _resume_source(resume, paths)

    # Task (its settings checked before any data is read), data, model, optimizer, schedule.
    task = build_task(config.task)
    torch.manual_seed(tc.seed)
    data = build_data(
        config.data,
        batch_size=tc.batch_size,
        eval_batch_size=tc.eval_batch_size,
        seed=tc.seed,
        device=device,
        rank=dist.rank,
        world_size=dist.world_size,
        dataset=load_run_dataset(config.data),
    )
    dataset = data.dataset
    fingerprint = data_fingerprint(dataset)
    torch.manual_seed(tc.seed)
    model = build_model(config.model, dataset.num_classes, dataset.channels)
    init_info = {}
    if config.model.init and resume_path is None:  # a resumed run takes its weights from the checkpoint
        init_info = load_init(model, config.model.init, dataset.classes, config.model.init_head)
    if config.finetune.mode == "feature_extraction":
        freeze_backbone(model)
    if config.finetune.backbone_lr_scale < 0:
        raise ConfigError("finetune.backbone_lr_scale", f"must be >= 0; got {config.finetune.backbone_lr_scale}")
    model = model.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # A task may build a teacher (whose initialisation draws random numbers): the run's own stream stays untouched.
    with torch.random.fork_rng(devices=[]):
        task.prepare(model, data, config, device)
    optimizer = build_optimizer(model, config.optim, device, config.finetune.backbone_lr_scale)
    schedule = Schedule(config.schedule, config.optim.lr, tc.iterations)
    ema = None
    if tc.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)

    start_step, best_val = 0, math.inf
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        _check_compatible(ckpt, config, dataset.classes, fingerprint, resume_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start_step, best_val = int(ckpt["step"]), float(ckpt["best_val_error"])

    train_model = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_model = torch.compile(train_model) if tc.compile else train_model
    autocast = _autocast(device, tc.amp)

    if main:
        paths.root.mkdir(parents=True, exist_ok=True)
        (paths.root / "config.yaml").write_text(to_yaml(config))
    writer = MetricsWriter(paths.root, enabled=main)
    if resume_path is not None:
        writer.truncate_after(start_step)
    progress = Progress(tc.iterations, start_step, enabled=main and not quiet)

    def checkpoint_state(step: int) -> dict:
        return {
            "step": step,
            "config": to_dict(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": {"torch": torch.get_rng_state()},
            "classes": list(dataset.classes),
            "normalization": data.normalizer.state_dict(),
            # The size the model sees (a folder read by workers is cropped to data.image_size, default 224).
            "image_size": list(dataset.image_size) if all(dataset.image_size) else [config.data.image_size or 224] * 2,
            "in_channels": dataset.channels,
            "data_fingerprint": fingerprint,
            "best_val_error": best_val,
            "deepres_version": __version__,
        }

    def save(step: int, path: Path) -> None:
        if main:
            save_checkpoint(checkpoint_state(step), path)

    eval_model = lambda: ema.module if ema is not None else model  # noqa: E731

    def test_row(at_step: int) -> dict:
        result = evaluate(eval_model(), data.test, device=device, autocast=autocast)
        return {"step": at_step, "test_loss": result["loss"], "test_top1_error": result["top1_error"],
                "test_top5_error": result["top5_error"], "elapsed_s": time.time() - t_start}

    # Window accumulators stay on the device: no host sync per step.
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_wrong = torch.zeros((), dtype=torch.float64, device=device)
    window_count = window_steps = 0
    nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
    window_t0, t_start = time.time(), time.time()
    summary: dict = {}
    step = start_step
    batches = data.train.iterate(start_step)
    train_model.train()

    def check_finite(at_step: int, weights: bool = False) -> None:
        """Halt on a non-finite loss (and, before any checkpoint, non-finite weights): never save a broken state."""
        bad = int(nonfinite_step.item())
        if bad < 0 and weights:
            norms = torch._foreach_norm([p.detach() for p in model.parameters()])
            if not torch.isfinite(torch.stack(norms)).all():
                bad = at_step
        if distributed.any_rank(bad >= 0, device):
            where = f"step {bad}" if bad >= 0 else "another rank"
            last = f"; the last good checkpoint is {paths.last}" if paths.last.exists() else ""
            raise NonFiniteLossError(f"the training loss became NaN/inf at {where} (checked at step {at_step}){last}")

    try:
        with _SignalCatcher() as signals:
            while step < tc.iterations:
                lr = schedule.lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                images, targets = next(batches)
                if tc.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast():
                    targets = task.targets(images, targets)
                    outputs = step_model(images)
                    loss, logits = task.loss(outputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)

                labels = task.labels(targets)
                detached = loss.detach()
                nonfinite_step = torch.where(
                    (nonfinite_step < 0) & ~torch.isfinite(detached), torch.tensor(step, device=device), nonfinite_step
                )
                wrong = len(labels) - topk_correct(logits.detach(), labels, ks=(1,))[0]
                window_loss += detached.double()
                window_wrong += wrong.double()
                window_count += len(labels)
                window_steps += 1
                if not schedule.error_warmup_done:
                    if schedule.observe_train_error(100.0 * wrong.item() / len(labels)) and main:
                        progress.write(f"step {step + 1}: training error below "
                                       f"{config.schedule.warmup_until_train_error}%, lr {config.optim.lr}")
                step += 1

                if step % tc.log_every == 0 or step == tc.iterations:
                    check_finite(step)
                    stats = torch.stack([window_loss, window_wrong, torch.tensor(float(window_count), device=device,
                                                                                 dtype=torch.float64)])
                    stats = distributed.all_reduce_sum(stats)
                    elapsed = time.time() - window_t0
                    row = {
                        "step": step,
                        "lr": lr,
                        "train_loss": stats[0].item() / (window_steps * dist.world_size),
                        "train_top1_error": 100.0 * stats[1].item() / max(1.0, stats[2].item()),
                        "images_per_s": stats[2].item() / max(elapsed, 1e-9),
                        "elapsed_s": time.time() - t_start,
                    }
                    writer.write(row)
                    progress.update(step, row)
                    window_loss.zero_(), window_wrong.zero_()
                    window_count, window_steps, window_t0 = 0, 0, time.time()
                else:
                    progress.update(step)

                if data.val is not None and (step % tc.eval_every == 0 or step == tc.iterations):
                    check_finite(step, weights=True)
                    result = evaluate(eval_model(), data.val, device=device, autocast=autocast)
                    row = {"step": step, "val_loss": result["loss"], "val_top1_error": result["top1_error"],
                           "val_top5_error": result["top5_error"], "elapsed_s": time.time() - t_start}
                    writer.write(row)
                    progress.write(f"step {step}: val top-1 error {result['top1_error']:.2f}%")
                    if result["top1_error"] < best_val:
                        best_val = result["top1_error"]
                        save(step, paths.best)

                if tc.test_every and step % tc.test_every == 0 and step < tc.iterations:
                    writer.write(test_row(step))

                if step % tc.checkpoint_every == 0 or step == tc.iterations:
                    check_finite(step, weights=True)
                    save(step, paths.last)

                if distributed.any_rank(signals.signum is not None, device):
                    check_finite(step, weights=True)
                    save(step, paths.last)
                    raise TrainingInterrupted(signals.signum or signal.SIGTERM, step)

        row = test_row(step)
        writer.write(row)
        summary = {
            "run_dir": str(paths.root),
            "model": config.model.name,
            "data": dataset.name,
            "iterations": step,
            "test_top1_error": row["test_top1_error"],
            "test_top5_error": row["test_top5_error"],
            "test_accuracy": 100.0 - row["test_top1_error"],
            "best_val_top1_error": None if math.isinf(best_val) else best_val,
            "elapsed_s": time.time() - t_start,
            "device": str(device),
            "world_size": dist.world_size,
            **init_info,
            **task.summary(),
        }
        if main:
            (paths.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except torch.cuda.OutOfMemoryError as exc:
        smaller = max(dist.world_size, tc.batch_size // 2 // dist.world_size * dist.world_size)
        raise RuntimeError(
            f"CUDA out of memory at train.batch_size={tc.batch_size} on {device}: try --set train.batch_size={smaller} "
            f"(and scale optim.lr by the same factor), or --set train.amp=bf16 --set train.channels_last=true"
        ) from exc
    finally:
        progress.close()
        writer.close()
        if dist.joined:
            distributed.cleanup()
    return summary


def load_for_inference(checkpoint: dict, device: torch.device | str = "cpu") -> tuple[nn.Module, Normalizer, dict]:
    """The model of a checkpoint in eval mode (EMA weights when the run kept them), its normalizer and config."""
    config = from_dict(checkpoint["config"])
    model = build_model(config.model, len(checkpoint["classes"]), int(checkpoint["in_channels"]))
    state = checkpoint["model"]
    if checkpoint.get("ema") is not None:
        state = {k[len("module."):]: v for k, v in checkpoint["ema"].items() if k.startswith("module.")}
    model.load_state_dict(state)
    return model.to(device).eval(), Normalizer.from_state_dict(checkpoint["normalization"]), config
