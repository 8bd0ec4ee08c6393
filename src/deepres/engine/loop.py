"""The training loop: the one way deepres trains, iteration based as the paper.

``train(config, run_dir, resume)`` sets a run up (:func:`setup_run`: task, data, model, optimizer, schedule, EMA, the
step), trains for ``train.iterations`` steps, evaluates on the validation split every ``eval_every`` steps
(``best.pt`` by validation error, never test error), tests every ``test_every`` steps and at the end, and checkpoints
atomically every ``checkpoint_every`` steps and on SIGTERM/SIGINT. What differs between a laptop CPU and a GPU is the
step (:mod:`.steps`: eager, compiled or captured as a CUDA graph), the precision and the loader, all chosen in the
config; every run writes the same files and resumes exactly: the data order and augmentation are functions of
(seed, epoch, step) and the checkpoint holds everything else (CPU, deterministic mode: bit for bit).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .. import distributed
from ..config import (ENVIRONMENT_KEYS, Config, ConfigError, config_differences, from_dict, step_kind, to_dict,
                      to_yaml)
from ..data import build_data, load_run_dataset
from ..data.images import BadImageError
from ..evaluation import evaluate
from ..models import count_parameters
from ..models.transfer import freeze_backbone, load_init
from ..runs import (RunLock, RunPaths, build_model, check_model, check_teacher, data_fingerprint, load_checkpoint,
                    load_teacher, save_checkpoint)
from ..tasks import build_task
from ..version import __version__
from .fit import fit_to_data
from .logging import MetricsWriter, Progress, read_metrics
from .optim import Schedule, build_optimizer
from .steps import EagerStep, build_step

__all__ = ["EXIT_DIVERGED", "NonFiniteLossError", "Run", "TrainingInterrupted", "setup_run", "train"]

EXIT_DIVERGED = 3  # exit status of `deepres train` when the loss became NaN/inf (its summary.json says "diverged")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; ``last.pt`` was written at the current step."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by signal {signum} at step {step}; last.pt saved")


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


class _Clock:
    """Wall time of a run, with evaluations paused out: ``train_seconds`` is the time the steps took."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()
        self.paused = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def train_seconds(self) -> float:
        return self.elapsed() - self.paused


@dataclass
class Run:
    """Everything a training run holds between steps."""

    config: Config
    paths: RunPaths
    dist: distributed.DistInfo
    data: object
    fingerprint: str
    model: nn.Module
    task: object
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    ema: object
    step_fn: EagerStep
    writer: MetricsWriter
    progress: Progress
    init_info: dict = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    step: int = 0
    best_val: float = math.inf
    setup_seconds: float = 0.0
    lock: object = None
    # The training-log window the checkpoint was written in (restored into the loop's window on resume).
    window_state: dict | None = None
    # A model the caller built (deepres.train(model=...)): its class, recorded in checkpoints; None: config.model.
    model_class: str | None = None
    # Data the caller gave (deepres.train(dataset=...)): its name, recorded in checkpoints; None: config.data.
    data_given: str | None = None
    # Callbacks of the Python API: on_step(step, {"loss", "lr"}) after every step (returning False stops the run
    # after that step, tested and checkpointed); on_eval(step, row) after every validation and test row.
    on_step: object = None
    on_eval: object = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


# ---------------------------------------------------------------------------------------------------------------
# Setup


def _resume_source(resume: str | None, paths: RunPaths) -> Path | None:
    """The checkpoint to resume from. A fresh run (``resume=None``) refuses a folder that holds an earlier run's
    files: they are never appended to or overwritten."""
    if resume is None:
        earlier = paths.run_files()
        if earlier:
            raise FileExistsError(
                f"{paths.root} already holds a run ({', '.join(earlier)}); pass --resume auto to continue it or "
                f"choose another --run-dir"
            )
        return None
    if resume == "auto":
        return paths.last if paths.last.exists() else None
    return Path(resume)


# Settings a resumed run must share with its checkpoint: they decide which images each step sees and how, so
# resuming with others would not continue the run but start a different one from its weights (model.init does that).
EXACT_RESUME_KEYS = ("train.batch_size", "train.seed", "data.gather", "data.preset", "data.randaugment_n",
                     "data.randaugment_m", "data.trivialaugment", "data.augment", "data.augment_p",
                     "data.random_erasing", "data.cutmix_alpha", "data.mixup_alpha")


