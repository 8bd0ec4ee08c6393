"""The Python API: ``import deepres`` stays light; ``deepres.train`` takes a recipe or a Config, overrides as a
mapping or strings, your own model, your own dataset and callbacks; ``deepres.evaluate`` reads a checkpoint back."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import deepres
from deepres.config import ConfigError, load_config
from deepres.engine import load_checkpoint
from deepres.engine.logging import read_metrics

from .helpers import make_idx_dataset
from .test_engine import small_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("idx-api"), n_train=384, n_test=96)


def _overrides(data, **extra) -> dict:
    return dict(item.split("=", 1) for item in small_overrides(data, **extra))


def test_import_deepres_is_light_and_lists_its_api():
    code = "import sys, deepres; print('torch' in sys.modules, sorted(deepres.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False"), out
    for name in ("create_model", "list_models", "load_config", "train", "evaluate", "load_model", "predict", "export"):
        assert name in out and callable(getattr(deepres, name))
    assert deepres.create_model("resnet20", num_classes=7)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    assert "resnet56" in deepres.list_models("resnet*")
    with pytest.raises(AttributeError):
        deepres.no_such_thing


def test_train_with_a_mapping_a_config_and_strings_gives_the_same_run(idx_data, tmp_path):
    mapping = _overrides(idx_data, **{"train.iterations": 6, "train.eval_every": 3})
    mapping["train.iterations"] = 6  # values of any type, as --set would read them
    a = deepres.train(None, mapping, run_dir=tmp_path / "a")
    config = load_config(None, [f"{k}={v}" for k, v in mapping.items()])
    b = deepres.train(config, run_dir=tmp_path / "b")
    c = deepres.train(None, [f"{k}={v}" for k, v in mapping.items()], run_dir=tmp_path / "c")
    assert a["iterations"] == b["iterations"] == c["iterations"] == 6
    assert a["test_top1_error"] == b["test_top1_error"] == c["test_top1_error"]
    result = deepres.evaluate(tmp_path / "a" / "checkpoints" / "last.pt")
    assert result["top1_error"] == pytest.approx(a["test_top1_error"], abs=1e-6)


def test_train_bounds_torch_threads_by_the_cpu_quota_while_it_runs(idx_data, tmp_path, monkeypatch, capsys):
    import deepres.config as config

    if config.affinity_cores() < 2:
        pytest.skip("needs two cores to bound the threads below")
    monkeypatch.setattr(config, "cpu_quota", lambda: 1.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        deepres.train(None, _overrides(idx_data, **{"train.iterations": 2}), run_dir=tmp_path / "a", quiet=False,
                      on_step=lambda step, info: seen.append(torch.get_num_threads()))
        assert seen == [1, 1] and torch.get_num_threads() == 2  # bounded while training, restored after
        assert "PyTorch threads 2 -> 1" in capsys.readouterr().err
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice wins
        deepres.train(None, _overrides(idx_data, **{"train.iterations": 2}), run_dir=tmp_path / "b",
                      on_step=lambda step, info: seen.append(torch.get_num_threads()))
        assert seen[2:] == [2, 2]
    finally:
        torch.set_num_threads(before)


def test_load_model_and_predict_read_a_checkpoint_back(idx_data, tmp_path):
    """load_model gives the exported form (float images in [0, 1] in, the run's normalisation built in), with the
    class names; predict classifies image files as `deepres predict` does."""
    deepres.train(None, _overrides(idx_data, **{"train.iterations": 30}), run_dir=tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    model = deepres.load_model(path)
    ckpt = load_checkpoint(path)
    assert model.classes == ckpt["classes"] and model.image_size == (16, 16) and model.in_channels == 1
    assert not model.training and not model.model.training
    from deepres.engine import load_for_inference

    bare, normalizer, _ = load_for_inference(ckpt)
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(images.float() / 255), bare(normalizer(images)), rtol=1e-5, atol=1e-5)
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(img[0].numpy()).save(files[-1])
    # model.transform prepares one image as the run's test did: file, PIL image, uint8 or float tensor alike
    for given in (files[1], Image.open(files[1]), images[1], images[1].float() / 255):
        torch.testing.assert_close(model.transform(given), images[1].float() / 255, rtol=0, atol=0)
    rgb = Image.fromarray(np.stack([images[2][0].numpy()] * 3, axis=-1))
    torch.testing.assert_close(model.transform(rgb), images[2].float() / 255, rtol=0, atol=0)  # luma of grey = grey
    assert model.transform(Image.fromarray(np.zeros((40, 20), np.uint8))).shape == (1, 16, 16)  # resized, cropped
    results = deepres.predict(path, files, top_k=2)
    with torch.no_grad():
        expected = model(images.float() / 255).argmax(1).tolist()
    assert [r["top"][0]["index"] for r in results] == expected
    assert [len(r["top"]) for r in results] == [2] * 4 and results[0]["image"] == str(files[0])
    exported = deepres.export(path, "export", tmp_path / "model.pt2")
    assert exported["path"] == str(tmp_path / "model.pt2") and exported["max_abs_diff"] < 1e-4
    with torch.no_grad():
        program = torch.export.load(exported["path"]).module()
        torch.testing.assert_close(program(images.float() / 255), model(images.float() / 255), rtol=1e-5, atol=1e-5)


class TinyNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def _pictures(n, seed):
    """(PIL image, label) pairs: class = the dominant colour channel (a torchvision-style dataset)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 3
        pixels = rng.integers(0, 90, (12, 12, 3)).astype(np.uint8)
        pixels[..., label] += 150
        out.append((Image.fromarray(pixels), label))
    return out


def test_your_own_model_dataset_and_callbacks(tmp_path):
    steps, evals = [], []

    def on_step(step, info):
        steps.append((step, float(info["loss"]), info["lr"]))
        return step < 40  # False at step 40: stop there

    summary = deepres.train("demo", {"train.iterations": 100, "train.batch_size": 32, "train.eval_every": 20,
                                     "train.log_every": 10, "data.val_size": 0.1, "schedule.warmup_iterations": 0},
                            run_dir=tmp_path / "own", model=TinyNet(), dataset=(_pictures(240, 0), _pictures(60, 1)),
                            on_step=on_step, on_eval=lambda step, row: evals.append((step, sorted(row))))
    assert [s for s, _, _ in steps] == list(range(1, 41))
    assert summary["iterations"] == 40 and summary["model"].endswith("TinyNet")
    assert summary["test_top1_error"] < 40.0  # chance: 66.7%
    assert [(s, "val_loss" in keys) for s, keys in evals] == [(20, True), (40, True), (40, False)]
    ckpt = load_checkpoint(tmp_path / "own" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 40 and ckpt["model_class"].endswith("TinyNet") and ckpt["classes"] == ["0", "1", "2"]
    test_rows = [r for r in read_metrics(tmp_path / "own" / "metrics.jsonl") if "test_top1_error" in r]
    assert len(test_rows) == 1 and test_rows[0]["step"] == 40
    # Read back with the model and data given again: the same test error as the run's, the same predictions
    last, test_set = tmp_path / "own" / "checkpoints" / "last.pt", _pictures(60, 1)
    with pytest.raises(ValueError, match="data given in Python .* dataset=test_set"):
        deepres.evaluate(last)
    with pytest.raises(ValueError, match=r"your own model \(.*TinyNet\).* model=net"):
        deepres.evaluate(last, dataset=test_set)
    with pytest.raises(ValueError, match="your own model"):
        deepres.load_model(last)
    result = deepres.evaluate(last, dataset=test_set, model=TinyNet())
    assert result["count"] == 60 and result["top1_error"] == pytest.approx(summary["test_top1_error"], abs=1e-9)
    assert deepres.evaluate(last, dataset=(_pictures(240, 0), test_set), model=TinyNet())["top1_error"] == \
        result["top1_error"]
    assert deepres.evaluate(last, dataset=test_set, model=TinyNet(), split="all")["count"] == 60  # each image once
    assert deepres.evaluate(last, dataset=(_pictures(240, 0), test_set), model=TinyNet(), split="all")["count"] == 300
    with pytest.raises(ValueError, match="labels must be class indices 0..2"):
        deepres.evaluate(last, dataset=[(image, 3) for image, _ in test_set[:4]], model=TinyNet())
    with pytest.raises(ValueError, match="do not fit the given model"):
        deepres.load_model(last, model=TinyNet(num_classes=4))
    for read in (deepres.load_model, deepres.evaluate):  # published weights build their own model
        with pytest.raises(ValueError, match="resnet50 names published weights"):
            read("resnet50", model=TinyNet())
    model = TinyNet()
    model.load_state_dict(ckpt["model"])
    loaded = deepres.load_model(last, model=TinyNet())
    files = []
    for i, (image, _) in enumerate(test_set[:6]):
        image.save(tmp_path / f"p{i}.png")
        files.append(tmp_path / f"p{i}.png")
    batch = torch.stack([loaded.transform(f) for f in files])
    with torch.no_grad():
        expected = model.eval()((batch - loaded.mean) / loaded.std).argmax(1)  # the weights the run saved
    predicted = deepres.predict(last, files, top_k=1, model=TinyNet())
    assert [r["top"][0]["index"] for r in predicted] == expected.tolist() and loaded.classes == ["0", "1", "2"]
    exported = deepres.export(last, "torchscript", tmp_path / "own.ts", model=TinyNet())
    assert exported["max_abs_diff"] < 1e-4 and (tmp_path / "own.ts").is_file()
    # Resumed only with the same model and data given again (not from the recipe's source)
    recipe = {"train.iterations": 60, "train.batch_size": 32, "data.val_size": 0.1, "schedule.warmup_iterations": 0}
    with pytest.raises(ValueError, match=r'resume="auto", model=\.\.\. \(your .*TinyNet\), dataset=\.\.\.'):
        deepres.train("demo", recipe, run_dir=tmp_path / "own", resume="auto")
    resumed = deepres.train("demo", recipe, run_dir=tmp_path / "own", resume="auto", model=TinyNet(),
                            dataset=(_pictures(240, 0), test_set))
    assert resumed["iterations"] == 60
    with pytest.raises(ConfigError, match="model.init.*your own model .*TinyNet"):
        deepres.train("demo", {"model.init": "pretrained"}, run_dir=tmp_path / "published", model=TinyNet(),
                      dataset=(_pictures(24, 0), _pictures(6, 1)))


def test_bad_datasets_are_named():
    with pytest.raises(ValueError, match=r"train\[1\] is \(3, 8, 8\) but train\[0\] is \(3, 12, 12\)"):
        deepres.train("demo", dataset=([(torch.zeros(3, 12, 12), 0), (torch.zeros(3, 8, 8), 1)], _pictures(3, 0)))
    with pytest.raises(ValueError, match="float image must hold values in"):
        deepres.train("demo", dataset=([(torch.full((3, 4, 4), 5.0), 0)], _pictures(3, 0)))
    with pytest.raises(ValueError, match="'train' and 'test'"):
        deepres.train("demo", dataset={"train": _pictures(3, 0)})


def test_a_recipe_that_does_not_fit_your_dataset_names_every_key(tmp_path):
    """The demo recipe (5,000 validation images, batch 128) on 60 training images: one error naming both keys and
    train.fit_to_data, before anything trains; a dataset that brings its own validation split is not checked against
    data.val_size (it carves nothing)."""
    with pytest.raises(ConfigError) as info:
        deepres.train("demo", run_dir=tmp_path / "a", dataset=(_pictures(60, 0), _pictures(6, 1)))
    message = str(info.value)
    assert "data.val_size=5000 leaves no training images" in message and "60 training images" in message
    assert "train.batch_size=128 is larger than the training split" in message and "train.fit_to_data=true" in message
    with pytest.raises(ConfigError, match=r"train.batch_size=128 is larger") as info:
        deepres.train("demo", run_dir=tmp_path / "b",
                      dataset={"train": _pictures(60, 0), "val": _pictures(6, 2), "test": _pictures(6, 1)})
    assert "data.val_size" not in str(info.value)


def _readme_python(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(title, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_quick_start_runs_as_written(tmp_path):
    code = _readme_python("## Quick start in Python")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
           "DEEPRES_DATA": str(ROOT.parent / "shared" / "data"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["test_accuracy"] > 70.0, summary
    import ast

    own = ast.literal_eval(result.stdout.strip().splitlines()[-1])  # the own run read back with its net and data
    assert own["count"] == 128 and own["split"] == "test" and 0 <= own["top1_error"] <= 100
