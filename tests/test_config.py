import subprocess
import sys

import pytest

from deepres.config import (
    Config,
    ConfigError,
    apply_overrides,
    find_recipe,
    from_dict,
    load_config,
    load_recipe,
    to_yaml,
)


def test_defaults_are_the_paper_cifar_recipe():
    c = Config()
    assert (c.train.batch_size, c.train.iterations) == (128, 64000)
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert c.schedule.milestones == [32000, 48000] and c.schedule.gamma == 0.1
    assert c.data.val_size == 5000


def test_yaml_round_trip(tmp_path):
    config = apply_overrides(
        Config(),
        ["model.name=resnet56", "optim.lr=0.05", "schedule.milestones=[100, 200]", "model.options.width=2",
         "schedule.warmup_until_train_error=80", "data.data_dir=/tmp/x"],
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    again = load_config(path)
    assert again == config
    assert again.model.options == {"width": 2}
    assert to_yaml(again) == to_yaml(config)


def test_overrides_are_coerced_to_the_field_type():
    c = apply_overrides(
        Config(),
        [
            "optim.lr=5e-2",
            "train.iterations=1e3",
            "schedule.milestones=100,200",
            "train.compile=true",
            "optim.nesterov=no",
            "model.shortcut=B",
            "model.num_classes=100",
            "optim.grad_clip=1",
            "name=123",
        ],
    )
    assert c.optim.lr == 0.05 and isinstance(c.optim.lr, float)
    assert c.train.iterations == 1000 and isinstance(c.train.iterations, int)
    assert c.schedule.milestones == [100, 200]
    assert c.train.compile is True and c.optim.nesterov is False
    assert c.model.shortcut == "B" and c.model.num_classes == 100
    assert c.optim.grad_clip == 1.0 and isinstance(c.optim.grad_clip, float)
    assert c.name == "123"
    assert apply_overrides(c, ["model.shortcut=null"]).model.shortcut is None
    # The input is never modified.
    assert Config().optim.lr == 0.1


@pytest.mark.parametrize(
    "override,key,fragment",
    [
        ("optim.lrr=0.1", "optim.lrr", "did you mean 'lr'"),
        ("optimizer.lr=0.1", "optimizer", "allowed keys: name, model, data"),
        ("model.shortcut=D", "model.shortcut", "'A', 'B', 'C'"),
        ("train.iterations=lots", "train.iterations", "an integer"),
        ("train.iterations=1.5", "train.iterations", "an integer"),
        ("train.compile=maybe", "train.compile", "true or false"),
        ("schedule.milestones=1,x", "schedule.milestones[1]", "an integer"),
        ("data.source=imagenet", "data.source", "'imagefolder'"),
        ("train=3", "train", "is a section"),
        ("optim.lr", "optim.lr", "key=value"),
    ],
)
def test_bad_overrides_name_the_key_and_what_is_allowed(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    assert info.value.key == key
    assert fragment in str(info.value)


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: resnet20\n  depth: 20\n")
    with pytest.raises(ConfigError, match="model.depth"):
        load_config(bad)
    with pytest.raises(ConfigError, match="train.batch_size"):
        from_dict({"train": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict({"train": [1, 2]})


def test_recipe_extends_its_parent(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  iterations: 500\n  batch_size: 64\noptim:\n  lr: 0.2\n")
    (tmp_path / "child.yaml").write_text("extends: base\ntrain:\n  iterations: 100\n")
    config = load_config(tmp_path / "child.yaml", ["optim.momentum=0.8"])
    assert (config.train.iterations, config.train.batch_size) == (100, 64)
    assert (config.optim.lr, config.optim.momentum) == (0.2, 0.8)
    (tmp_path / "loop.yaml").write_text("extends: loop\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_recipe(tmp_path / "loop.yaml")


def test_unknown_recipe_name(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPRES_RECIPES", str(tmp_path))
    (tmp_path / "cifar_fast.yaml").write_text("train:\n  iterations: 10\n")
    assert find_recipe("cifar_fast") == tmp_path / "cifar_fast.yaml"
    with pytest.raises(FileNotFoundError, match="cifar_fast"):
        find_recipe("cifar_fats")
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        find_recipe(tmp_path / "nothere.yaml")


def test_cli_config_error_exits_2_naming_the_key():
    result = subprocess.run(
        [sys.executable, "-m", "deepres", "config", "--set", "optim.lrr=0.1"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "optim.lrr" in result.stderr and "lr" in result.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "deepres", "config", "--set", "optim.lr=0.2"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert from_dict(__import__("yaml").safe_load(ok.stdout)).optim.lr == 0.2