def _check_compatible(ckpt: dict, config: Config, classes: list[str], fingerprint: str, path: Path) -> None:
    old = from_dict(ckpt["config"])
    problems = []
    if old.model != config.model:
        problems.append(f"model {old.model} vs {config.model}")
    if old.optim.name != config.optim.name:
        problems.append(f"optim.name {old.optim.name} vs {config.optim.name} (the checkpoint holds {old.optim.name}'s "
                        f"state; to go on from these weights with {config.optim.name} start a new run with --set "
                        f"model.init={path})")
    for key in EXACT_RESUME_KEYS:
        section, name = key.split(".")
        before, now = getattr(getattr(old, section), name), getattr(getattr(config, section), name)
        if before != now:
            problems.append(f"{key} {before} vs {now} (the data order and augmentation would change; to train on "
                            f"from these weights with other settings start a new run with --set model.init={path})")
    if ckpt["classes"] != classes:
        problems.append(f"class list {ckpt['classes'][:5]}... vs {classes[:5]}...")
    if ckpt["data_fingerprint"] != fingerprint:
        problems.append("training data differs (source, splits, labels or images)")
    if problems:
        raise ValueError(f"cannot resume from {path}: " + "; ".join(problems))


# Keys that say where, how fast or how often, not what is trained: a resumed run may change them without a notice.
UNNOTICED_ON_RESUME = ENVIRONMENT_KEYS | {"data.on_bad_image", "data.max_image_pixels", "train.eval_every",
                                          "train.test_every", "train.checkpoint_every", "train.log_every"}


def resumed_changes(ckpt_config: dict, config: Config, step: int) -> str | None:
    """A notice naming the settings a resumed run changed against its checkpoint's (the ones that decide the data
    are refused by ``_check_compatible``): from ``step`` on the new values apply, so the run is neither the
    checkpoint's run continued nor one uninterrupted run with the new settings. None when nothing changed."""
    changed = [f"{key} {old} -> {new}" for key, (old, new) in
               config_differences(from_dict(ckpt_config), config, ignore=UNNOTICED_ON_RESUME).items()]
    if not changed:
        return None
    return (f"resumed at step {step:,} with settings other than the checkpoint's: {'; '.join(changed)}; the new "
            f"values apply from step {step:,} on (the steps before followed the old ones)")


def weight_ema(model: nn.Module, decay: float | None, warmup: bool = True):
    """The exponential moving average of ``model``'s weights and buffers (None without ``decay``): the first update
    copies them, the n-th after it moves the average by 1 - d towards them, d = min(decay, (1 + n) / (10 + n)) with
    ``warmup`` (TensorFlow's ExponentialMovingAverage with num_updates), d = decay without. A
    :class:`WeightEMA`."""
    return WeightEMA(model, decay, warmup) if decay else None


class WeightEMA(torch.optim.swa_utils.AveragedModel):
    """torch's ``AveragedModel`` (``module`` the average, ``n_averaged`` its update count; the same state dict) with
    an update that does not wait for the GPU: the rate is computed on the host from the count's CPU buffer, where
    ``AveragedModel``'s own update copies the count to the device every step (from pageable memory: a copy that
    waits for the stream)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        super().__init__(model, use_buffers=True)
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        n = int(self.n_averaged)  # a CPU tensor (unless the average was moved): no device synchronisation
        averages = [*self.module.parameters(), *self.module.buffers()]
        currents = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if n == 0:
            for average, current in zip(averages, currents, strict=True):
                average.copy_(current)
        else:
            rate = min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay
            groups: dict[tuple, tuple[list, list]] = {}
            for average, current in zip(averages, currents, strict=True):
                if torch.is_floating_point(average):
                    pair = groups.setdefault((average.device, average.dtype), ([], []))
                    pair[0].append(average)
                    pair[1].append(current)
                else:  # integer buffers (BN's batch counts)
                    average.copy_(average * rate + current * (1.0 - rate))
            for group_averages, group_currents in groups.values():
                torch._foreach_lerp_(group_averages, group_currents, 1.0 - rate)
        self.n_averaged += 1


def setup_run(config: Config, run_dir: str | Path | None = None, resume: str | None = None,
              quiet: bool = False, model: nn.Module | None = None, dataset=None) -> Run:
    """Build a run from its config: task (its teacher checked before any data is read), data, model (``model.init``
    loaded into a fresh run, the backbone frozen for feature extraction), optimizer, schedule, EMA and step; restore
    ``resume``'s checkpoint when given. ``model`` replaces the config's model, ``dataset`` (a
    :class:`~deepres.data.Dataset`; its validation split carved here from ``data.val_size`` when it has none) the
    config's data source."""
    t0 = time.perf_counter()
    config.validate()
    dist = distributed.setup(config.train.device, config.train.dist_timeout_s)
    try:
        run = _setup(config, dist, run_dir, resume, quiet, model, dataset)
    except BaseException:
        if dist.joined:
            distributed.cleanup()
        raise
    run.setup_seconds = time.perf_counter() - t0
    return run


