"""Data-efficient learning (PAPER.md section 7): semi-supervised learning, knowledge distillation, transfer learning
and augmentation, each compared with its baseline on the same recipe (``recipes/toolkit/cifar10_efficient.yaml``).

Every comparison is test accuracy as mean +/- std over ``--seeds`` runs; a method "beats" its baseline when the
difference of the means exceeds the larger of the two standard deviations (the seed-to-seed spread).
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from .base import (
    Experiment,
    Options,
    RunResult,
    RunSpec,
    cifar_data_overrides,
    register_experiment,
    SCALES,
)

RECIPE = "toolkit/cifar10_efficient"
SEMI_LABELS_PER_CLASS = 400  # 4,000 CIFAR-10 labels, the common semi-supervised benchmark
TRANSFER_LABELS_PER_CLASS = 100  # 1,000 Fashion-MNIST labels
NOISY_ITERATIONS = 2
KD_TEMPERATURE, KD_ALPHA = 4.0, 0.9
PSEUDO_THRESHOLD = 0.95  # hard pseudo-labels only where the teacher is this sure
FINETUNE_BACKBONE_LR_SCALE = 0.1

# Smoke: each experiment end to end on a 2-core CPU in a minute or two. Class-balanced subsets (the JPEG folder is
# sorted by class, so "the first N images" would be one class); the numbers still mean nothing.
SMOKE = [
    "train.iterations=40", "train.batch_size=32", "train.eval_batch_size=250", "data.val_size=500",
    "data.test_per_class=50", "train.eval_every=20", "train.checkpoint_every=20", "train.log_every=10",
    "schedule.warmup_iterations=5", "optim.lr=0.05",
]
SMOKE_TRAIN_SUBSET = ["data.labeled_per_class=100", "data.unlabeled_subset=0"]  # 1,000 balanced training images
SMOKE_SEMI = ["data.labeled_per_class=20", "data.unlabeled_subset=1000"]
FULL_TRANSFER = ["train.iterations=3000", "train.eval_every=500", "train.checkpoint_every=500"]
# Laptop: the four experiments with 3 seeds in about two hours of a 2-core CPU with native bf16 (bf16 autocast and
# channels_last where the CPU has it). 1,000 iterations of batch 128 per CIFAR-10 run (about 2.8 epochs of the 45k
# training images; cosine decay, 50 warm-up steps), 400 per transfer run (51 epochs of the 1,000 labeled images).
# From measured step times (ResNet-20 0.14 s, ResNet-56 0.37 s): about 50 ResNet-20-equivalent runs.
LAPTOP = ["train.iterations=1000", "schedule.warmup_iterations=50", "train.eval_every=500",
          "train.checkpoint_every=250", "train.log_every=50", "train.amp=auto", "train.channels_last=true"]
LAPTOP_TRANSFER = ["train.iterations=400", "schedule.warmup_iterations=20", "train.eval_every=200",
                   "train.checkpoint_every=200", "train.log_every=50", "train.amp=auto", "train.channels_last=true"]


def _scale(options: Options, subset: bool = True) -> list[str]:
    if options.scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}; got {options.scale!r}")
    if options.scale == "smoke":
        return SMOKE + (SMOKE_TRAIN_SUBSET if subset else [])
    return list(LAPTOP) if options.scale == "laptop" else []


def _cifar(options: Options) -> list[str]:
    return cifar_data_overrides(options.data_dir)[0]


def _checkpoint(options: Options, run: str) -> Path:
    return Path(options.out) / "runs" / run / "checkpoints" / "last.pt"


def _spec(name: str, overrides: list[str], method: str, seed: int, recipe: str = RECIPE, **meta) -> RunSpec:
    return RunSpec(name, recipe, overrides + [f"train.seed={seed}"], {"method": method, "seed": seed, **meta})


def _cifar_resnet(options: Options, depth: int, seed: int, method: str | None = None) -> RunSpec:
    """A plain CIFAR-10 run of the shared recipe; shared by distillation, augmentation and transfer."""
    overrides = _cifar(options) + _scale(options) + [f"model.name=resnet{depth}"]
    return _spec(f"eff-cifar10-resnet{depth}-s{seed}", overrides, method or f"ResNet-{depth}", seed)


# ---------------------------------------------------------------------------------------------------------------
# Analysis shared by the four experiments


def _accuracy(result: RunResult) -> float:
    value = result.summary.get("test_accuracy")
    return math.nan if value is None or result.summary.get("diverged") else float(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values or any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _format(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "diverged or missing"
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} +/- {std:.2f}"


def _groups(results: list[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.spec.meta["method"], []).append(r)
    return out


def _verdict(method: str, baseline: str, ours: list[float], base: list[float]) -> str:
    (m, s), (bm, bs) = _mean_std(ours), _mean_std(base)
    if math.isnan(m) or math.isnan(bm):
        return f"- {method} vs {baseline}: not measured (a run diverged or is missing)"
    diff, spread = m - bm, max(s, bs)
    if len(ours) == 1 and len(base) > 1:  # e.g. the one shared teacher
        return f"- {method} vs {baseline}: {diff:+.2f} points (a single run; the baseline's seed spread is {bs:.2f})"
    if min(len(ours), len(base)) < 2:
        return (f"- {method} vs {baseline}: {diff:+.2f} points (one seed: no spread to compare with; "
                f"use --seeds 3)")
    holds = diff > spread
    return (f"- {method} beats {baseline} by more than the seed spread: {'holds' if holds else 'does not hold'} "
            f"({diff:+.2f} points, spread {spread:.2f})")


def compare(groups: dict[str, list[RunResult]], baseline: str, methods: list[str], out: Path, plot: str,
            title: str, extra: dict[str, callable] | None = None) -> list[str]:
    """A Markdown table (test accuracy mean +/- std, difference to the baseline, extra columns), the verdicts and a
    bar plot ``plots/<plot>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = extra or {}
    base_acc = [_accuracy(r) for r in groups.get(baseline, [])]
    base_mean = _mean_std(base_acc)[0]
    head = "| method | runs | test accuracy % | vs " + baseline + " |" + "".join(f" {k} |" for k in extra)
    lines = [head, "|" + "---|" * (4 + len(extra))]
    verdicts, bars = [], []
    for method in [baseline] + [m for m in methods if m != baseline]:
        runs = groups.get(method, [])
        if not runs:
            continue
        acc = [_accuracy(r) for r in runs]
        mean, std = _mean_std(acc)
        diff = "-" if method == baseline or math.isnan(mean) or math.isnan(base_mean) else f"{mean - base_mean:+.2f}"
        cells = "".join(f" {fn(runs)} |" for fn in extra.values())
        lines.append(f"| {method} | {len(runs)} | {_format(mean, std, len(runs))} | {diff} |{cells}")
        bars.append((method, mean, std))
        if method != baseline:
            verdicts.append(_verdict(method, baseline, acc, base_acc))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(bars), 3.6))
    names = [b[0] for b in bars]
    ax.bar(range(len(bars)), [0 if math.isnan(b[1]) else b[1] for b in bars],
           yerr=[0 if math.isnan(b[2]) else b[2] for b in bars], capsize=4,
           color=["tab:gray"] + ["tab:blue"] * (len(bars) - 1))
    ax.set_xticks(range(len(bars)), names, rotation=20, ha="right")
    finite = [b[1] for b in bars if not math.isnan(b[1])]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax.set(ylabel="test accuracy (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plots" / f"{plot}.png", dpi=110)
    plt.close(fig)
    return lines + ["", *verdicts, "", f"![{title}](plots/{plot}.png)"]


