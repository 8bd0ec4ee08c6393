"""Typed configuration: the one schema every run is described by.

A run is a :class:`Config` made of sections (``model``, ``data``, ``optim``, ``schedule``, ``train``, ``task``,
``finetune``). Recipes are YAML files with the same sections; ``--set section.key=value`` overrides are coerced to
the field's type. An unknown key or a value of the wrong type is a :class:`ConfigError` naming the key and what is
allowed. Defaults are the paper's CIFAR-10 recipe (PAPER.md section 5); each deviation is a named field.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "AUGMENT_OPS",
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "OptimConfig",
    "RecipeNotFound",
    "ScheduleConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "augment_ops",
    "config_differences",
    "config_reference",
    "find_recipe",
    "from_dict",
    "load_config",
    "load_recipe",
    "recipe_dirs",
    "to_dict",
    "to_yaml",
]


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed. ``key`` names it (dotted)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config key '{key}': {message}")


class RecipeNotFound(ConfigError, FileNotFoundError):
    """No recipe by that name or path (a config error: the command line exits 2)."""

    def __init__(self, message: str):
        super().__init__("--recipe", message)


@dataclass
class ModelConfig:
    # A registered model (deepres models lists them; paper nets resnet20..resnet1202, plain20.., resnet18..resnet152).
    name: str = "resnet20"
    # Outputs of the classifier; None: the data source's class count.
    num_classes: int | None = None
    # Input channels; None: the data's (1 for Fashion-MNIST and MNIST, 3 for RGB images).
    in_channels: int | None = None
    # None: the model's own default (the paper's: A for CIFAR nets, B for ImageNet nets).
    shortcut: Literal["A", "B", "C"] | None = None
    # None: the model's own default ("1x1", the paper; "3x3" is the v1.5 variant torchvision trains).
    stride_on: Literal["1x1", "3x3"] | None = None
    # The paper does not zero-initialise; Goyal et al. 2017 found it helps large-batch training.
    zero_init_residual: bool | None = None
    # Start from these weights (one of our checkpoints or a torchvision state-dict file; "pretrained": the published
    # weights of model.name, deepres models --pretrained, downloaded into the torch.hub cache); see
    # deepres.models.transfer.
    init: str | None = None
    # The classifier when starting from model.init. auto: keep it when the checkpoint names the same classes (a
    # torchvision file: when its shape fits), else a new one; keep: always (must fit); new: always a fresh one.
    init_head: Literal["auto", "keep", "new"] = "auto"
    # Noise for Noisy Student (Xie et al. 2020); the paper uses neither. dropout: on the classifier's input in
    # training. stochastic_depth: drop probability of the last residual block's branch, rising linearly from 0
    # over the blocks (Huang et al. 2016).
    dropout: float = 0.0
    # Stochastic depth: the last residual block's drop probability (see dropout's comment); 0: off.
    stochastic_depth: float = 0.0
    # Further keyword options passed to the model builder (family specific, e.g. growth_rate).
    options: dict[str, Any] = field(default_factory=dict)


def _group_quota(folder: Path) -> float | None:
    """The CPU limit one control group folder sets, in cores: cgroup v2 ``cpu.max`` ("200000 100000"; "max ...":
    none) or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none)."""
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        pass
    return None


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup"),
              proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU time this process's control group may use, in cores, or None without a limit: a container's
    ``--cpus`` or a Kubernetes CPU limit, which throttle time without hiding any core from the affinity mask. The
    smallest limit of the process's group and its ancestors (cgroup v2, else v1's ``cpu`` controller)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    folders = [cgroup_root]  # inside a container's namespace the group is the root
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        bases = [cgroup_root] if controllers == "" else \
            [cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"] if "cpu" in controllers.split(",") else []
        relative = Path(path.strip().lstrip("/"))
        for base in bases:
            folders += [base / relative, *(base / parent for parent in relative.parents)]
    limits = [q for q in map(_group_quota, dict.fromkeys(folders)) if q is not None]
    return min(limits) if limits else None


def affinity_cores() -> int:
    """The CPU cores this process may run on: its affinity mask, else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cores() -> int:
    """The CPU cores this process may keep busy: :func:`affinity_cores` bounded by its control group's CPU quota
    rounded down (one thread more than the quota lets every thread of a pool wait on it)."""
    cores = affinity_cores()
    quota = cpu_quota()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def threads_within_quota() -> tuple[int, str] | None:
    """PyTorch starts a thread per physical core of the machine; a container's CPU quota (``--cpus``, a Kubernetes
    limit) hides no core, so its threads would contend for fewer cores' time and stall each other. When a quota binds
    and OMP_NUM_THREADS does not choose, PyTorch's threads are bounded by the cores the quota allows. Returns the
    thread count before and a line saying so when it changed it, else None."""
    cores = available_cores()
    if os.environ.get("OMP_NUM_THREADS") or cores >= affinity_cores():
        return None  # the common case answers without importing torch
    import torch

    before = torch.get_num_threads()
    if before <= cores:
        return None
    torch.set_num_threads(cores)
    return before, (f"PyTorch threads {before} -> {cores}: this process's CPU quota allows {cores} of the "
                    f"{affinity_cores()} cores it sees (OMP_NUM_THREADS chooses)")


def data_workers(data) -> int:
    """``data.num_workers``, or when it is None the cores this process may use, at most 8."""
    n = getattr(data, "num_workers", None)
    return n if n is not None else min(8, available_cores())