def _setup(config: Config, dist: distributed.DistInfo, run_dir, resume, quiet, model, dataset) -> Run:
    paths = RunPaths(Path(run_dir) if run_dir else Path("runs") / config.name)
    lock = RunLock(paths.root).acquire() if dist.is_main else None  # before anything in the folder is read
    try:
        return _setup_locked(config, dist, paths, lock, resume, quiet, model, dataset)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _setup_locked(config: Config, dist: distributed.DistInfo, paths: RunPaths, lock, resume, quiet,
                  given_model: nn.Module | None = None, given_data=None) -> Run:
    device, tc = dist.device, config.train
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cuda":  # set for every run, so runs in one process do not inherit each other's setting
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tc.tf32
    resume_path = _resume_source(resume, paths)
    resume_state = None
    if resume_path is not None:  # read first: a run of a caller's model or data resumes only with them
        resume_state = load_checkpoint(resume_path)
        _check_given(resume_state, resume_path, given_model, given_data)

    task = build_task(config.task)
    if task.needs_teacher:
        check_teacher(config.task.teacher)
    if given_model is not None and config.model.init == "pretrained":
        raise ConfigError("model.init", f"'pretrained' loads the published weights of model.name "
                          f"({config.model.name}) into the model deepres builds; with your own model ("
                          f"{_class_name(given_model)}), load its weights before training, or give model.init a "
                          f"checkpoint or state-dict file")
    if given_model is None:
        check_model(config.model)
        if config.model.init == "pretrained" and resume_path is None:
            from ..models.pretrained import fetch_pretrained

            fetch_pretrained(config.model.name)
    fitted = []
    if given_data is not None:
        if tc.fit_to_data:
            count = (len(given_data.train) + len(given_data.val or ()), given_data.name, given_data.image_size)
            config, fitted = fit_to_data(config, dist.world_size, count)
            tc = config.train
        else:  # misfits (a validation split or a batch larger than the data) are errors naming every key at once
            own_val = given_data.val is not None  # then data.val_size carves nothing
            checked = dataclasses.replace(config, data=dataclasses.replace(config.data, val_size=0)) if own_val \
                else config
            fit_to_data(checked, dist.world_size, (len(given_data.train), given_data.name, given_data.image_size))
        given_data = _with_validation(given_data, config.data)
    elif tc.fit_to_data or _plain_folder(config.data):
        config, fitted = fit_to_data(config, dist.world_size)
        tc = config.train
    torch.manual_seed(tc.seed)
    data = build_data(config.data, batch_size=tc.batch_size, eval_batch_size=tc.eval_batch_size, seed=tc.seed,
                      device=device, rank=dist.rank, world_size=dist.world_size,
                      dataset=given_data if given_data is not None else load_run_dataset(config.data))
    dataset = data.dataset
    if tc.epochs is not None:  # resolved now that the data is known, and saved so
        iterations = max(1, round(tc.epochs * data.train.steps_per_epoch))
        config = dataclasses.replace(config, train=dataclasses.replace(tc, iterations=iterations))
        tc = config.train
    torch.manual_seed(tc.seed)
    model = given_model if given_model is not None else build_model(config.model, dataset.num_classes,
                                                                    dataset.channels)
    init_info = {}
    if config.model.init and resume_path is None:  # a resumed run takes its weights from the checkpoint
        weights = None
        if config.model.init == "pretrained":
            from ..models.pretrained import pretrained_weights

            weights = pretrained_weights(config.model.name, model)
        init_info = load_init(model, config.model.init, dataset.classes, config.model.init_head, weights)
    if config.finetune.mode == "feature_extraction":
        freeze_backbone(model)
    model = model.to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tc.grad_checkpointing:
        _grad_checkpointing(model)
    # A teacher's construction draws random numbers: the run's own stream stays untouched.
    with torch.random.fork_rng(devices=[]):
        teacher = load_teacher(config.task.teacher, dataset.classes, device) if task.needs_teacher else None
        task.prepare(model, data, config, device, teacher)
    optimizer = build_optimizer(model, config.optim, device, config.finetune.backbone_lr_scale,
                                capturable=step_kind(config) == "graph")
    schedule = Schedule(config.schedule, config.optim.lr, tc.iterations)
    ema = weight_ema(model, tc.ema_decay, tc.ema_warmup)
    writer = MetricsWriter(paths.root, enabled=dist.is_main)
    progress = Progress(tc.iterations, 0, enabled=dist.is_main and not quiet)
    train_model = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run = Run(config, paths, dist, data, data_fingerprint(dataset), model, task, optimizer, schedule, ema,
              step_fn=None, writer=writer, progress=progress, init_info=init_info, lock=lock,
              model_class=None if given_model is None else _class_name(given_model),
              data_given=None if given_data is None else dataset.name)
    if resume_state is not None:
        restore(run, resume_state, resume_path)
    # The step is built after any restore: a captured step puts device tensors in the optimizer's learning rates.
    run.step_fn = build_step(config, model, train_model, task, optimizer, ema, device, dist.world_size,
                             notice=lambda text: _notice(run, text))
    changes = None if resume_state is None else resumed_changes(resume_state["config"], config, run.step)
    for text in fitted + schedule.notices() + ([changes] if changes else []):
        _notice(run, text)
    if resume_state is not None:
        run.step_fn.load_state_dict(resume_state.get("step_state") or {})
    progress.start_step = run.step
    if dist.is_main:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.remove_partial_writes()
        (paths.root / "config.yaml").write_text(to_yaml(config))
        # The log follows the checkpoint: rows after it are recomputed identically, and without one (a run killed
        # before its first checkpoint, resumed) the log starts afresh. A final test row comes after its run's final
        # checkpoint: resumed from there (a finished run, or one given more iterations), it goes.
        final = resume_state is not None and resume_state["config"]["train"]["iterations"] == run.step
        writer.truncate_after(run.step if resume_path is not None else -1,
                              drop=lambda row: final and row["step"] == run.step and "test_loss" in row)
    return run


