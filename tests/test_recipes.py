"""Every shipped recipe loads, and the paper's recipes hold the paper's numbers (PAPER.md section 5)."""

from pathlib import Path

import pytest

from deepres.config import ConfigError, load_config
from deepres.engine import Schedule
from deepres.models import list_models

RECIPES = Path(__file__).resolve().parents[1] / "src" / "deepres" / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_recipe_loads_and_names_a_registered_model(path):
    config = load_config(path)
    assert config.model.name in list_models()


@pytest.mark.parametrize("name", [f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)]
                         + [f"plain{d}" for d in (20, 32, 44, 56, 110)])
def test_paper_cifar_recipes(name):
    c = load_config(f"paper/cifar10_{name}")
    # All 50k training images (the released code; the schedule was fixed on a 45k/5k split), fp32 as the paper.
    assert c.model.name == name and c.data.val_size == 0 and c.data.preset == "paper_cifar"
    assert c.train.amp == "off" and not c.train.tf32 and not c.train.channels_last and c.train.compile == "off"
    assert (c.train.batch_size, c.train.iterations) == (128, 64000)
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.decay_norm_and_bias) == (0.1, 0.9, 1e-4, True)
    assert (c.schedule.name, c.schedule.milestones, c.schedule.gamma) == ("multistep", [0.5, 0.75], 0.1)
    assert Schedule(c.schedule, c.optim.lr, c.train.iterations).milestones == [32000, 48000]
    if name in ("resnet110", "resnet1202"):
        assert (c.schedule.warmup_until_train_error, c.schedule.warmup_lr) == (80.0, 0.01)
    else:
        assert c.schedule.warmup_until_train_error is None and c.schedule.warmup_iterations == 0


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_paper_imagenet_recipes(depth):
    c = load_config(f"paper/imagenet_resnet{depth}")
    assert c.model.name == f"resnet{depth}" and c.data.preset == "paper_imagenet"
    assert (c.train.batch_size, c.train.iterations, c.optim.lr, c.optim.weight_decay) == (256, 600000, 0.1, 1e-4)
    assert c.train.amp == "off" and not c.train.tf32


def test_tf32_is_a_checked_switch():
    assert load_config("demo").train.tf32 is True  # PyTorch's own choice for convolutions, outside the paper
    assert load_config("paper/cifar10_resnet20", ["train.tf32=true"]).train.tf32 is True
    with pytest.raises(ConfigError, match="train.tf32"):
        load_config("demo", ["train.tf32=sometimes"])


def test_a_shortened_paper_run_keeps_the_paper_shape():
    """--set train.iterations=2000 on a paper recipe drops the learning rate at 1,000 and 1,500 (32k and 48k of 64k)."""
    c = load_config("paper/cifar10_resnet56", ["train.iterations=2000"])
    schedule = Schedule(c.schedule, c.optim.lr, c.train.iterations)
    assert [schedule.lr_at(s) for s in (999, 1000, 1499, 1500)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    imagenet = load_config("paper/imagenet_resnet50", ["train.iterations=1000"])
    assert Schedule(imagenet.schedule, 0.1, 1000).milestones == [250, 500, 750]
    warm = load_config("demo", ["schedule.warmup_iterations=0.1", "train.iterations=300"])
    assert Schedule(warm.schedule, 0.1, 300).warmup == 30


def test_schedule_points_beyond_the_run_are_announced():
    c = load_config("paper/cifar10_resnet20", ["schedule.milestones=500,5000", "train.iterations=1000"])
    notes = Schedule(c.schedule, c.optim.lr, c.train.iterations).notices()
    assert len(notes) == 1 and "5000" in notes[0] and "never drops" in notes[0]
    with pytest.raises(ConfigError, match="schedule.milestones"):
        load_config("paper/cifar10_resnet20", ["schedule.milestones=0.5,-1"])
    with pytest.raises(ConfigError, match="schedule.milestones.*strictly increasing"):
        load_config("paper/cifar10_resnet20", ["schedule.milestones=0.5,0.5"])
    mixed = load_config("paper/cifar10_resnet20", ["schedule.milestones=0.5,500", "train.iterations=1000"])
    schedule = Schedule(mixed.schedule, mixed.optim.lr, 1000)
    notes = schedule.notices()
    assert len(notes) == 1 and "0.5 and 500" in notes[0] and "iteration 500" in notes[0]
    assert schedule.lr_at(500) == pytest.approx(0.001)  # as torch's MultiStepLR: gamma twice
    demo = load_config("demo", ["optim.lr=0.002"])  # the demo's warm-up starts at 0.01
    notes = Schedule(demo.schedule, demo.optim.lr, demo.train.iterations).notices()
    assert len(notes) == 1 and "schedule.warmup_lr 0.01 is above optim.lr 0.002" in notes[0]
    assert not Schedule(demo.schedule, 0.1, demo.train.iterations).notices()


def test_the_readme_lists_every_recipe():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = set(re.findall(r"`(?:paper/|toolkit/)?([a-z0-9_]+)`", readme))
    for stem, options in re.findall(r"`(?:paper/)?([a-z0-9_]+)\{([0-9,]+)\}`", readme):
        listed |= {stem + option for option in options.split(",")}
    recipes = Path(__file__).resolve().parents[1] / "src" / "deepres" / "recipes"
    missing = [p.stem for p in recipes.rglob("*.yaml") if not p.stem.endswith("_common") and p.stem not in listed]
    assert not missing, f"recipes missing from the README: {missing}"