@dataclass
class DataConfig:
    # Where images come from: a dataset in its official files (downloaded when missing) or imagefolder (data.data_dir:
    # root/<class>/<image>, root/{train,test}/<class>/<image>, a .tar.gz of either, or a prepared file).
    source: Literal["cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder"] = "cifar10"
    # Where the data lives; None: $DEEPRES_DATA, then ./data.
    data_dir: str | None = None
    # Images carved from train, deterministically, for validation (5000: the paper's 45k/5k split); below 1, a
    # fraction of the training images.
    val_size: int | float = 5000
    # A root/<class>/ image folder (no train/ and test/ inside): the test split carved from each class with a fixed
    # seed, a fraction (below 1) or a count of images.
    test_size: int | float = 0.2
    # Use only the first N training images (after the validation split); None: all.
    train_subset: int | None = None
    # Use only the first N test images; None: all.
    test_subset: int | None = None
    # Training augmentation. paper_cifar: pad 4 pixels, random 32x32 crop, horizontal flip (section 4.2);
    # paper_imagenet: shorter side random in [256, 480], random 224 crop, flip, PCA lighting (section 3.4), test at
    # the centre 224 crop of the 256 resize; none: the images as they are.
    preset: Literal["paper_cifar", "paper_imagenet", "none"] = "paper_cifar"
    # The paper subtracts the per-pixel mean; per-channel mean/std normalisation is the common alternative; imagenet:
    # ImageNet's per-channel mean and std (those the pretrained weights were trained with; their averages for grey).
    normalize: Literal["pixel_mean", "channel", "imagenet"] = "pixel_mean"
    # Side length images are prepared at (image folders); None: the source's native size.
    image_size: int | None = None
    # error: a bad image file is an error naming it; skip: log it (logger "deepres.data") and leave it out.
    on_bad_image: Literal["error", "skip"] = "error"
    # An image whose header announces more pixels is a bad image (checked before decoding; Pillow's limit).
    max_image_pixels: int = 89_478_485
    # Image folders: channels images are converted to; None: 1 when every image is grayscale, else 3 (RGB).
    channels: Literal[1, 3] | None = None
    # Where extracted archives and decoded image folders are cached; None: $DEEPRES_DATA/cache, else
    # $XDG_CACHE_HOME/deepres (~/.cache/deepres).
    cache_dir: str | None = None
    # device: the whole split on the training device; workers: DataLoader worker processes; auto: by size.
    loader: Literal["auto", "device", "workers"] = "auto"
    # The device loader's order, crops and flips: drawn and gathered for a whole epoch at once (epoch: one gather per
    # epoch, no host-to-device copy per step) or for each batch (batch: no second copy of the split in memory). Both
    # are functions of (seed, epoch, step), the same on every device. RandAugment and batch mixing act per batch.
    gather: Literal["epoch", "batch"] = "epoch"
    # Processes that decode and augment images (image folders); None: the cores this process may use, at most 8.
    num_workers: int | None = None
    # Augmentations beyond the paper (0 disables). RandAugment (Cubuk et al. 2020): N operations at magnitude M per
    # image, after the crop and flip (the ImageNet preset: before the crop); torchvision's operations and magnitudes,
    # batched (deepres.data.RandAugmentBatch).
    randaugment_n: int = 0
    # RandAugment's magnitude M, 0 to 30 (torchvision's scale; 9 in Cubuk et al.'s ImageNet runs).
    randaugment_m: int = 9
    # TrivialAugment (Muller and Hutter 2021; torchvision's TrivialAugmentWide, as in its ResNet-50 recipe): one of 14
    # operations at a random strength per image, where RandAugment would run. Not together with RandAugment.
    trivialaugment: bool = False
    # The lecture's augmentations as a random subset per image (PAPER.md section 7): each operation listed is applied
    # with probability augment_p, independently, in the listed order, where RandAugment would run. Operations (and
    # their default strength; "name:strength" sets another): shear (15 degrees, x and y), rotate (15 degrees),
    # perspective (distortion 0.3), brightness (factor 1 +/- 0.4), color_jitter (brightness, contrast, saturation
    # 1 +/- 0.4, hue +/- a quarter of it), noise (Gaussian, std 0.05 of the range). Crop and flip are the preset's.
    # Not together with RandAugment or TrivialAugment. []: off.
    augment: list[str] = field(default_factory=list)
    # The probability of each data.augment operation per image (0.5: half the images get any one of them).
    augment_p: float = 0.5
    # Random erasing (Zhong et al. 2020) with this probability per image: a rectangle of 2% to 33% of the image, aspect
    # ratio 0.3 to 3.3, set to 0 after normalisation (the mean colour), before CutMix/Mixup: torchvision's
    # RandomErasing defaults, placed as in its recipes (after Normalize; its ResNet-50 recipe uses 0.1). 0: off.
    random_erasing: float = 0.0
    # CutMix (Yun et al. 2019): a box of another image of the batch pasted in, the labels mixed by its area, the box's
    # share drawn from Beta(alpha, alpha); 1.0 is the paper's. 0: off. With mixup_alpha too, one of them per batch.
    cutmix_alpha: float = 0.0
    # Mixup (Zhang et al. 2018): each image blended with another of the batch, x = lam x + (1 - lam) x', labels
    # likewise, lam ~ Beta(alpha, alpha) (0.2 is common). 0: off.
    mixup_alpha: float = 0.0
    # Few labels: keep the first N training images of each class (after the validation split) labeled; the rest
    # form the unlabeled set pseudo-labeling and distillation use. None: every training image is labeled.
    labeled_per_class: int | None = None
    # Use only N unlabeled images (a fixed, seed-independent sample); None: all.
    unlabeled_subset: int | None = None
    # Test on the first N test images of each class (a balanced subset, also of class-sorted folders); None: all.
    test_per_class: int | None = None