def _grad_checkpointing(model: nn.Module) -> None:
    """Turn on the model's activation checkpointing (timm's ``set_grad_checkpointing``); a model without it is a
    config error naming its class."""
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        raise ConfigError("train.grad_checkpointing", f"the model ({_class_name(model)}) has no "
                          f"set_grad_checkpointing(enable) method to recompute its activations; every deepres model "
                          f"and timm's models have one; use train.micro_batches to save memory instead")
    model.set_grad_checkpointing(True)


def _check_given(ckpt: dict, path: Path, given_model, given_data) -> None:
    """A checkpoint of a run that trained a model or data given in Python resumes only with them given again."""
    given = []
    if ckpt.get("model_class") and given_model is None:
        given.append(f"model=... (your {ckpt['model_class']})")
    if ckpt.get("data_given") and given_data is None:
        given.append("dataset=... (the data it trained on)")
    if given:
        raise ValueError(f"cannot resume from {path}: the run trained on what was given in Python; resume it there "
                         f"with the same: deepres.train(..., resume=\"auto\", {', '.join(given)})")


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _with_validation(dataset, data) -> object:
    """A caller's dataset with the validation split carved as ``data.val_size`` says (unless it brings one)."""
    from ..data.datasets import carve_validation

    if dataset.val is not None or not data.val_size:
        return dataset
    train, val = carve_validation(dataset.train, data.val_size)
    return dataclasses.replace(dataset, train=train, val=val)


def _plain_folder(data) -> bool:
    """An image folder on disk (not an archive or a prepared file): cheap to count before anything is decoded."""
    return data.source == "imagefolder" and bool(data.data_dir) and Path(data.data_dir).expanduser().is_dir()


def _notice(run: Run, text: str) -> None:
    run.notices.append(text)
    run.progress.write(f"notice: {text}")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: state and restore in one place


def checkpoint_state(run: Run, weights_only: bool = False) -> dict:
    """Everything an exact resume needs, as plain tensors and numbers; ``weights_only`` (``best.pt``): the weights
    and what using them needs (config, classes, normalisation), without the optimizer and resume state."""
    dataset, config = run.data.dataset, run.config
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {
        "step": run.step,
        "config": to_dict(config),
        "model": run.model.state_dict(),
        "optimizer": None if weights_only else run.step_fn.optimizer_state(),
        "schedule": None if weights_only else run.schedule.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "step_state": None if weights_only else run.step_fn.state_dict(),
        "window": None if weights_only else run.window_state,
        "rng": None if weights_only else rng,
        "classes": list(dataset.classes),
        "normalization": run.data.normalizer.state_dict(),
        # The size the model sees (a folder read by workers is cropped to data.image_size, default 224).
        "image_size": list(dataset.image_size) if all(dataset.image_size) else [config.data.image_size or 224] * 2,
        "in_channels": dataset.channels,
        "data_fingerprint": run.fingerprint,
        # The autocast its evaluations ran in ("off", "bf16", "fp16"): deepres eval repeats them by default.
        "eval_precision": run.step_fn.precision.name,
        "model_class": run.model_class,
        "data_given": run.data_given,
        "best_val_error": run.best_val,
        "deepres_version": __version__,
    }


