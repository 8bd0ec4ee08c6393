"""Every shipped recipe loads, and the paper's recipes hold the paper's numbers (PAPER.md section 5)."""

from pathlib import Path

import pytest

from deepres.config import load_config
from deepres.models import list_models

RECIPES = Path(__file__).resolve().parents[1] / "src" / "deepres" / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_recipe_loads_and_names_a_registered_model(path):
    config = load_config(path)
    assert config.model.name in list_models()


@pytest.mark.parametrize("name", [f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)] + [f"plain{d}" for d in (20, 32, 44, 56, 110)])
def test_paper_cifar_recipes(name):
    c = load_config(f"paper/cifar10_{name}")
    # All 50k training images (the released code; the schedule was fixed on a 45k/5k split), fp32 as the paper.
    assert c.model.name == name and c.data.val_size == 0 and c.data.preset == "paper_cifar"
    assert c.train.amp == "off" and not c.train.channels_last and c.train.compile == "off"
    assert (c.train.batch_size, c.train.iterations) == (128, 64000)
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.decay_norm_and_bias) == (0.1, 0.9, 1e-4, True)
    assert (c.schedule.name, c.schedule.milestones, c.schedule.gamma) == ("multistep", [32000, 48000], 0.1)
    if name in ("resnet110", "resnet1202"):
        assert (c.schedule.warmup_until_train_error, c.schedule.warmup_lr) == (80.0, 0.01)
    else:
        assert c.schedule.warmup_until_train_error is None and c.schedule.warmup_iterations == 0


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_paper_imagenet_recipes(depth):
    c = load_config(f"paper/imagenet_resnet{depth}")
    assert c.model.name == f"resnet{depth}" and c.data.preset == "paper_imagenet"
    assert (c.train.batch_size, c.train.iterations, c.optim.lr, c.optim.weight_decay) == (256, 600000, 0.1, 1e-4)
    assert c.train.amp == "off"