def _mean_of(key: str, spec: str = ".1f"):
    def cell(runs: list[RunResult]) -> str:
        values = [r.summary.get(key) for r in runs if r.summary.get(key) is not None]
        return format(statistics.mean(values), spec) if values else "-"
    return cell


def _data_line(options: Options) -> str:
    return f"Data: {cifar_data_overrides(options.data_dir)[1]}."


# ---------------------------------------------------------------------------------------------------------------
# Semi-supervised: 4,000 labels, the rest unlabeled


def plan_semi(options: Options) -> list[RunSpec]:
    from .noisy_student import Noise, chain

    data = _cifar(options) + _scale(options, subset=False)
    data += SMOKE_SEMI if options.scale == "smoke" else [f"data.labeled_per_class={SEMI_LABELS_PER_CLASS}"]
    specs = []
    for seed in range(options.seeds):
        teacher = f"eff-semi-labeled-s{seed}"
        specs.append(_spec(teacher, data, "labeled only", seed, iteration=0))
        specs.append(_spec(f"eff-semi-pseudo-s{seed}", data + [
            "task.name=pseudo_label", f"task.teacher={_checkpoint(options, teacher)}",
            f"task.threshold={PSEUDO_THRESHOLD}"], "pseudo-labeling", seed))
        names = lambda i, s=seed: teacher if i == 0 else f"eff-semi-noisy{i}-s{s}"  # noqa: E731
        for i, (name, overrides) in enumerate(chain(NOISY_ITERATIONS, names, lambda run: _checkpoint(options, run),
                                                    Noise()), start=1):
            specs.append(_spec(name, data + overrides + ["task.pseudo_labels=soft"], f"Noisy Student, iteration {i}",
                               seed, iteration=i))
    return specs