def restore(run: Run, ckpt: dict, path: Path) -> None:
    """Load a checkpoint written by :func:`checkpoint_state` into a freshly set-up run (the step's own state, e.g.
    the fp16 loss scale, is restored once the step exists)."""
    if ckpt.get("optimizer") is None:
        raise ValueError(f"cannot resume from {path}: it holds weights only (best.pt, or an exported run); resume from "
                         f"last.pt, or start a new run from these weights with --set model.init={path}")
    _check_compatible(ckpt, run.config, run.data.dataset.classes, run.fingerprint, path)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["schedule"])
    if run.ema is not None and ckpt.get("ema") is not None:
        run.ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    run.step, run.best_val = int(ckpt["step"]), float(ckpt["best_val_error"])
    run.window_state = ckpt.get("window")


def _save(run: Run, path: Path, window: _Window | None = None) -> None:
    if window is not None:
        run.window_state = window.state_dict()
    if run.dist.is_main:
        save_checkpoint(checkpoint_state(run, weights_only=path == run.paths.best), path)


# ---------------------------------------------------------------------------------------------------------------
# Logging, evaluation, finiteness


class _Window:
    """Training statistics since the last log row, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.wrong = torch.zeros((), dtype=torch.float64, device=device)
        self.count = self.steps = 0
        self.nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.t0 = time.perf_counter()

    def state_dict(self) -> dict:
        """The log window so far: a checkpoint inside a log window carries it, so the resumed run's next row equals
        the uninterrupted run's."""
        return {"loss": float(self.loss), "wrong": float(self.wrong), "count": self.count, "steps": self.steps}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.loss.fill_(state["loss"]), self.wrong.fill_(state["wrong"])
            self.count, self.steps = int(state["count"]), int(state["steps"])

    def add(self, loss: torch.Tensor, wrong: torch.Tensor, count: int, step: int) -> None:
        self.loss += loss.double()
        self.wrong += wrong.double()
        self.count += count
        self.steps += 1
        bad = (self.nonfinite_step < 0) & ~torch.isfinite(loss)
        self.nonfinite_step = torch.where(bad, torch.full_like(self.nonfinite_step, step), self.nonfinite_step)

    def row(self, step: int, lr: float, world_size: int, elapsed: float) -> dict:
        """The log row of the window, summed over every rank; the window starts again."""
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.device)
        stats = distributed.all_reduce_sum(torch.stack([self.loss, self.wrong, count]))
        seconds = time.perf_counter() - self.t0
        row = {"step": step, "lr": lr, "train_loss": stats[0].item() / (self.steps * world_size),
               "train_top1_error": 100.0 * stats[1].item() / max(1.0, stats[2].item()),
               "images_per_s": stats[2].item() / max(seconds, 1e-9), "elapsed_s": elapsed}
        self.loss.zero_(), self.wrong.zero_()
        self.count = self.steps = 0
        self.t0 = time.perf_counter()
        return row


def _check_finite(run: Run, window: _Window, at_step: int, weights: bool = False) -> None:
    """Halt on a non-finite loss (and, before any checkpoint, non-finite weights or BN statistics): never save a
    broken state."""
    bad = int(window.nonfinite_step.item())
    if bad < 0 and weights:
        tensors = [t.detach() for t in run.model.state_dict().values() if t.is_floating_point()]
        if not torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all():
            bad = at_step
    if distributed.any_rank(bad >= 0, run.device):
        where = f"step {bad}" if bad >= 0 else "another rank"
        last = f"; the last good checkpoint is {run.paths.last}" if run.paths.last.exists() else ""
        raise NonFiniteLossError(f"the training loss became NaN/inf at {where} (checked at step {at_step}){last}")


def _evaluate(run: Run, loader, clock: _Clock) -> dict:
    """Loss, top-1 and top-5 error on a split; the time it takes is not training time."""
    clock.sync()
    t0 = time.perf_counter()
    result = evaluate(run.eval_model, loader, device=run.device, autocast=run.step_fn.precision.autocast)
    clock.paused += time.perf_counter() - t0
    return result


def _write_eval(run: Run, row: dict) -> None:
    """An evaluation row into the log, then to the caller's ``on_eval``."""
    run.writer.write(row)
    if run.on_eval is not None:
        run.on_eval(row["step"], dict(row))


def _test_row(run: Run, clock: _Clock) -> dict:
    result = _evaluate(run, run.data.test, clock)
    return {"step": run.step, "test_loss": result["loss"], "test_top1_error": result["top1_error"],
            "test_top5_error": result["top5_error"], "train_seconds": clock.train_seconds(),
            "elapsed_s": clock.elapsed()}


