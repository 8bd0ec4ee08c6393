"""Every architecture family at CIFAR size on one recipe: test error, parameters, multiply-adds and training speed."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..models import count_macs, count_parameters, create_model
from .base import Experiment, Options, RunResult, RunSpec, cifar_data_overrides, register_experiment, scale_overrides


@dataclass(frozen=True)
class ZooMember:
    label: str
    model: str
    options: dict = field(default_factory=dict)
    lr: float = 0.1  # at batch 128
    source: str = ""


SMALL = {"small_input": True}
ZOO = [
    ZooMember("ResNet-56", "resnet56", {}, 0.1, "He et al. 2016, Table 6"),
    ZooMember("ResNet-18", "resnet18", SMALL, 0.1, "He et al. 2016, 3x3 stem"),
    ZooMember("AlexNet", "alexnet", SMALL, 0.02, "Krizhevsky et al. 2012, 5x5 stride-1 stem, 1024-wide head"),
    ZooMember("VGG-16 (BN)", "vgg16_bn", SMALL, 0.05, "Simonyan and Zisserman 2015, 512-wide head"),
    ZooMember("GoogLeNet", "googlenet", SMALL, 0.05, "Szegedy et al. 2015, 3x3 stem, auxiliary heads"),
    ZooMember("DenseNet-BC-100 (k=12)", "densenet_bc", {}, 0.1, "Huang et al. 2017, Table 2"),
    ZooMember("SE-ResNet-18", "se_resnet18", SMALL, 0.1, "Hu et al. 2018, reduction 16"),
    ZooMember("EfficientNet-B0", "efficientnet_b0", SMALL, 0.05, "Tan and Le 2019, stride-1 stem"),
    ZooMember("Deformable ResNet-50", "deform_resnet50", SMALL, 0.1, "Dai et al. 2017, stages 3-5 deformable"),
    ZooMember("ResNeXt-50 (32x4d)", "resnext50_32x4d", SMALL, 0.1, "Xie et al. 2017"),
    ZooMember("Wide ResNet-50-2", "wide_resnet50_2", SMALL, 0.1, "Zagoruyko and Komodakis 2016"),
]

# At smoke scale every net sees a few batches of 8 and a hundred test images: the nets here are up to 3.7 GMACs per
# 32x32 image, and the point is the path (build, train, evaluate, report), not the numbers.
ZOO_SMOKE = ["train.iterations=4", "train.batch_size=8", "train.eval_batch_size=100", "data.train_subset=200",
             "data.val_size=0", "data.test_subset=100", "train.log_every=2", "train.eval_every=4",
             "train.test_every=0", "train.checkpoint_every=4", "schedule.warmup_iterations=0"]


def _options_overrides(options: dict) -> list[str]:
    return [f"model.options.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]


def plan_zoo(options: Options) -> list[RunSpec]:
    data, _ = cifar_data_overrides(options.data_dir)
    scale = scale_overrides(options) + (ZOO_SMOKE if options.scale == "smoke" else [])
    specs = []
    for member in ZOO:
        for seed in range(options.seeds):
            lr = member.lr / 16 if options.scale == "smoke" else member.lr  # smoke batch 8: scaled linearly
            overrides = data + scale + [f"model.name={member.model}", f"train.seed={seed}", f"optim.lr={lr}",
                                        *_options_overrides(member.options)]
            specs.append(RunSpec(f"zoo-{member.model}-s{seed}", "toolkit/zoo_cifar", overrides,
                                 {"label": member.label, "model": member.model, "seed": seed}))
    return specs


def training_rate(result: RunResult) -> float:
    """Median training images/s over the logged windows after the first (which includes start-up)."""
    _, rates = result.series("images_per_s")
    rates = rates[1:] or rates
    return statistics.median(rates) if rates else math.nan


def analyze_zoo(options: Options, results: list[RunResult], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model: dict[str, list[RunResult]] = {}
    for r in results:
        by_model.setdefault(r.spec.meta["model"], []).append(r)
    lines = [f"Data: {cifar_data_overrides(options.data_dir)[1]}.", "",
             "Every net trains on the same recipe (`recipes/toolkit/zoo_cifar.yaml`: 15k iterations at batch 128, "
             "cosine, nesterov SGD, weight decay 5e-4, pad-crop-flip) with its own learning rate; multiply-adds are "
             "per 32x32 image; images/s is the median training rate of the logged windows on the hardware below.",
             "", "| net | form | lr | params | MACs (M) | test error % | train images/s |",
             "|---|---|---|---|---|---|---|"]
    points = []
    for member in ZOO:
        runs = by_model.get(member.model, [])
        if not runs:
            continue
        model = create_model(member.model, num_classes=10, **member.options)
        params = count_parameters(model)
        macs = count_macs(model, (3, 32, 32)) / 1e6
        errors = [r.summary.get("test_top1_error", math.nan) if not r.summary.get("diverged") else math.nan
                  for r in runs]
        rate = statistics.median(training_rate(r) for r in runs)
        finite = [e for e in errors if not math.isnan(e)]
        if not finite:
            error = "diverged"
        elif len(finite) == 1:
            error = f"{finite[0]:.2f}"
        else:
            error = f"{statistics.mean(finite):.2f} +/- {statistics.stdev(finite):.2f} (n={len(finite)})"
        lines.append(f"| {member.label} | {member.source} | {member.lr} | {params / 1e6:.2f}M | {macs:,.0f} | "
                     f"{error} | {rate:,.0f} |")
        if finite:
            points.append((member.label, macs, statistics.mean(finite)))
    if points:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for label, macs, error in points:
            ax.scatter(macs, error)
            ax.annotate(label, (macs, error), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="multiply-adds per image (M)", ylabel="test error (%)",
               title="CIFAR-10: the architecture families")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "plots" / "zoo.png", dpi=110)
        plt.close(fig)
        lines += ["", "![test error against multiply-adds](plots/zoo.png)"]
    return "\n".join(lines)


register_experiment(Experiment("zoo-cifar", "The architecture families on CIFAR-10", plan_zoo, analyze_zoo))