def analyze_semi(options: Options, results: list[RunResult], out: Path) -> str:
    labels = SMOKE_SEMI[0].split("=")[1] if options.scale == "smoke" else SEMI_LABELS_PER_CLASS
    groups = _groups(results)
    methods = ["pseudo-labeling"] + [f"Noisy Student, iteration {i}" for i in range(1, NOISY_ITERATIONS + 1)]
    lines = [
        "", _data_line(options), "",
        f"{labels} labeled images per class; every other training image is unlabeled (its label is used only to "
        f"score the pseudo-labels). Pseudo-labeling: the labeled-only model labels the unlabeled images, keeping "
        f"those it gives probability >= {PSEUDO_THRESHOLD} (hard labels). Noisy Student (Xie et al. 2020): soft "
        f"pseudo-labels on every unlabeled image, a student noised with RandAugment (N=2, M=9), dropout 0.5 and "
        f"stochastic depth 0.2, then the student labels for the next one ({NOISY_ITERATIONS} iterations). "
        "Each model trains for the recipe's iterations.", "",
    ]
    lines += compare(groups, "labeled only", methods, out, "semi_supervised", "CIFAR-10, few labels", {
        "pseudo-labels kept": _mean_of("pseudo_labels_kept", ".0f"),
        "pseudo-label accuracy %": _mean_of("pseudo_label_accuracy"),
    })
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Distillation: ResNet-56 -> ResNet-20


# At laptop scale one teacher serves every seed, trained 3x longer than the students: at the students' 1,000
# iterations ResNet-56 tested worse than ResNet-20 (35.2% against 32.0% error, seed 0, 2-core Xeon), a teacher with
# nothing to teach. One 3,000-iteration teacher costs less than three 1,000-iteration ones.
LAPTOP_TEACHER_ITERATIONS = 3000
LAPTOP_TEACHER = [f"train.iterations={LAPTOP_TEACHER_ITERATIONS}", "train.eval_every=1000",
                  "train.checkpoint_every=500"]


def _laptop_teacher(options: Options) -> RunSpec:
    overrides = _cifar(options) + _scale(options) + ["model.name=resnet56"] + LAPTOP_TEACHER
    return _spec("eff-cifar10-resnet56-teacher", overrides, "ResNet-56 (teacher)", 0)


def plan_distillation(options: Options) -> list[RunSpec]:
    shared = _laptop_teacher(options) if options.scale == "laptop" else None
    specs = [shared] if shared else []
    for seed in range(options.seeds):
        teacher = shared or _cifar_resnet(options, 56, seed, "ResNet-56 (teacher)")
        if not shared:
            specs.append(teacher)
        specs.append(_cifar_resnet(options, 20, seed, "ResNet-20 alone"))
        specs.append(_spec(f"eff-cifar10-resnet20-kd-s{seed}", _cifar(options) + _scale(options) + [
            "model.name=resnet20", "task.name=distillation", f"task.teacher={_checkpoint(options, teacher.name)}",
            f"task.temperature={KD_TEMPERATURE}", f"task.alpha={KD_ALPHA}"], "ResNet-20 distilled", seed))
    return specs


