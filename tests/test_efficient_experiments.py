"""deepres reproduce semi-supervised | distillation | transfer | augmentation: plans, runs and reports.

The default suite runs each experiment end to end on small synthetic data with its smoke schedule shortened further;
the tests marked slow run the real smoke commands on ../shared/data (CIFAR-10 JPEG and Fashion-MNIST).
"""

import numpy as np
import pytest

from deepres.cli import main
from deepres.config import load_config
from deepres.experiments import EXPERIMENTS, Options, run_experiment
from deepres.experiments import efficient

from .conftest import shared_data
from .efficient_helpers import _one_thread  # noqa: F401
from .helpers import make_idx_dataset, make_image_folder

NAMES = ["semi-supervised", "distillation", "transfer", "augmentation"]


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """An image folder shaped like the CIFAR-10 JPEG set, big enough for the smoke subsets: 200 train / 50 test."""
    def paint(img, k):
        img[:, 3 * k : 3 * k + 3, k % 3] += np.uint8(150)  # a bright column per class

    return make_image_folder(tmp_path_factory.mktemp("tinycifar") / "cifar10-jpeg", {"train": 200, "test": 50}, paint)


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path / "data" / "fashion-mnist", n_train=2200, n_test=800)
    monkeypatch.setenv("DEEPRES_DATA", str(tmp_path / "data"))


@pytest.mark.parametrize("scale", ["smoke", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_every_planned_run_is_a_valid_config_taught_by_an_earlier_run(name, scale, tmp_path):
    options = Options(scale=scale, seeds=2, out=tmp_path, data_dir=str(tmp_path / "cifar"))
    specs = EXPERIMENTS[name].plan(options)
    seen = set()
    for spec in specs:
        config = load_config(spec.recipe, spec.overrides)
        for path in filter(None, [config.task.teacher, config.model.init]):
            assert path == str(tmp_path / "runs" / path.split("/runs/")[1])
            assert path.split("/runs/")[1].split("/")[0] in seen  # trained before it is needed
        seen.add(spec.name)
    assert len(seen) == len(specs)
    assert {s.meta["seed"] for s in specs} == {0, 1}


def test_full_scale_uses_the_issue_s_label_counts(tmp_path):
    options = Options(scale="full", out=tmp_path)
    semi = [load_config(s.recipe, s.overrides) for s in EXPERIMENTS["semi-supervised"].plan(options)]
    assert {c.data.labeled_per_class for c in semi} == {400} and {c.data.unlabeled_subset for c in semi} == {None}
    transfer = [load_config(s.recipe, s.overrides) for s in EXPERIMENTS["transfer"].plan(options)]
    assert [c.data.labeled_per_class for c in transfer] == [None, 100, 100, 100]
    assert [c.finetune.mode for c in transfer[1:]] == ["full", "feature_extraction", "full"]
    distill = [load_config(s.recipe, s.overrides) for s in EXPERIMENTS["distillation"].plan(options)]
    assert [c.model.name for c in distill] == ["resnet56", "resnet20", "resnet20"]


def test_laptop_distillation_shares_one_longer_trained_teacher(tmp_path):
    options = Options(scale="laptop", seeds=3, out=tmp_path, data_dir=str(tmp_path / "cifar"))
    specs = EXPERIMENTS["distillation"].plan(options)
    configs = {s.name: load_config(s.recipe, s.overrides) for s in specs}
    teacher = configs.pop("eff-cifar10-resnet56-teacher")
    assert specs[0].name == "eff-cifar10-resnet56-teacher" and teacher.model.name == "resnet56"
    students = [c for c in configs.values() if c.task.name == "distillation"]
    assert len(students) == 3 and len(configs) == 6
    assert {c.task.teacher for c in students} == {str(tmp_path / "runs" / "eff-cifar10-resnet56-teacher" /
                                                      "checkpoints" / "last.pt")}
    assert teacher.train.iterations == 3 * students[0].train.iterations
    assert all(c.model.name == "resnet20" for c in configs.values())


def test_all_four_reports_on_small_data(tiny_cifar, tiny_fashion, tmp_path, monkeypatch):
    # The smoke schedule, shortened and narrowed: the whole path (plan, train, teach, analyse) in seconds.
    monkeypatch.setattr(efficient, "SMOKE", efficient.SMOKE + [
        "train.iterations=4", "train.eval_every=4", "train.checkpoint_every=4", "train.log_every=2",
        "model.options.widths=[8, 16, 32]", "data.val_size=200", "data.test_per_class=10"])
    options = Options(scale="smoke", seeds=2, data_dir=str(tiny_cifar), out=tmp_path)
    reports = {name: run_experiment(name, options).read_text() for name in NAMES}
    semi = reports["semi-supervised"]
    for row in ["| labeled only | 2 |", "| pseudo-labeling | 2 |", "| Noisy Student, iteration 2 | 2 |"]:
        assert row in semi
    assert "20 labeled images per class" in semi and "+/-" in semi
    assert "by more than the seed spread" in semi
    assert "| ResNet-20 distilled | 2 |" in reports["distillation"]
    transfer = reports["transfer"]
    assert "| feature extraction | 2 |" in transfer and "| fine-tuning | 2 |" in transfer
    assert "Of the two," in transfer
    for method in ["CutMix", "RandAugment", "TrivialAugment", "random erasing", "random subset"]:
        assert f"| {method} | 2 |" in reports["augmentation"]
    for name, plot in [("semi-supervised", "semi_supervised"), ("transfer", "transfer")]:
        assert (tmp_path / name / "plots" / f"{plot}.png").stat().st_size > 5_000
    # The distillation baseline is the augmentation baseline and the transfer source: trained once.
    assert len(list((tmp_path / "runs").glob("eff-cifar10-resnet20-s*"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_smoke_command_on_the_real_data(name, tmp_path, capsys):
    shared_data("cifar10-jpeg.tar.gz")
    shared_data("fashion-mnist")
    assert main(["reproduce", name, "--scale", "smoke", "--out", str(tmp_path)]) == 0
    report = (tmp_path / name / "report.md").read_text()
    assert "CIFAR-10 JPEG" in report and "test accuracy %" in report