def _validate(run: Run, clock: _Clock, window: _Window) -> None:
    result = _evaluate(run, run.data.val, clock)
    _write_eval(run, {"step": run.step, "val_loss": result["loss"], "val_top1_error": result["top1_error"],
                      "val_top5_error": result["top5_error"], "elapsed_s": clock.elapsed()})
    run.progress.write(f"step {run.step}: val top-1 error {result['top1_error']:.2f}%")
    if result["top1_error"] < run.best_val:
        run.best_val = result["top1_error"]
        _save(run, run.paths.best, window)


def _observe_warmup(run: Run, wrong: torch.Tensor, count: int) -> None:
    """The paper's ResNet-110 warm-up (lr 0.01 until the training error is below 80%), decided from the error of
    the whole global batch, summed over every rank, so all replicas switch on the same step."""
    counts = torch.stack([wrong.double(), torch.tensor(float(count), dtype=torch.float64, device=run.device)])
    wrong_all, count_all = distributed.all_reduce_sum(counts).tolist()
    if run.schedule.observe_train_error(100.0 * wrong_all / count_all, run.step):
        run.progress.write(f"step {run.step + 1}: training error below "
                           f"{run.config.schedule.warmup_until_train_error}%, lr {run.config.optim.lr}")


def _init_words(info: dict) -> str:
    """Where a run's weights came from (model.init), for its start line; "" for a fresh model."""
    if not info:
        return ""
    adapted = "".join(f", {key} adapted" for key in info["init_adapted"])
    return f", weights from {info.get('init_weights', info['init'])} ({info['init_head']} classifier{adapted})"


def _start_line(run: Run) -> str:
    d, c = run.data.dataset, run.config
    splits = ", ".join(f"{name} {len(d.splits()[name]):,}{run.task.training_images() if name == 'train' else ''}"
                       for name in ("train", "val", "test") if name in d.splits())
    if d.extra.get("carved"):
        splits += f" ({d.extra['carved']})"
    describe = run.step_fn.describe()
    micro = f", {describe['micro_batches']} micro-batches per batch" if describe.get("micro_batches", 1) > 1 else ""
    init = _init_words(run.init_info)
    total, trained = count_parameters(run.model), count_parameters(run.model, trainable_only=True)
    if trained < total:  # feature extraction: the classifier alone
        init += f"; {trained:,} of them train"
    if c.finetune.backbone_lr_scale != 1.0:
        init += f"; the backbone at {c.finetune.backbone_lr_scale:g}x the learning rate"
    return (f"deepres train: {run.model_class or c.model.name} ({total:,} parameters{init}) on "
            f"{d.name} ({splits}; "
            f"{run.data.loader} loader), {run.device} x {run.dist.world_size}, step {describe['step']}, precision "
            f"{'fp32' if describe['amp'] == 'off' else describe['amp']}"
            f"{', channels_last' if c.train.channels_last else ''}{micro}"
            f"{', gradient checkpointing' if c.train.grad_checkpointing else ''}"
            f"{', optimizer AdamW' if c.optim.name == 'adamw' else ''}; from step {run.step} of "
            f"{c.train.iterations:,}; run folder {run.paths.root}")


# ---------------------------------------------------------------------------------------------------------------
# The loop


def _train_steps(run: Run, clock: _Clock, signals: _SignalCatcher) -> dict | None:
    """Train from ``run.step`` to the end (or to ``train.stop_at_accuracy``); returns the test row that stopped it
    early, if any."""
    tc = run.config.train
    window = _Window(run.device)
    window.load_state_dict(run.window_state)
    batches = run.data.train.iterate(run.step)
    run.model.train()
    lr = None
    while run.step < tc.iterations:
        new_lr = run.schedule.lr_at(run.step)
        if new_lr != lr:
            run.step_fn.set_lr(new_lr)
            lr = new_lr
        try:
            images, targets = next(batches)
        except BadImageError as exc:  # data.on_bad_image=error: the steps since the last checkpoint are kept
            raise _bad_image_met(run, window, exc) from None
        if tc.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss, wrong, count = run.step_fn(images, targets)
        window.add(loss, wrong, count, run.step)
        if not run.schedule.error_warmup_done:
            _observe_warmup(run, wrong, count)
        run.step += 1
        step, last = run.step, run.step == tc.iterations

        if step % tc.log_every == 0 or last:
            _check_finite(run, window, step)
            row = window.row(step, lr, run.dist.world_size, clock.elapsed())
            run.writer.write(row)
            run.progress.update(step, row)
        else:
            run.progress.update(step)
        if run.data.val is not None and (step % tc.eval_every == 0 or last):
            _check_finite(run, window, step, weights=True)
            _validate(run, clock, window)
        if tc.test_every and step % tc.test_every == 0 and not last:
            row = _test_row(run, clock)
            _write_eval(run, row)
            if tc.stop_at_accuracy is not None and 100.0 - row["test_top1_error"] >= tc.stop_at_accuracy:
                _check_finite(run, window, step, weights=True)
                _save(run, run.paths.last, window)
                return row
        if step % tc.checkpoint_every == 0 or last:
            _check_finite(run, window, step, weights=True)
            _save(run, run.paths.last, window)
        if run.on_step is not None and run.on_step(step, {"loss": loss, "lr": lr}) is False and not last:
            _check_finite(run, window, step, weights=True)
            _save(run, run.paths.last, window)
            row = _test_row(run, clock)
            _write_eval(run, row)
            return row
        if distributed.any_rank(signals.signum is not None, run.device):
            _check_finite(run, window, step, weights=True)
            _save(run, run.paths.last, window)
            raise TrainingInterrupted(signals.signum or signal.SIGTERM, step)
    return None