def analyze_distillation(options: Options, results: list[RunResult], out: Path) -> str:
    lines = [
        "", _data_line(options), "",
        f"Hinton et al. 2015: loss = alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE(student, labels) with "
        f"T = {KD_TEMPERATURE}, alpha = {KD_ALPHA}; " + (
            f"the teacher is one ResNet-56 (seed 0) trained on the same recipe for {LAPTOP_TEACHER_ITERATIONS:,} "
            "iterations, 3x the students' (at the students' length ResNet-56 tests worse than ResNet-20), shared by "
            "every seed."
            if options.scale == "laptop" else "the teacher is a ResNet-56 trained on the same recipe and seed."),
        "",
    ]
    lines += compare(_groups(results), "ResNet-20 alone", ["ResNet-20 distilled", "ResNet-56 (teacher)"], out,
                     "distillation", "ResNet-56 -> ResNet-20")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Transfer: CIFAR-10 ResNet-20 -> Fashion-MNIST with 1,000 labels


def fashion_mnist_dir() -> str | None:
    """Fashion-MNIST's folder: $DEEPRES_DATA(/fashion-mnist), ../shared/data/fashion-mnist, ./data/fashion-mnist."""
    candidates = []
    if os.environ.get("DEEPRES_DATA"):
        candidates += [Path(os.environ["DEEPRES_DATA"]) / "fashion-mnist", Path(os.environ["DEEPRES_DATA"])]
    candidates += [Path.cwd().parent / "shared" / "data" / "fashion-mnist", Path("data") / "fashion-mnist"]
    for path in candidates:
        if (path / "train-images-idx3-ubyte.gz").is_file():
            return str(path)
    return None


def plan_transfer(options: Options) -> list[RunSpec]:
    source = _cifar_resnet(options, 20, 0, "source (CIFAR-10)")
    folder = fashion_mnist_dir()
    data = ["data.source=fashion_mnist", f"data.labeled_per_class={TRANSFER_LABELS_PER_CLASS}",
            "data.unlabeled_subset=0", *([f"data.data_dir={folder}"] if folder else [])]
    data += {"smoke": _scale(options, subset=False), "laptop": LAPTOP_TRANSFER}.get(options.scale, FULL_TRANSFER)
    init = [f"model.init={_checkpoint(options, source.name)}"]
    specs = [source]
    for seed in range(options.seeds):
        specs += [
            _spec(f"eff-fmnist-scratch-s{seed}", data, "from scratch", seed),
            _spec(f"eff-fmnist-features-s{seed}", data + init + ["finetune.mode=feature_extraction"],
                  "feature extraction", seed),
            _spec(f"eff-fmnist-finetune-s{seed}", data + init + [
                f"finetune.backbone_lr_scale={FINETUNE_BACKBONE_LR_SCALE}"], "fine-tuning", seed),
        ]
    return specs


