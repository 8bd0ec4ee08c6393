"""Every architecture family trains through ``deepres train``: a few steps on a learnable set, and the loss falls.

"Falls" is measured robustly to the noise of batch-16 SGD: the median loss of the last 8 steps against the mean of
the first 4. The deep bottleneck nets (deformable ResNet-50, ResNeXt-50) start their residual branches at zero
(``zero_init_residual``) and warm the rate up over 8 steps: at a constant 0.05 from random init their loss jumps to
20-50 in the first steps and the outcome depends on the CPU's rounding.
"""

import json
import statistics

import pytest

from deepres.cli import main
from deepres.engine.logging import read_metrics

from .helpers import make_idx_dataset

# One member of each family at CIFAR size (small_input where the family has it), its learning rate, its iterations and
# the side of the grayscale images it trains on (VGG's five 2x2 pools need at least 32 pixels). AlexNet, without
# batch normalisation, sits near chance longer than the others before its loss moves.
STABLE_START = {"zero_init_residual": True}
WARMUP = {"deform", "resnext"}
FAMILIES = {
    "alexnet": ("alexnet", {"small_input": True}, 0.05, 32, 16),
    "vgg": ("vgg11_bn", {"small_input": True}, 0.05, 24, 32),
    "googlenet": ("googlenet", {"small_input": True}, 0.01, 24, 16),
    "densenet": ("densenet_bc", {"depth": 40}, 0.1, 24, 16),
    "senet": ("se_resnet18", {"small_input": True}, 0.05, 24, 16),
    "efficientnet": ("efficientnet_b0", {"small_input": True}, 0.05, 24, 16),
    "deform": ("deform_resnet50", STABLE_START, 0.02, 40, 32),  # ImageNet stem: deformable stages at 4x4 and below
    "resnext": ("resnext50_32x4d", {"small_input": True, **STABLE_START}, 0.02, 32, 16),
}


@pytest.fixture(scope="module")
def idx_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-idx")
    return {size: make_idx_dataset(root / str(size), n_train=256, n_test=64, size=size) for size in (16, 32)}


# The two ResNet-50-size variants take about 25 s each here, so they run in the slow suite. They are the ResNet class
# senet trains through; tests/test_zoo.py checks ResNeXt's logits against torchvision's, the deformable conv against
# torchvision's operator, and every family's training step under bf16 autocast.
SLOW = {"deform", "resnext"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f
                                    for f in sorted(FAMILIES)])
def test_family_trains_through_the_command_line(family, idx_sets, tmp_path):
    name, options, lr, iterations, size = FAMILIES[family]
    run = tmp_path / "run"
    args = [
        "train", "--recipe", "toolkit/demo", "--run-dir", str(run),
        "--set", f"model.name={name}",
        "--set", "data.source=fashion_mnist", "--set", f"data.data_dir={idx_sets[size]}",
        "--set", "data.val_size=32", "--set", "data.preset=none",
        "--set", "train.batch_size=16", "--set", "train.eval_batch_size=64", "--set", f"train.iterations={iterations}",
        "--set", "train.log_every=1", "--set", f"train.eval_every={iterations}",
        "--set", f"train.checkpoint_every={iterations}",
        "--set", "schedule.name=constant", "--set", f"schedule.warmup_iterations={8 if family in WARMUP else 0}",
        "--set", "schedule.warmup_lr=0", "--set", f"optim.lr={lr}", "--set", "optim.weight_decay=0",
    ]
    for key, value in options.items():
        args += ["--set", f"model.options.{key}={value}"]
    assert main(args) == 0
    losses = [r["train_loss"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]
    assert len(losses) == iterations
    first, last = statistics.mean(losses[:4]), statistics.median(losses[-8:])
    assert last < 0.8 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == name and summary["iterations"] == iterations