def _bad_image_met(run: Run, window: _Window, exc: BadImageError) -> BadImageError:
    """The error for a bad image file drawn by step ``run.step + 1``, after saving ``last.pt`` at ``run.step`` (one
    process: a rank alone cannot checkpoint a distributed run) so that a resumed run loses no step."""
    saved = ""
    if run.dist.world_size == 1 and run.step > run.progress.start_step:
        _check_finite(run, window, run.step, weights=True)
        _save(run, run.paths.last, window)
        saved = f"; {run.paths.last} holds the {run.step:,} steps before it: --resume auto continues there"
    return BadImageError(exc.path, f"{exc.reason} (drawn for step {run.step + 1:,}{saved})")


def _summary(run: Run, final: dict, clock: _Clock, stopped: bool) -> dict:
    config, dataset = run.config, run.data.dataset
    rows = read_metrics(run.writer.path)
    tests = [r for r in rows if "test_top1_error" in r]
    # the step best.pt was saved at: the first validation reaching the best error (None: no validation, or its row
    # is not in this folder's log)
    best_step = next((r["step"] for r in rows if r.get("val_top1_error") == run.best_val), None)
    device = run.device
    return {
        "run_dir": str(run.paths.root),
        "model": run.model_class or config.model.name,
        "parameters": count_parameters(run.model),
        "data": dataset.name,
        "iterations": run.step,
        "splits": {name: len(split) for name, split in dataset.splits().items()},
        "test_top1_error": final["test_top1_error"],
        "test_top5_error": final["test_top5_error"],
        "test_accuracy": 100.0 - final["test_top1_error"],
        "best_val_top1_error": None if math.isinf(run.best_val) else run.best_val,
        # best.pt: the weights of the best validation error, or the final weights when there is no validation split.
        "best_checkpoint": "best validation error" if run.data.val is not None else "final weights (no validation)",
        "best_step": best_step if run.data.val is not None else run.step,
        "reached_accuracy": config.train.stop_at_accuracy if stopped else None,
        "test_curve": [{"step": r["step"], "train_seconds": r.get("train_seconds"),
                        "test_accuracy": 100.0 - r["test_top1_error"]} for r in tests],
        "device": str(device),
        "world_size": run.dist.world_size,
        **run.step_fn.describe(),
        "channels_last": config.train.channels_last,
        "grad_checkpointing": config.train.grad_checkpointing,
        "tf32": config.train.tf32 if device.type == "cuda" else None,
        "setup_seconds": run.setup_seconds,
        "train_seconds": clock.train_seconds(),
        "eval_seconds": clock.paused,
        "seconds_per_step": clock.train_seconds() / max(1, run.step - run.progress.start_step),
        "elapsed_s": clock.elapsed(),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "notices": run.notices,
        # The paper's ResNet-110 rule: iterations held at warmup_lr until the training error fell below the threshold
        # (None: it never did). Absent when the rule is off.
        **({"error_warmup_iterations": run.schedule.error_warmup_iterations}
           if config.schedule.warmup_until_train_error is not None else {}),
        **run.init_info,
        **run.task.summary(),
    }


def _flatten_config(config: Config) -> dict:
    out = {}
    for section, values in to_dict(config).items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            out[f"{section}.{key}" if key else section] = value
    return out