def analyze_transfer(options: Options, results: list[RunResult], out: Path) -> str:
    source = [r for r in results if r.spec.meta["method"] == "source (CIFAR-10)"]
    source_acc = f"{_accuracy(source[0]):.2f}%" if source else "missing"
    targets = [r for r in results if r.spec.meta["method"] != "source (CIFAR-10)"]
    lines = [
        "", f"Source: ResNet-20 trained on CIFAR-10 by the shared recipe (seed 0, test accuracy {source_acc}). "
        + _data_line(options), "",
        f"Target: Fashion-MNIST with {TRANSFER_LABELS_PER_CLASS} labeled images per class (1,000 labels), the full "
        "test set at full scale. The grey input meets the RGB net through the first convolution, whose three "
        "filters per output are summed (exactly the RGB net on a grey image repeated over three channels). The "
        "CIFAR-10 classifier is replaced by a new one. Feature extraction trains only it, the backbone frozen with "
        "its BN statistics; fine-tuning trains everything, the backbone at "
        f"{FINETUNE_BACKBONE_LR_SCALE} x the head's learning rate; from scratch is the same net randomly "
        "initialised.", "",
    ]
    lines += compare(_groups(targets), "from scratch", ["feature extraction", "fine-tuning"], out, "transfer",
                     "CIFAR-10 -> Fashion-MNIST, 1,000 labels")
    groups = _groups(targets)
    fe, ft = (_mean_std([_accuracy(r) for r in groups.get(k, [])])[0] for k in ("feature extraction", "fine-tuning"))
    if not (math.isnan(fe) or math.isnan(ft)):
        better = "fine-tuning" if ft > fe else "feature extraction"
        lines += ["", f"Of the two, {better} is ahead by {abs(ft - fe):.2f} points. The rule of thumb (PAPER.md "
                      "section 7): few labels favour feature extraction, many favour fine-tuning; how alike the "
                      "source and target images are matters as much."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation: the baseline against batch mixing and per-image policies

# The lecture's operations (PAPER.md section 7) beyond crop and flip, as data.augment's random subset: each one per
# image with probability 0.3, about 1.8 of them per image, near RandAugment's 2.
LECTURE_OPS = "[shear, rotate, perspective, brightness, color_jitter, noise]"
# method: (run-name part, overrides)
AUGMENTATIONS = {
    "CutMix": ("cutmix", ["data.cutmix_alpha=1.0"]),
    "RandAugment": ("randaugment", ["data.randaugment_n=2", "data.randaugment_m=9"]),
    "TrivialAugment": ("trivialaugment", ["data.trivialaugment=true"]),
    "random erasing": ("erasing", ["data.random_erasing=0.5"]),
    "random subset": ("random-subset", [f"data.augment={LECTURE_OPS}", "data.augment_p=0.3"]),
}


def plan_augmentation(options: Options) -> list[RunSpec]:
    specs = []
    for seed in range(options.seeds):
        specs.append(_cifar_resnet(options, 20, seed, "baseline (pad, crop, flip)"))
        for method, (slug, extra) in AUGMENTATIONS.items():
            specs.append(_spec(f"eff-cifar10-resnet20-{slug}-s{seed}",
                               _cifar(options) + _scale(options) + ["model.name=resnet20", *extra], method, seed))
    return specs


def analyze_augmentation(options: Options, results: list[RunResult], out: Path) -> str:
    lines = [
        "", _data_line(options), "",
        "Every run has the paper's pad-crop-flip; one augmentation is added on the same recipe and schedule: "
        "CutMix (Yun et al. 2019, alpha 1: a box of another image pasted, labels mixed by area), RandAugment "
        "(Cubuk et al. 2020, N=2 random operations at magnitude 9), TrivialAugment (Muller and Hutter 2021, one of 14 "
        "operations at a random strength), random erasing (Zhong et al. 2020, probability 0.5, the value the paper "
        "used on CIFAR-10) or the lecture's operations as a random subset per image (`data.augment`: shear, rotate, "
        "perspective, brightness, colour jitter and noise at their default strengths, each with probability 0.3). "
        "Stronger augmentation usually pays off only with longer training.", "",
    ]
    lines += compare(_groups(results), "baseline (pad, crop, flip)", list(AUGMENTATIONS), out, "augmentation",
                     "CIFAR-10 augmentation")
    return "\n".join(lines)


register_experiment(Experiment("semi-supervised", "Semi-supervised CIFAR-10: pseudo-labeling and Noisy Student",
                               plan_semi, analyze_semi, scales=SCALES))
register_experiment(Experiment("distillation", "Knowledge distillation: ResNet-56 into ResNet-20",
                               plan_distillation, analyze_distillation, scales=SCALES))
register_experiment(Experiment("transfer", "Transfer learning: CIFAR-10 to Fashion-MNIST with 1,000 labels",
                               plan_transfer, analyze_transfer, scales=SCALES))
register_experiment(Experiment("augmentation", "Augmentation: baseline, CutMix, RandAugment, TrivialAugment, random "
                               "erasing, a random subset", plan_augmentation, analyze_augmentation, scales=SCALES))