@dataclass
class OptimConfig:
    # sgd: the paper's (momentum, nesterov). adamw: Adam with decoupled weight decay (Loshchilov and Hutter 2019;
    # betas, eps), common for fine-tuning, usually at a smaller lr (1e-3) and larger weight_decay (0.05): its decay
    # shrinks each weight by lr x weight_decay per step, apart from the gradient's adaptive scale.
    name: Literal["sgd", "adamw"] = "sgd"
    # The base learning rate, for the whole batch (paper: 0.1 at batch 128 on CIFAR, at 256 on ImageNet); the
    # schedule scales it.
    lr: float = 0.1
    # sgd: momentum (PyTorch's form: v = momentum v + g; paper 0.9).
    momentum: float = 0.9
    # sgd: Nesterov momentum (the paper uses plain momentum).
    nesterov: bool = False
    # L2 penalty added to the gradient (sgd) or decoupled decay (adamw); the paper: 1e-4.
    weight_decay: float = 1e-4
    # adamw: the decay rates of the gradient's running mean and of its square's, and the denominator's epsilon.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # adamw: added to the denominator's square root (see betas).
    eps: float = 1e-8
    # The paper decays every weight; False exempts BN parameters and biases (chosen by module type).
    decay_norm_and_bias: bool = True
    # Clip the global gradient norm to this value; None: no clipping (the paper does not clip).
    grad_clip: float | None = None


@dataclass
class ScheduleConfig:
    # multistep: lr x gamma at each milestone (the paper's); cosine: from lr down to min_lr over the run (after any
    # warm-up); onecycle: up from warmup_lr to lr over warmup_iterations, then linearly down to min_lr; constant: lr.
    name: Literal["multistep", "cosine", "onecycle", "constant"] = "multistep"
    # Iterations at which the learning rate is multiplied by gamma (paper CIFAR: 32k and 48k of 64k). A value below 1
    # is a fraction of the run (0.5: half way), so a shortened run keeps the schedule's shape.
    milestones: list[float] = field(default_factory=lambda: [32000.0, 48000.0])
    # multistep: the factor at each milestone (paper: 0.1, "divided by 10").
    gamma: float = 0.1
    # Linear warmup from warmup_lr to lr over this many iterations (0: none; below 1: a fraction of the run).
    warmup_iterations: float = 0.0
    # Where a warm-up starts (and what the error-driven warm-up below holds); paper ResNet-110: 0.01.
    warmup_lr: float = 0.01
    # Paper, ResNet-110/1202: hold warmup_lr until training error falls below this (percent), then lr.
    warmup_until_train_error: float | None = None
    # cosine and onecycle: the rate they end at.
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    # Training steps, one batch each (the paper's schedules count iterations: 64k on CIFAR, 60e4 on ImageNet).
    iterations: int = 64000
    # Train this many passes over the training split instead (resolved into train.iterations when the data is known,
    # and saved so in the run's config.yaml); None: train.iterations. Setting train.iterations after it (an override,
    # a recipe extending one in epochs) unsets it: the length set last decides.
    epochs: float | None = None
    # Images per step, over all processes under torchrun (each takes batch_size / processes).
    batch_size: int = 128
    # Images per forward pass when validating and testing (no effect on the numbers, only on memory and speed).
    eval_batch_size: int = 512
    # Seeds the initial weights, the data order, crops, flips and augmentations (the validation split is fixed, the
    # same for every seed); the same seed on the same device repeats a run.
    seed: int = 0
    # Validate every this many iterations (and at the end); best.pt keeps the weights of the lowest validation error.
    eval_every: int = 2000
    # Also log test error every this many iterations, for curves like the paper's figures (0: only at the end).
    # It never influences training or the choice of best.pt.
    test_every: int = 0
    # Write checkpoints/last.pt (all a resume needs) every this many iterations, at the end, on SIGTERM and SIGINT.
    checkpoint_every: int = 2000
    # Print and record (metrics.jsonl, TensorBoard) the training loss, error and speed every this many iterations.
    log_every: int = 100
    # auto: a CUDA GPU when there is one, else the CPU; or cpu, cuda, cuda:N.
    device: str = "auto"
    # Autocast precision. auto: bf16 on a CUDA GPU and on a CPU with native bf16 (AVX512-BF16 or AMX; about twice as
    # fast there), fp32 (off) elsewhere; fp16 trains with a GradScaler (its state is checkpointed). The paper trained
    # in fp32: its recipes set off.
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # On CUDA, fp32 convolutions and matrix products on the TF32 tensor cores (10-bit mantissa products, fp32 sums;
    # PyTorch's default for convolutions). false: full fp32 arithmetic, as the paper's GPUs computed (its recipes set
    # it). Applies where autocast leaves fp32 (all of train.amp=off); no effect on a CPU.
    tf32: bool = True
    # Keep images and weights in channels-last (NHWC) memory order: faster convolutions on GPUs with bf16/fp16 and
    # on CPUs with oneDNN; the same arithmetic.
    channels_last: bool = False
    # torch.compile the model with this mode (off: eager kernels).
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "off"
    # Capture the whole step (forward, backward, fused SGD update) as one CUDA graph, replayed every step; the
    # learning rate is a device tensor the graph reads. CUDA only: on a CPU the step runs eagerly (a notice says so).
    cuda_graph: bool = False
    # Split each batch into this many micro-batches whose gradients are summed (weighted by their sizes) before one
    # update: the same batch, data order and schedule in about 1/N of the activation memory. BN layers see each
    # micro-batch's statistics, as in any gradient accumulation. 1: the whole batch at once.
    micro_batches: int = 1
    # Activation (gradient) checkpointing: keep each block's input only and recompute its activations in the backward
    # pass (model.set_grad_checkpointing, as timm). ResNet-50 at batch 32, bf16, on a CPU: 0.55x to 0.65x the step's
    # memory at 1.25x its time (deepres benchmark train-memory). The run is the same as without it (the recomputation
    # leaves BN running statistics alone and replays the random masks), so a run may resume with it switched either way.
    grad_checkpointing: bool = False
    # Exponential moving average of the weights; None: off.
    ema_decay: float | None = None
    # Ramp the average's decay up as TensorFlow's ExponentialMovingAverage does with its update count n:
    # min(ema_decay, (1 + n) / (10 + n)), so the early average follows the training weights instead of holding on to
    # the random initialisation for ~1 / (1 - ema_decay) steps. false: ema_decay from the first update.
    ema_warmup: bool = True
    # Deterministic algorithms (bit-exact resume on CPU).
    deterministic: bool = False
    # Under torchrun: how long a collective may wait for the other processes before the job ends with an error (a
    # stalled or dead rank), in seconds. PyTorch's own default is 30 minutes.
    dist_timeout_s: int = 300
    # Stop at the first test evaluation (train.test_every) whose top-1 accuracy reaches this (percent), for
    # time-to-accuracy benchmarks. It reads the test set: never a way to choose a model. None: run every iteration.
    stop_at_accuracy: float | None = None
    # Bound the recipe to a dataset smaller than it was written for, each change a notice in the log: the validation
    # split to a tenth of the training images, the batch to half the training split (the lr scaled with it, the
    # linear rule), the log/eval/checkpoint cadences to the run's length. false: such misfits are errors, all named.
    fit_to_data: bool = False