def _write_summary(run: Run, summary: dict) -> None:
    if run.dist.is_main:
        (run.paths.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _out_of_memory(run: Run, what: str) -> str:
    """What to try when a step ran out of memory: more micro-batches (the same run in less memory), a smaller batch,
    bf16."""
    tc, world = run.config.train, run.dist.world_size
    smaller = max(world, tc.batch_size // 2 // world * world)
    per_process = tc.batch_size // world
    more = min(per_process, tc.micro_batches * 2)
    parts = (f"--set train.micro_batches={more} (the same batches in {more} parts: the same run in less memory), "
             if more > tc.micro_batches else "")
    now = f"train.batch_size={tc.batch_size}" + (f", train.micro_batches={tc.micro_batches}" if tc.micro_batches > 1
                                                 else "")
    recompute = ("" if tc.grad_checkpointing or step_kind(run.config) == "graph" else
                 "--set train.grad_checkpointing=true (the same run, activations recomputed in the backward pass), ")
    return (f"{what} at {now} on {run.device}: try {parts}{recompute}--set train.batch_size={smaller} (and scale "
            f"optim.lr by the same factor), or --set train.amp=bf16 --set train.channels_last=true")


def _peer_lost(exc: RuntimeError) -> bool:
    """A collective that timed out or lost its peer (gloo raises plain RuntimeErrors for both)."""
    text = str(exc).lower()
    return isinstance(exc, torch.distributed.DistError) or any(
        s in text for s in ("timed out", "timeout", "connection closed", "connection reset"))


def train(config: Config, run_dir: str | Path | None = None, resume: str | None = None, quiet: bool = False, *,
          model: nn.Module | None = None, dataset=None, on_step=None, on_eval=None) -> dict:
    """Train as ``config`` says; returns the summary (also written to ``summary.json``).

    ``model`` and ``dataset`` replace the config's model and data source; ``on_step(step, {"loss", "lr"})`` runs
    after every step (``loss`` a tensor on the device: ``.item()`` waits for it; returning False ends the run
    there, tested and checkpointed) and ``on_eval(step, row)`` after every validation and test row.

    ``resume``: None (a fresh run; a folder that holds a checkpoint is refused), ``"auto"`` (continue the folder's
    ``last.pt`` if there is one) or a checkpoint path. A loss that becomes NaN/inf raises
    :class:`NonFiniteLossError` after writing ``{"diverged": true, ...}`` as the summary; SIGTERM/SIGINT save
    ``last.pt`` and raise :class:`TrainingInterrupted`.
    """
    run = setup_run(config, run_dir, resume, quiet, model, dataset)
    run.on_step, run.on_eval = on_step, on_eval
    run.progress.write(_start_line(run))
    clock = _Clock(run.device)
    try:
        with _SignalCatcher() as signals:
            stopped = _train_steps(run, clock, signals)
        clock.sync()
        final = stopped or _test_row(run, clock)
        if stopped is None:
            _write_eval(run, final)
        if run.data.val is None:  # no validation to choose by: best.pt holds the final weights
            _save(run, run.paths.best)
        if not run.schedule.error_warmup_done:
            _notice(run, f"the training error never fell below schedule.warmup_until_train_error="
                         f"{config.schedule.warmup_until_train_error}%: every iteration trained at "
                         f"schedule.warmup_lr={config.schedule.warmup_lr}")
        summary = _summary(run, final, clock, stopped is not None)
        _write_summary(run, summary)
        run.writer.hparams(_flatten_config(config), {k: summary[k] for k in ("test_top1_error", "test_top5_error")})
        return summary
    except NonFiniteLossError as exc:
        _write_summary(run, {"run_dir": str(run.paths.root), "model": run.model_class or config.model.name,
                             "diverged": True, "message": str(exc), **run.step_fn.describe()})
        raise
    except torch.cuda.OutOfMemoryError as exc:
        raise RuntimeError(_out_of_memory(run, "CUDA out of memory")) from exc
    except RuntimeError as exc:
        if "DefaultCPUAllocator: can't allocate memory" in str(exc):
            raise RuntimeError(_out_of_memory(run, "out of memory")) from exc
        if run.dist.world_size == 1 or not _peer_lost(exc):
            raise
        raise RuntimeError(
            f"rank {run.dist.rank}: another rank did not answer within "
            f"train.dist_timeout_s={config.train.dist_timeout_s} s (stalled or dead), so the job ends; "
            f"the last checkpoint in {run.paths.root} is intact ({exc})"
        ) from exc
    finally:
        run.progress.close()
        run.writer.close()
        if run.lock is not None:
            run.lock.release()
        if run.dist.joined:
            # The DDP wrapper goes before the process group: its reducer holds the group, and a gloo group whose last
            # holder is the reducer is destroyed with the GIL held while the group's threads may wait for it to free
            # a finished collective's tensors (a hang at exit, seen with PyTorch 2.6 and 2.11). Left to
            # destroy_process_group, the group is destroyed with the GIL released (PyTorch 2.8 and newer).
            run.step_fn = None
            gc.collect()
            distributed.cleanup()
