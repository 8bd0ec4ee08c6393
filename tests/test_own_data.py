"""Your own image folder: root/<class>/ with a carved, seeded test split; a recipe that meets a small folder names
every misfit at once, or with train.fit_to_data bounds itself to the data; worker counts follow the machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deepres.config import DataConfig, available_cores, data_workers, load_config
from deepres.data import load_dataset
from deepres.data.folders import scan_image_folder, split_per_class
from deepres.engine.fit import DataMisfit, fit_to_data

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def make_class_folder(root: Path, per_class=(60, 60, 60), size=(20, 24), seed=0) -> Path:
    """root/<class>/<image>.png: one colour per class with noise (easy to learn, not trivial to decode)."""
    rng = np.random.default_rng(seed)
    for c, count in enumerate(per_class):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = (rng.normal(0, 30, (*size, 3)) + np.array(COLOURS[c])).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_class_folder(tmp_path_factory.mktemp("own") / "flowers")


def test_split_per_class_is_stratified_fixed_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3 + [3] * 1)
    kept, carved = split_per_class(labels, 0.2, seed=7)
    assert sorted(torch.cat([kept, carved]).tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[carved], minlength=4).tolist() == [10, 6, 1, 0]  # a lone image stays in train
    again = split_per_class(labels, 0.2, seed=7)
    assert torch.equal(again[0], kept) and torch.equal(again[1], carved)
    assert not torch.equal(split_per_class(labels, 0.2, seed=8)[1], carved)
    _, counted = split_per_class(labels, 21, seed=7)  # a count, shared in proportion to the classes
    assert len(counted) == pytest.approx(21, abs=2)


def test_a_class_folder_gets_a_carved_test_split(folder):
    index = scan_image_folder(folder, test_size=0.2)
    assert index.layout == "classes" and index.classes == ["class0", "class1", "class2"]
    assert index.counts() == {"train": [48, 48, 48], "test": [12, 12, 12]}
    assert not set(index.splits["train"].paths) & set(index.splits["test"].paths)
    assert "36 images" in index.carved
    dataset = load_dataset(DataConfig(source="imagefolder", data_dir=str(folder), val_size=0.1, test_size=12))
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (151, 17, 12)
    assert dataset.extra["carved"].startswith("test split: 12 images")


def test_an_archive_of_a_class_folder_is_looked_through(folder, tmp_path):
    import tarfile

    archive = tmp_path / "flowers.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="flowers")
    dataset = load_dataset(DataConfig(source="imagefolder", data_dir=str(archive), val_size=0))
    assert (len(dataset.train), len(dataset.test)) == (144, 36)


def test_a_small_folder_names_every_misfit_at_once(folder):
    config = load_config("imagefolder_fast", [f"data.data_dir={folder}", "train.fit_to_data=false",
                                              "data.val_size=500"])
    with pytest.raises(DataMisfit) as info:
        fit_to_data(config)
    message = str(info.value)
    assert "data.val_size=500 leaves no training images" in message
    assert "train.batch_size=256 is larger than the training split" in message
    assert "144 training images" in message


def test_fit_to_data_bounds_validation_batch_lr_crop_and_cadence(folder):
    config = load_config("imagefolder_fast", [f"data.data_dir={folder}"])
    fitted, notices = fit_to_data(config)
    assert fitted.data.val_size == 14  # a tenth of 144
    assert fitted.train.batch_size == 64  # the largest power of two within half of the 130 left
    assert fitted.optim.lr == pytest.approx(0.1 * 64 / 256)
    assert fitted.schedule.warmup_lr == pytest.approx(0.01 * 64 / 256)
    assert fitted.data.image_size == 16  # 20x24 images: 20 * 224/256 = 17.5, rounded down to a multiple of 8
    iterations = 90 * (130 // 64)
    assert fitted.train.eval_every == fitted.train.checkpoint_every == iterations // 10
    assert len(notices) == 6 and all("->" in n for n in notices[:-1])
    # 16x16 crops into ResNet-50's ImageNet stem: advice, no change
    assert "model resnet50 is built for 224x224 input; its downsampling leaves 16x16" in notices[-1]
    assert "small_input=true" in notices[-1]
    assert "small_input" not in fitted.model.options
    big, big_notices = fit_to_data(config, count=(1_281_167, "imagenet", (375, 500)))
    assert (big.data.val_size, big.train.batch_size, big.optim.lr, big.data.image_size) == (10000, 256, 0.1, None)
    assert not any("small_input" in n for n in big_notices)
    # With labeled_per_class only the labeled images train: the batch fits them (144 images, 3 classes)
    few, few_notices = fit_to_data(load_config("imagefolder_fast", [f"data.data_dir={folder}",
                                                                    "data.labeled_per_class=10"]))
    assert few.train.batch_size == 8 and "at most half of the 30 labeled training images" in few_notices[1]
    with pytest.raises(DataMisfit, match=r"train.batch_size=64 is larger than the training split \(30 labeled"):
        fit_to_data(load_config("imagefolder_fast", [f"data.data_dir={folder}", "data.labeled_per_class=10",
                                                     "train.fit_to_data=false", "data.val_size=0",
                                                     "train.batch_size=64"]))
    for sets in (["model.options.small_input=true"], ["model.name=resnet56", "model.stride_on=null"]):
        chosen = load_config("imagefolder_fast", [f"data.data_dir={folder}", *sets])
        assert not any("small_input" in n for n in fit_to_data(chosen)[1])


def test_config_fit_prints_the_config_a_run_on_the_data_would_use(folder, capsys):
    from deepres.cli import main

    assert main(["config", "--recipe", "imagefolder_fast", "--set", f"data.data_dir={folder}", "--fit"]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed["data"]["val_size"] == 14 and printed["train"]["batch_size"] == 64
    assert printed["optim"]["lr"] == pytest.approx(0.025) and "notice: data.val_size 10000 -> 14" in err
    assert main(["config", "--recipe", "imagefolder_fast", "--set", f"data.data_dir={folder}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["val_size"] == 10000  # without --fit: the recipe's
    unfitted = ["--set", f"data.data_dir={folder}", "--set", "train.fit_to_data=false", "--fit"]
    assert main(["config", "--recipe", "imagefolder_fast", *unfitted]) == 2
    assert "config keys data.val_size, train.batch_size: the data (144 training images" in capsys.readouterr().err


def test_worker_counts_default_to_the_machine(monkeypatch):
    assert data_workers(DataConfig()) == min(8, available_cores())
    assert data_workers(DataConfig(num_workers=3)) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11})
    assert data_workers(DataConfig()) == 8


def _train(folder: Path, run: Path, *sets: str):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "deepres", "train", "--recipe", "imagefolder_fast", "--set",
                           f"data.data_dir={folder}", *args, "--run-dir", str(run)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_the_toolkit_recipe_trains_on_a_small_class_folder(folder, tmp_path, capsys):
    """The user's first try: their folder, the recipe, nothing else set (epochs shortened here to keep the suite
    fast; the slow test below runs the recipe as it is)."""
    result = _train(folder, tmp_path / "run", "train.epochs=8")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "test split: 36 images (20% of each class, fixed seed)" in out
    assert "train 130, val 14, test 36" in out
    assert "train.batch_size 256 -> 64" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 16
    assert summary["test_top1_error"] < 40.0, summary  # chance is 66.7%
    # deepres eval repeats the run's test; with 3 classes the top-5 error (always 0) is not shown as a number
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "deepres", "eval", str(tmp_path / "run" / "checkpoints" / "last.pt")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert f"top-1 error {summary['test_top1_error']:.2f}%, top-5 error - (3 classes), loss" in out.stdout
    # A folder of some of the classes: tested in the checkpoint's classes, its labels mapped by name
    import shutil

    from deepres.engine.inference import evaluate_checkpoint

    some = tmp_path / "some"
    for name in ("class2", "class0"):
        shutil.copytree(folder / name, some / name)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    result = evaluate_checkpoint(last, data_dir=str(some), per_class=True, workers=0)
    rows = {r["class"]: r["count"] for r in result["per_class"]}
    assert rows == {"class0": 12, "class1": 0, "class2": 12} and result["count"] == 24  # 20% of 60 per class
    assert result["top1_error"] < 40.0  # class2's images counted as class2, not as the subset's second class
    assert result["carved"] == "test split: 24 images (20% of each class, fixed seed)"
    few = tmp_path / "few" / "class1"  # fewer training images than the run's validation split (14): no matter
    few.mkdir(parents=True)
    for image in sorted((folder / "class1").iterdir())[:10]:
        shutil.copy(image, few / image.name)
    assert evaluate_checkpoint(last, data_dir=str(few.parent), workers=0)["count"] == 2
    # --split all: a folder tested whole (every image once), and the default test says it tested the carved part
    whole = evaluate_checkpoint(last, data_dir=str(some), split="all", per_class=True, workers=0)
    assert {r["class"]: r["count"] for r in whole["per_class"]} == {"class0": 60, "class1": 0, "class2": 60}
    assert "carved" not in whole and whole["top1_error"] < 40.0
    from deepres.cli import main

    assert main(["eval", str(last), "--data-dir", str(few.parent), "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert "test (single view, 2 images" in out and "holds class folders: tested its test split: 2 images" in err
    assert main(["eval", str(last), "--data-dir", str(few.parent), "--workers", "0", "--split", "all"]) == 0
    out, err = capsys.readouterr()
    assert "all (single view, 10 images" in out and "class folders" not in err
    shutil.copytree(folder / "class1", some / "tulips")
    with pytest.raises(ValueError, match=r"1 not among the checkpoint's 3 \(tulips\)"):
        evaluate_checkpoint(last, data_dir=str(some), workers=0)


@pytest.mark.slow
def test_the_toolkit_recipe_as_it_is_on_a_small_class_folder(folder, tmp_path):
    result = _train(folder, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 180
    assert summary["test_top1_error"] < 10.0, summary