@dataclass
class TaskConfig:
    # classification: cross-entropy; distillation: Hinton et al. 2015; pseudo_label: a teacher labels the
    # unlabeled set (data.labeled_per_class) and the model trains on both (deepres.tasks).
    name: Literal["classification", "distillation", "pseudo_label"] = "classification"
    # Cross-entropy against (1 - e) one-hot + e / classes (Szegedy et al. 2016; 0.1 is common); 0: plain labels.
    label_smoothing: float = 0.0
    # distillation and pseudo_label: the teacher, one of our checkpoints.
    teacher: str | None = None
    # distillation: softmax temperature T and the weight alpha of the T^2-scaled KL term against (1 - alpha) x the
    # cross-entropy with the labels; alpha=1 is the labels-free mode (KL only).
    temperature: float = 4.0
    # distillation: the KL term's weight (see temperature).
    alpha: float = 0.9
    # pseudo_label: hard (the teacher's top class) or soft (its softmax) labels, kept where the teacher's top
    # probability is at least threshold.
    pseudo_labels: Literal["hard", "soft"] = "hard"
    # pseudo_label: the teacher's top probability an unlabeled image needs to be kept (0: every image).
    threshold: float = 0.0


@dataclass
class FinetuneConfig:
    # full: every layer trains. feature_extraction: only the classifier trains; the backbone's weights are frozen
    # and its BN layers stay in eval mode, so their running statistics are frozen too (PAPER.md section 7).
    mode: Literal["full", "feature_extraction"] = "full"
    # Learning rate of every layer but the classifier, as a multiple of the schedule's (fine-tuning: low, e.g. 0.1).
    backbone_lr_scale: float = 1.0


@dataclass
class Config:
    # Run name; the run folder is runs/<name> unless --run-dir says otherwise.
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> Config:
        """Raise :class:`ConfigError` naming the first out-of-range value or unsupported combination; every check
        that needs no data lives here, so ``deepres config`` refuses exactly what ``deepres train`` would."""
        validate(self)
        return self


# ---------------------------------------------------------------------------------------------------------------
# Type handling


def _describe(tp: Any) -> str:
    """A short human description of an annotation, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        tail = " or null" if type(None) in args else ""
        return " or ".join(parts) + tail
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a section with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


def _coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError. ``from_text``: value came from the command line."""
    origin = typing.get_origin(tp)
    bad = ConfigError(key, f"{value!r} is not allowed; expected {_describe(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (from_text and isinstance(value, str) and value.strip().lower() in _NULL):
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, from_text)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/on/true/false as booleans
            for word in (("off", "false") if not value else ("on", "true", "default")):
                if word in allowed:
                    return word
            raise bad
        if value in allowed:
            return value
        if from_text and isinstance(value, str):
            for a in allowed:
                if str(a) == value.strip():
                    return a
            word = value.strip().lower()
            if word in _TRUE | _FALSE:
                return _coerce(key, word in _TRUE, tp, from_text)
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v for v in (p.strip() for p in text.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, inner, from_text or isinstance(v, str)) for i, v in enumerate(value)]
    if origin is dict:
        if from_text and isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_text and isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if number.is_integer():
                return int(number)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, name: str, cls: type) -> ConfigError:
    allowed = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    prefix = f"{key}." if key else ""
    return ConfigError(f"{prefix}{name}", f"unknown key{hint}; allowed keys: {', '.join(allowed)}")


