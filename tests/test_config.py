import subprocess
import sys

import pytest

from deepres.config import (
    HONOURED_BY_EVERY_STEP,
    STEP_KINDS,
    STEP_REFUSALS,
    Config,
    ConfigError,
    apply_overrides,
    config_keys,
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
    assert c.train.compile == "default" and c.optim.nesterov is False
    assert apply_overrides(c, ["train.compile=false"]).train.compile == "off"
    assert apply_overrides(c, ["train.compile=max-autotune"]).train.compile == "max-autotune"
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
        ("train.compile=maybe", "train.compile", "'reduce-overhead'"),
        ("schedule.milestones=1,x", "schedule.milestones[1]", "a number"),
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


def test_the_length_set_last_decides_between_iterations_and_epochs(tmp_path):
    """imagefolder_fast trains 90 epochs: a train.iterations override replaced nothing before (the epochs won at the
    start of the run, silently). The length set last decides, in overrides and in recipes that extend others."""
    assert load_config("imagefolder_fast").train.epochs == 90
    config = load_config("imagefolder_fast", ["train.iterations=60"])
    assert (config.train.iterations, config.train.epochs) == (60, None)
    assert load_config("imagefolder_fast", ["train.iterations=60", "train.epochs=2"]).train.epochs == 2
    assert load_config("imagefolder_fast", ["train.epochs=2", "train.iterations=60"]).train.epochs is None
    (tmp_path / "short.yaml").write_text("extends: imagefolder_fast\ntrain:\n  iterations: 300\n")
    config = load_config(tmp_path / "short.yaml")
    assert (config.train.iterations, config.train.epochs, config.train.batch_size) == (300, None, 256)
    (tmp_path / "both.yaml").write_text("extends: imagefolder_fast\ntrain:\n  iterations: 300\n  epochs: 3\n")
    assert load_config(tmp_path / "both.yaml").train.epochs == 3
    (tmp_path / "other.yaml").write_text("extends: imagefolder_fast\ntrain:\n  batch_size: 128\n")
    assert load_config(tmp_path / "other.yaml").train.epochs == 90


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


def test_yaml_booleans_of_word_valued_keys(tmp_path):
    """YAML 1.1 reads an unquoted off/on as a boolean: amp: off and compile: false/true still mean what they say."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  amp: off\n  compile: true\n")
    config = load_config(recipe)
    assert config.train.amp == "off" and config.train.compile == "default"
    recipe.write_text("train:\n  amp: on\n")
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(recipe)


# ---------------------------------------------------------------------------------------------------------------
# Config.validate: honoured or refused


def _kind_overrides(kind: str) -> list[str]:
    return {"eager": [], "compiled": ["train.compile=default"], "graph": ["train.cuda_graph=true"]}[kind]


def test_every_key_is_honoured_or_refused_by_every_step_kind():
    """A key added to Config without deciding, for every step kind, whether it is honoured or refused fails here."""
    keys = set(config_keys())
    refused = {r.key for refusals in STEP_REFUSALS.values() for r in refusals}
    assert set(STEP_REFUSALS) == set(STEP_KINDS)
    undecided = keys - HONOURED_BY_EVERY_STEP - refused
    assert not undecided, f"keys with no decision for the step kinds: {sorted(undecided)}"
    assert not (HONOURED_BY_EVERY_STEP - keys), "listed keys that Config does not have"
    assert not (HONOURED_BY_EVERY_STEP & refused), "a key both honoured by every step and refused by one"
    for kind in STEP_KINDS:
        for key in sorted(keys):
            rules = [r for r in STEP_REFUSALS[kind] if r.key == key]
            base = _kind_overrides(kind) + (["task.teacher=t.pt"] if key == "task.name" else [])
            if not rules:  # honoured: its default and the config of this kind load
                assert load_config(None, base).train is not None
                continue
            for rule in rules:  # refused: the example value is an error naming the key, for this kind only
                with pytest.raises(ConfigError) as info:
                    load_config(None, base + [f"{key}={rule.example}"])
                assert info.value.key == key, (kind, key, str(info.value))
                assert kind in str(info.value)
                for other in STEP_KINDS:
                    if other != kind and not any(r.key == key for r in STEP_REFUSALS[other]):
                        extra = ["data.labeled_per_class=10"] if key == "task.name" else []
                        load_config(None, _kind_overrides(other) + base[len(_kind_overrides(kind)):] + extra
                                    + [f"{key}={rule.example}"])


@pytest.mark.parametrize("override,key", [
    ("train.iterations=0", "train.iterations"), ("train.iterations=-5", "train.iterations"),
    ("train.batch_size=0", "train.batch_size"), ("train.log_every=0", "train.log_every"),
    ("train.eval_every=0", "train.eval_every"), ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("optim.lr=nan", "optim.lr"), ("optim.lr=0", "optim.lr"), ("optim.momentum=2", "optim.momentum"),
    ("optim.weight_decay=-1", "optim.weight_decay"), ("schedule.milestones=48000,32000", "schedule.milestones"),
    ("data.val_size=-1", "data.val_size"), ("model.dropout=1.0", "model.dropout"),
    ("task.label_smoothing=1.0", "task.label_smoothing"), ("task.alpha=1.5", "task.alpha"),
    ("train.device=gpu", "train.device"), ("train.stop_at_accuracy=101", "train.stop_at_accuracy"),
    ("finetune.backbone_lr_scale=-0.1", "finetune.backbone_lr_scale"), ("train.ema_decay=1.0", "train.ema_decay"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key


@pytest.mark.parametrize("overrides,key", [
    (["task.name=distillation"], "task.teacher"),
    (["task.name=pseudo_label", "task.teacher=t.pt"], "data.labeled_per_class"),
    (["task.name=pseudo_label", "task.teacher=t.pt", "data.labeled_per_class=5", "task.pseudo_labels=soft",
      "data.cutmix_alpha=1"], "task.pseudo_labels"),
    (["task.name=distillation", "task.teacher=t.pt", "data.loader=workers", "data.labeled_per_class=5"],
     "data.loader"),
    (["task.name=pseudo_label", "task.teacher=t.pt", "data.loader=workers", "data.labeled_per_class=5"],
     "data.loader"),
    (["task.name=pseudo_label", "task.teacher=t.pt", "data.preset=paper_imagenet", "data.labeled_per_class=5"],
     "data.preset"),
    (["task.name=distillation", "task.teacher=t.pt", "data.preset=paper_imagenet", "data.labeled_per_class=5"],
     "data.preset"),
    (["data.unlabeled_subset=10"], "data.unlabeled_subset"),
    (["data.preset=paper_imagenet", "data.loader=device"], "data.loader"),
    (["model.init_head=new"], "model.init_head"),
])
def test_unsupported_combinations_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key


def test_distillation_of_labeled_images_takes_the_worker_loader():
    """Its teacher runs on each batch as loaded; only an unlabeled set needs the images in memory."""
    for sets in (["data.loader=workers"], ["data.preset=paper_imagenet"]):
        assert load_config(None, ["task.name=distillation", "task.teacher=t.pt", *sets]).task.name == "distillation"


def test_cli_config_refuses_what_train_would_refuse():
    """deepres config rejects an unsupported combination with exit 2 naming the key, before any data is read."""
    for command, args, key in (
            ("config", ["--set", "train.cuda_graph=true", "--set", "train.ema_decay=0.999"], "train.ema_decay"),
            ("train", ["--set", "train.cuda_graph=true", "--set", "train.amp=fp16"], "train.amp")):
        result = subprocess.run([sys.executable, "-m", "deepres", command, *(["--recipe", "demo"] if command ==
                                "train" else []), *args, "--set", "data.data_dir=/nonexistent"],
                                capture_output=True, text=True)
        assert result.returncode == 2, (command, result.stderr)
        assert f"'{key}'" in result.stderr and "graph" in result.stderr
    for sets, key, words in ((["model.name=resnet999"], "model.name", "close matches: resnet56"),
                             (["model.options.widths=[8]"], "model.options", "widths")):
        result = subprocess.run([sys.executable, "-m", "deepres", "config", "--recipe", "demo",
                                 *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True)
        assert result.returncode == 2 and f"'{key}'" in result.stderr and words in result.stderr, result.stderr


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cpu_quota_reads_the_smallest_limit_of_the_group_and_its_ancestors(tmp_path):
    from deepres.config import cpu_quota

    v2, proc = tmp_path / "v2", tmp_path / "cgroup"
    _write(v2 / "cpu.max", "max 100000\n")
    _write(v2 / "kubepods" / "cpu.max", "400000 100000\n")
    _write(v2 / "kubepods" / "pod1" / "cpu.max", "250000 100000\n")
    _write(proc, "0::/kubepods/pod1\n")
    assert cpu_quota(v2, proc) == 2.5
    _write(v2 / "kubepods" / "cpu.max", "150000 100000\n")  # a parent's limit binds its children too
    assert cpu_quota(v2, proc) == 1.5
    _write(proc, "0::/\n")
    assert cpu_quota(v2, proc) is None  # the root says max: no limit

    v1 = tmp_path / "v1"
    _write(proc, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    _write(v1 / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(v1 / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    _write(v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    _write(v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(v1, proc) == 3.0
    _write(v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert cpu_quota(v1, proc) is None
    _write(v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "garbage\n")
    assert cpu_quota(v1, proc) is None  # unreadable: no limit assumed
    assert cpu_quota(tmp_path / "missing", tmp_path / "missing-cgroup") is None


def test_available_cores_round_the_quota_down(monkeypatch):
    import deepres.config as config

    seen = config.affinity_cores()
    monkeypatch.setattr(config, "cpu_quota", lambda: None)
    assert config.available_cores() == seen
    monkeypatch.setattr(config, "cpu_quota", lambda: seen + 0.9)
    assert config.available_cores() == seen
    monkeypatch.setattr(config, "cpu_quota", lambda: 0.5)
    assert config.available_cores() == 1
    if seen >= 2:
        monkeypatch.setattr(config, "cpu_quota", lambda: 1.9)
        assert config.available_cores() == 1


def test_the_command_line_bounds_torch_threads_by_the_cpu_quota(monkeypatch, capsys):
    import torch

    import deepres.config as config
    from deepres.cli import main

    if config.affinity_cores() < 2:
        pytest.skip("needs two cores to bound the threads below")
    monkeypatch.setattr(config, "cpu_quota", lambda: 1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert main(["models", "resnet20", "--json"]) == 0
    assert torch.get_num_threads() == 1
    assert "PyTorch threads 2 -> 1" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins
    torch.set_num_threads(2)
    assert main(["models", "resnet20", "--json"]) == 0
    assert torch.get_num_threads() == 2 and "PyTorch threads" not in capsys.readouterr().err


def test_a_recipes_resnet_choices_under_another_model_name_every_key_and_the_fix():
    """imagefolder_fast sets stride_on 3x3 and zero_init_residual for its ResNet-50; with another model those keys
    were an error from inside the model's builder ("unexpected keyword argument"), one key at a time."""
    from deepres.runs import check_model

    with pytest.raises(ConfigError) as caught:
        check_model(load_config("imagefolder_fast", ["model.name=densenet121"]).model)
    assert caught.value.key == "model.stride_on, model.zero_init_residual"
    assert ("model 'densenet121' takes no stride_on or zero_init_residual (this config sets stride_on=3x3, "
            "zero_init_residual=true" in caught.value.message)
    assert caught.value.message.endswith("--set model.stride_on=null --set model.zero_init_residual=null")
    with pytest.raises(ConfigError, match=r"'model.stride_on': model 'resnet20' takes no stride_on"):
        check_model(load_config("imagefolder_fast", ["model.name=resnet20"]).model)  # it has zero_init_residual
    check_model(load_config("imagefolder_fast", ["model.name=densenet121", "model.stride_on=null",
                                                 "model.zero_init_residual=null"]).model)
    check_model(load_config("imagefolder_fast", ["model.name=resnet18"]).model)  # an ImageNet ResNet takes both
    with pytest.raises(ConfigError, match=r"'model.options': .*unexpected keyword argument 'widen'"):
        check_model(load_config("demo", ["model.options.widen=2"]).model)  # other options: the builder's words