def _build(cls: type, data: Any, key: str, from_text: bool = False) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(key or "<root>", f"expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown(key, str(name), cls)
        sub = f"{key}.{name}" if key else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, sub, from_text)
        else:
            kwargs[name] = _coerce(sub, value, tp, from_text)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a nested mapping (a parsed recipe), validating every key and value."""
    return _build(Config, data, "")


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    """The resolved config as YAML; ``load_config`` reads it back to an equal Config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings, each coerced to the field's type. Returns a new Config."""
    config = dataclasses.replace(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override is written key=value, e.g. optim.lr=0.05")
        dotted, text = item.split("=", 1)
        dotted = dotted.strip()
        parts = dotted.split(".")
        target: Any = config
        owner_key = ""
        # Walk down to the dataclass that owns the last part, copying sections so the input is untouched.
        for depth, part in enumerate(parts[:-1]):
            cls = type(target)
            if part not in {f.name for f in dataclasses.fields(cls)}:
                raise _unknown(owner_key, part, cls)
            child = getattr(target, part)
            owner_key = ".".join(parts[: depth + 1])
            if isinstance(child, dict):  # free-form options mapping: model.options.key=value
                child = dict(child)
                setattr(target, part, child)
                child[".".join(parts[depth + 1 :])] = yaml.safe_load(text) if text.strip() else None
                target = None
                break
            if not dataclasses.is_dataclass(child):
                raise ConfigError(owner_key, f"is not a section; set it as {owner_key}=VALUE")
            child = dataclasses.replace(child)
            setattr(target, part, child)
            target = child
        if target is None:
            continue
        cls = type(target)
        last = parts[-1]
        if last not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown(owner_key, last, cls)
        tp = _hints(cls)[last]
        if dataclasses.is_dataclass(tp):
            raise ConfigError(dotted, f"is a section; set one of its keys: {_describe(tp)}")
        setattr(target, last, _coerce(dotted, text, tp, from_text=True))
        if isinstance(target, TrainConfig) and last == "iterations":
            target.epochs = None  # a length in iterations replaces one in epochs set before it (a recipe's)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Recipes


def recipe_dirs() -> list[Path]:
    """Folders searched for recipes by name: $DEEPRES_RECIPES (os.pathsep separated), then the recipes shipped inside
    the package (``deepres/recipes``: package data, found the same way in a source checkout and an installation)."""
    from importlib.resources import files

    dirs = [Path(p) for p in os.environ.get("DEEPRES_RECIPES", "").split(os.pathsep) if p]
    dirs.append(Path(str(files("deepres") / "recipes")))
    return dirs


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """Resolve a recipe given as a path, or by name (``demo``, ``paper/cifar10_resnet20``, ``cifar10_resnet20``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeNotFound(f"recipe file not found: {path}")
        return path
    name = str(name_or_path)
    known: list[str] = []
    for root in recipe_dirs():
        if not root.is_dir():
            continue
        for candidate in sorted(root.rglob("*.yaml")):
            rel = candidate.relative_to(root).with_suffix("").as_posix()
            known.append(rel)
            if rel == name or candidate.stem == name:
                return candidate
    stems = {Path(k).name: k for k in known}
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5) or \
        [stems[m] for m in difflib.get_close_matches(name, list(stems), n=3, cutoff=0.5)]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known recipes: {', '.join(sorted(set(known)))}"
    raise RecipeNotFound(f"unknown recipe '{name}'{hint}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_recipe(name_or_path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe into a nested mapping, following ``extends: OTHER`` (relative path or recipe name)."""
    path = find_recipe(name_or_path)
    if path.resolve() in _seen:
        raise ConfigError("extends", f"recipe {path} extends itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("<recipe>", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("<recipe>", f"{path} must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is not None:
        local = path.parent / f"{parent}.yaml"
        base = load_recipe(local if local.is_file() else parent, _seen + (path.resolve(),))
        own_train = data.get("train")
        data = _merge(base, data)
        if isinstance(own_train, dict) and "iterations" in own_train and "epochs" not in own_train:
            data["train"]["epochs"] = None  # the recipe's length replaces the one in epochs it extends
    return data


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """The resolved, validated Config of a recipe (or the defaults) with ``key=value`` overrides applied."""
    config = from_dict(load_recipe(recipe)) if recipe is not None else Config()
    return apply_overrides(config, list(overrides or [])).validate()


# ---------------------------------------------------------------------------------------------------------------
# Validation: out-of-range values and unsupported combinations, before any data is read


# The step kinds of the one training loop: eager kernels, torch.compile'd, or captured as a CUDA graph. A kind is
# chosen by train.cuda_graph (graph) and train.compile (compiled).
STEP_KINDS = ("eager", "compiled", "graph")


def step_kind(config: Config) -> str:
    if config.train.cuda_graph:
        return "graph"
    return "compiled" if config.train.compile != "off" else "eager"


@dataclass(frozen=True)
class Refusal:
    """A setting a step kind cannot honour: ``when(config)`` is true for the refused values (``example`` is one)."""

    key: str
    when: Any
    example: str
    reason: str


# What each step kind refuses. Every other key is honoured by every kind: HONOURED_BY_EVERY_STEP lists them, and
# tests/test_config.py fails when a key of Config is in neither, so a new key needs a decision for every kind.
STEP_REFUSALS: dict[str, list[Refusal]] = {
    "eager": [],
    "compiled": [],
    "graph": [
        Refusal("train.device", lambda c: c.train.device.startswith("cpu"), "cpu",
                "a captured step needs a CUDA device (train.device=auto runs eagerly on a CPU, with a notice)"),
        Refusal("train.compile", lambda c: c.train.compile in ("reduce-overhead", "max-autotune"), "reduce-overhead",
                "these modes capture CUDA graphs themselves; use train.cuda_graph=false with them, or compile "
                "default / max-autotune-no-cudagraphs inside the captured step"),
        Refusal("train.amp", lambda c: c.train.amp == "fp16", "fp16",
                "fp16 needs a GradScaler, whose overflow check reads the device every step; use bf16"),
        Refusal("train.ema_decay", lambda c: bool(c.train.ema_decay), "0.999",
                "the weight average is updated outside the captured step; use train.cuda_graph=false"),
        Refusal("train.micro_batches", lambda c: c.train.micro_batches > 1, "4",
                "the captured step is one whole batch; use train.cuda_graph=false to accumulate micro-batches"),
        Refusal("train.grad_checkpointing", lambda c: c.train.grad_checkpointing, "true",
                "the recomputation in the backward pass is not captured; use train.cuda_graph=false"),
        Refusal("optim.grad_clip", lambda c: c.optim.grad_clip is not None, "1.0",
                "gradient clipping is not captured; use train.cuda_graph=false"),
        Refusal("task.name", lambda c: c.task.name != "classification", "distillation",
                "a captured step runs the classification task only (a teacher's forward is not captured)"),
        Refusal("data.cutmix_alpha", lambda c: c.data.cutmix_alpha > 0, "1.0",
                "mixed batches change the targets' type; use train.cuda_graph=false"),
        Refusal("data.mixup_alpha", lambda c: c.data.mixup_alpha > 0, "0.2",
                "mixed batches change the targets' type; use train.cuda_graph=false"),
        Refusal("model.dropout", lambda c: c.model.dropout > 0, "0.5",
                "random masks inside the captured step are not supported; use train.cuda_graph=false"),
        Refusal("model.stochastic_depth", lambda c: c.model.stochastic_depth > 0, "0.2",
                "random masks inside the captured step are not supported; use train.cuda_graph=false"),
    ],
}

HONOURED_BY_EVERY_STEP = frozenset({
    "name",
    "model.name", "model.num_classes", "model.in_channels", "model.shortcut", "model.stride_on",
    "model.zero_init_residual", "model.init", "model.init_head", "model.options",
    "data.source", "data.data_dir", "data.val_size", "data.test_size", "data.train_subset", "data.test_subset",
    "data.preset",
    "data.normalize", "data.image_size", "data.on_bad_image", "data.max_image_pixels", "data.channels",
    "data.cache_dir", "data.loader",
    "data.gather", "data.num_workers", "data.randaugment_n", "data.randaugment_m", "data.trivialaugment",
    "data.augment", "data.augment_p", "data.random_erasing", "data.labeled_per_class",
    "data.unlabeled_subset", "data.test_per_class",
    "optim.name", "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay", "optim.decay_norm_and_bias",
    "optim.betas", "optim.eps",
    "schedule.name", "schedule.milestones", "schedule.gamma", "schedule.warmup_iterations", "schedule.warmup_lr",
    "schedule.warmup_until_train_error", "schedule.min_lr",
    "train.iterations", "train.epochs", "train.batch_size", "train.eval_batch_size", "train.seed", "train.eval_every",
    "train.test_every", "train.checkpoint_every", "train.log_every", "train.channels_last", "train.cuda_graph",
    "train.deterministic", "train.stop_at_accuracy", "train.dist_timeout_s", "train.fit_to_data", "train.tf32",
    "train.ema_warmup",
    "task.label_smoothing", "task.teacher", "task.temperature", "task.alpha", "task.pseudo_labels", "task.threshold",
    "finetune.mode", "finetune.backbone_lr_scale",
})


# Keys that say where and how fast a run trains, not what it trains: two configs that differ only in these describe
# the same run (a run trained on a GPU and read back on a CPU, with the data at another path). train.tf32 is one, as
# train.compile: both round fp32 arithmetic differently on a GPU, neither changes the experiment (and a CPU ignores it).
# train.grad_checkpointing recomputes the same numbers in less memory.
ENVIRONMENT_KEYS = frozenset({"name", "train.device", "train.cuda_graph", "train.compile", "train.tf32",
                              "train.grad_checkpointing",
                              "data.data_dir", "data.cache_dir", "data.num_workers", "data.loader",
                              "train.eval_batch_size", "train.dist_timeout_s"})


def config_differences(a: Config, b: Config, ignore=ENVIRONMENT_KEYS) -> dict[str, tuple]:
    """The keys whose values differ between two configs (dotted key -> (a's, b's)), ``ignore`` left out."""
    flat_a, flat_b = _flatten(to_dict(a)), _flatten(to_dict(b))
    return {k: (flat_a.get(k), flat_b.get(k)) for k in sorted(set(flat_a) | set(flat_b))
            if k not in ignore and flat_a.get(k) != flat_b.get(k)}


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "options":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_reference() -> list[dict]:
    """Every key of the schema with its type, default and the comment written above it in this file: what
    ``deepres config --keys`` prints."""
    import inspect

    rows = []

    def walk(cls: type, prefix: str) -> None:
        comments: dict[str, str] = {}
        pending: list[str] = []
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                pending.append(text.lstrip("# "))
            elif ":" in text and not text.startswith(("def ", '"""', "@")):
                comments[text.split(":", 1)[0].strip()] = " ".join(pending)
                pending = []
            else:
                pending = []
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append({"key": f"{prefix}{f.name}", "type": _describe(hints[f.name]), "default": default,
                         "comment": comments.get(f.name, "")})

    walk(Config, "")
    return rows


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted (``train.iterations``)."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# data.augment's operations: name -> (default strength, largest strength, what the strength is).
AUGMENT_OPS = {
    "shear": (15.0, 60.0, "degrees of shear along x and along y"),
    "rotate": (15.0, 180.0, "degrees of rotation"),
    "perspective": (0.3, 1.0, "distortion scale"),
    "brightness": (0.4, 1.0, "brightness factor 1 +/- strength"),
    "color_jitter": (0.4, 1.0, "brightness, contrast and saturation factors 1 +/- strength, hue +/- strength / 4"),
    "noise": (0.05, 1.0, "standard deviation of Gaussian noise, a fraction of the pixel range"),
}


def augment_ops(items: list[str]) -> list[tuple[str, float]]:
    """data.augment's items as (operation, strength) pairs; ConfigError naming the item when one is unknown, repeated
    or out of range."""
    ops: list[tuple[str, float]] = []
    for i, item in enumerate(items):
        key = f"data.augment[{i}]"
        name, _, text = str(item).partition(":")
        name = name.strip()
        if name not in AUGMENT_OPS:
            near = difflib.get_close_matches(name, AUGMENT_OPS, n=1)
            raise ConfigError(key, f"unknown operation {name!r}{f' (did you mean {near[0]!r}?)' if near else ''}; "
                                   f"one of {', '.join(AUGMENT_OPS)}, optionally as name:strength")
        default, largest, meaning = AUGMENT_OPS[name]
        try:
            strength = float(text) if text.strip() else default
        except ValueError:
            raise ConfigError(key, f"{item!r}: the strength after ':' must be a number ({meaning})") from None
        _require(_finite(strength) and 0.0 <= strength <= largest, key,
                 f"{item!r}: {name}'s strength ({meaning}) must be in [0, {largest:g}]; got {strength:g}")
        _require(name not in (n for n, _ in ops), key, f"{name} is listed twice")
        ops.append((name, strength))
    return ops


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def _check_ranges(c: Config) -> None:
    t, o, s, d, m, k = c.train, c.optim, c.schedule, c.data, c.model, c.task
    for key, value in (("train.iterations", t.iterations), ("train.batch_size", t.batch_size),
                       ("train.eval_batch_size", t.eval_batch_size), ("train.eval_every", t.eval_every),
                       ("train.checkpoint_every", t.checkpoint_every), ("train.log_every", t.log_every)):
        _require(value >= 1, key, f"must be at least 1; got {value}")
    _require(t.dist_timeout_s >= 1, "train.dist_timeout_s", f"must be at least 1 second; got {t.dist_timeout_s}")
    _require(t.test_every >= 0, "train.test_every", f"must be >= 0 (0: test at the end only); got {t.test_every}")
    _require(t.seed >= 0, "train.seed", f"must be >= 0; got {t.seed}")
    _require(t.ema_decay is None or 0.0 < t.ema_decay < 1.0, "train.ema_decay", f"must be in (0, 1); got {t.ema_decay}")
    _require(t.stop_at_accuracy is None or 0.0 < t.stop_at_accuracy <= 100.0, "train.stop_at_accuracy",
             f"must be a percentage in (0, 100]; got {t.stop_at_accuracy}")
    _require(t.device in ("auto", "cpu", "cuda") or (t.device.startswith("cuda:") and t.device[5:].isdigit()),
             "train.device", f"must be auto, cpu, cuda or cuda:N; got {t.device!r}")
    _require(_finite(o.lr) and o.lr > 0, "optim.lr", f"must be a finite number > 0; got {o.lr}")
    _require(0.0 <= o.momentum < 1.0, "optim.momentum", f"must be in [0, 1); got {o.momentum}")
    _require(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay",
             f"must be >= 0; got {o.weight_decay}")
    _require(not o.nesterov or o.momentum > 0, "optim.nesterov", "needs optim.momentum > 0")
    _require(not o.nesterov or o.name == "sgd", "optim.nesterov", f"is SGD's; optim.name is {o.name}")
    _require(len(o.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas",
             f"must be two numbers in [0, 1) (the running mean's and the running square's decay); got {o.betas}")
    _require(_finite(o.eps) and o.eps > 0, "optim.eps", f"must be a finite number > 0; got {o.eps}")
    _require(o.grad_clip is None or (_finite(o.grad_clip) and o.grad_clip > 0), "optim.grad_clip",
             f"must be > 0 (or null: no clipping); got {o.grad_clip}")
    _require(_finite(s.gamma) and s.gamma > 0, "schedule.gamma", f"must be > 0; got {s.gamma}")
    _require(t.epochs is None or (_finite(t.epochs) and t.epochs > 0), "train.epochs",
             f"must be > 0 (or null: train.iterations); got {t.epochs}")
    _require(all(_finite(ms) and ms > 0 for ms in s.milestones), "schedule.milestones",
             f"must be > 0 (iterations, or fractions of the run below 1); got {s.milestones}")
    _require(all(a < b for a, b in zip(s.milestones, s.milestones[1:])), "schedule.milestones",
             f"must be in strictly increasing order (a repeated milestone would apply schedule.gamma twice there; "
             f"set schedule.gamma instead); got {s.milestones}")
    _require(_finite(s.warmup_iterations) and s.warmup_iterations >= 0, "schedule.warmup_iterations",
             f"must be >= 0; got {s.warmup_iterations}")
    _require(_finite(s.warmup_lr) and s.warmup_lr >= 0, "schedule.warmup_lr", f"must be >= 0; got {s.warmup_lr}")
    _require(_finite(s.min_lr) and s.min_lr >= 0, "schedule.min_lr", f"must be >= 0; got {s.min_lr}")
    _require(s.warmup_until_train_error is None or 0 < s.warmup_until_train_error <= 100,
             "schedule.warmup_until_train_error", f"must be a percentage in (0, 100]; got {s.warmup_until_train_error}")
    _require(_finite(d.val_size) and d.val_size >= 0 and (d.val_size < 1 or d.val_size == int(d.val_size)),
             "data.val_size", f"must be a count (0 or more) or a fraction below 1; got {d.val_size}")
    _require(_finite(d.test_size) and d.test_size > 0 and (d.test_size < 1 or d.test_size == int(d.test_size)),
             "data.test_size", f"must be a count (1 or more) or a fraction in (0, 1); got {d.test_size}")
    _require(d.max_image_pixels >= 1, "data.max_image_pixels", f"must be at least 1; got {d.max_image_pixels}")
    _require(1 <= t.micro_batches <= t.batch_size, "train.micro_batches",
             f"must be in [1, train.batch_size={t.batch_size}]; got {t.micro_batches}")
    for key, value in (("data.train_subset", d.train_subset), ("data.test_subset", d.test_subset),
                       ("data.image_size", d.image_size), ("data.labeled_per_class", d.labeled_per_class),
                       ("data.test_per_class", d.test_per_class)):
        _require(value is None or value >= 1, key, f"must be at least 1 (or null: all); got {value}")
    _require(d.unlabeled_subset is None or d.unlabeled_subset >= 0, "data.unlabeled_subset",
             f"must be >= 0 (or null: all); got {d.unlabeled_subset}")
    _require(d.num_workers is None or d.num_workers >= 0, "data.num_workers",
             f"must be >= 0 (or null: the machine's cores); got {d.num_workers}")
    _require(d.randaugment_n >= 0, "data.randaugment_n", f"must be >= 0; got {d.randaugment_n}")
    _require(0 <= d.randaugment_m <= 30, "data.randaugment_m", f"must be in [0, 30]; got {d.randaugment_m}")
    _require(not (d.trivialaugment and d.randaugment_n > 0), "data.trivialaugment",
             f"TrivialAugment replaces RandAugment; set data.randaugment_n=0 (got {d.randaugment_n}) or "
             f"data.trivialaugment=false")
    _require(0.0 <= d.augment_p <= 1.0, "data.augment_p", f"must be a probability in [0, 1]; got {d.augment_p}")
    augment_ops(d.augment)
    _require(not (d.augment and (d.randaugment_n > 0 or d.trivialaugment)), "data.augment",
             "one per-image policy at a time: data.augment, RandAugment (data.randaugment_n > 0) or "
             "data.trivialaugment; unset the others")
    _require(0.0 <= d.random_erasing <= 1.0, "data.random_erasing",
             f"must be a probability in [0, 1]; got {d.random_erasing}")
    _require(d.cutmix_alpha >= 0, "data.cutmix_alpha", f"must be >= 0; got {d.cutmix_alpha}")
    _require(d.mixup_alpha >= 0, "data.mixup_alpha", f"must be >= 0; got {d.mixup_alpha}")
    _require(m.num_classes is None or m.num_classes >= 1, "model.num_classes", f"must be >= 1; got {m.num_classes}")
    _require(m.in_channels is None or m.in_channels >= 1, "model.in_channels", f"must be >= 1; got {m.in_channels}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {m.dropout}")
    _require(0.0 <= m.stochastic_depth < 1.0, "model.stochastic_depth", f"must be in [0, 1); got {m.stochastic_depth}")
    _require(0.0 <= k.label_smoothing < 1.0, "task.label_smoothing", f"must be in [0, 1); got {k.label_smoothing}")
    _require(_finite(k.temperature) and k.temperature > 0, "task.temperature", f"must be > 0; got {k.temperature}")
    _require(0.0 <= k.alpha <= 1.0, "task.alpha", f"must be in [0, 1]; got {k.alpha}")
    _require(0.0 <= k.threshold <= 1.0, "task.threshold", f"must be in [0, 1]; got {k.threshold}")
    _require(_finite(c.finetune.backbone_lr_scale) and c.finetune.backbone_lr_scale >= 0, "finetune.backbone_lr_scale",
             f"must be >= 0; got {c.finetune.backbone_lr_scale}")


def _check_combinations(c: Config) -> None:
    d, k = c.data, c.task
    mixing = d.cutmix_alpha > 0 or d.mixup_alpha > 0
    _require(d.unlabeled_subset is None or d.labeled_per_class is not None, "data.unlabeled_subset",
             "needs data.labeled_per_class (which defines the unlabeled set)")
    _require(not (d.preset == "paper_imagenet" and d.loader == "device"), "data.loader",
             "the paper_imagenet preset (scale augmentation of full-size images) needs data.loader=workers or auto")
    if k.name in ("distillation", "pseudo_label"):
        _require(bool(k.teacher), "task.teacher", f"task.name={k.name} needs a teacher checkpoint, e.g. "
                                                  "--set task.teacher=runs/teacher/checkpoints/last.pt")
        # Training on an unlabeled set (always for pseudo-labels) needs the images in memory, on the device-resident
        # loader; distillation of labeled images also runs its teacher on worker-loaded batches.
        if k.name == "pseudo_label" or d.labeled_per_class is not None:
            what = f"task.name={k.name}" + (" with an unlabeled set" if k.name == "distillation" else "")
            _require(d.loader != "workers", "data.loader", f"{what} needs the device-resident loader; set "
                                                           f"data.loader=device or auto")
            _require(d.preset != "paper_imagenet", "data.preset",
                     f"{what} needs the device-resident loader, which the paper_imagenet preset (scale augmentation "
                     f"of full-size images, in worker processes) does not use; set data.preset=paper_cifar "
                     f"(pad-and-crop, flip) or none, with data.image_size for images of mixed sizes")
    if k.name == "pseudo_label":
        _require(d.labeled_per_class is not None, "data.labeled_per_class",
                 "pseudo-labeling needs an unlabeled set: set data.labeled_per_class (the rest of each class is "
                 "unlabeled)")
        _require(not (k.pseudo_labels == "soft" and mixing), "task.pseudo_labels",
                 "soft pseudo-labels cannot be combined with batch mixing (data.cutmix_alpha / data.mixup_alpha); "
                 "use hard labels")
    if k.name == "distillation":
        _require(not (mixing and d.labeled_per_class is not None), "data.cutmix_alpha",
                 "mixing batches needs every image labeled; distillation with an unlabeled set "
                 "(data.labeled_per_class) does not mix")
    _require(c.model.init is not None or c.model.init_head == "auto", "model.init_head",
             "applies to weights loaded with model.init; set model.init too")


def validate(config: Config) -> None:
    """See :meth:`Config.validate`."""
    _check_ranges(config)
    _check_combinations(config)
    kind = step_kind(config)
    for refusal in STEP_REFUSALS[kind]:
        if refusal.when(config):
            raise ConfigError(refusal.key, f"not supported by the {kind} step (train.cuda_graph="
                                           f"{str(config.train.cuda_graph).lower()}, train.compile="
                                           f"{config.train.compile}): {refusal.reason}")
