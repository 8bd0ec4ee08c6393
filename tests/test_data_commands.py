"""``deepres data info`` / ``prepare`` / ``preview`` as a user runs them, and the data benchmark's smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from deepres.cli import main

from .test_data_common import REAL_CIFAR_JPEG, REAL_FASHION, make_image_folder, make_tar

KEYS = {"benchmark", "device", "torch", "metric", "ours", "reference", "ratio", "target"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def test_info_image_folder_table_and_json(tmp_path, capsys):
    root = make_image_folder(tmp_path / "f", n_train=5, n_test=2)
    assert main(["data", "info", "imagefolder", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "ant" in out and "total" in out and "15" in out
    assert main(["data", "info", "imagefolder", "--data-dir", str(root), "--val-size", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 12, "val": 3, "test": 6}
    assert [c["name"] for c in summary["classes"]] == ["ant", "bee", "cat"]
    assert sum(c["val"] for c in summary["classes"]) == 3
    assert main(["data", "info", str(root), "--val-size", "0.2", "--json"]) == 0  # a fraction, as data.val_size
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": 12, "val": 3, "test": 6}


def test_info_archive(tmp_path, capsys):
    archive = make_tar(tmp_path / "pics.tar.gz", make_image_folder(tmp_path / "f", n_train=2, n_test=1), "pics")
    assert main(["data", "info", "imagefolder", "--data-dir", str(archive), "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": 6, "test": 3}


def test_info_real_fashion_mnist(capsys):
    if not REAL_FASHION.is_dir():
        pytest.skip(f"{REAL_FASHION} not present")
    assert main(["data", "info", "fashion_mnist", "--data-dir", str(REAL_FASHION), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 60000, "test": 10000}
    assert all(c["train"] == 6000 and c["test"] == 1000 for c in summary["classes"])


@pytest.mark.slow
def test_info_real_cifar10_jpeg(tmp_path, capsys):
    if not REAL_CIFAR_JPEG.is_file():
        pytest.skip(f"{REAL_CIFAR_JPEG} not present")
    assert main(["data", "info", "imagefolder", "--data-dir", str(REAL_CIFAR_JPEG), "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert all(c["train"] == 5000 and c["test"] == 1000 for c in summary["classes"]) and summary["num_classes"] == 10


def test_info_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "info", "imagefolder", "--data-dir", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "deepres data: error: image folder not found" in err and str(tmp_path / "nope") in err
    folder = make_image_folder(tmp_path / "f", n_train=2, n_test=1, size=8)
    assert main(["data", "info", "cifar10", "--data-dir", str(folder)]) == 1  # an image folder given to cifar10
    err = capsys.readouterr().err
    assert f"ask for it as: deepres data info {folder}" in err and "data.source" not in err, err
    # a path stands for imagefolder --data-dir PATH
    assert main(["data", "info", str(folder), "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["splits"] == {"train": 6, "test": 3}  # 2 + 1 in each of 3 classes
    assert main(["data", "info", "cifar11"]) == 1
    err = capsys.readouterr().err
    assert "'cifar11' is neither a data source (cifar10, " in err and "existing folder" in err


def test_info_and_train_name_a_stray_file_and_how_to_skip_it(tmp_path, capsys, caplog):
    """A file that is not an image in a class folder: data info and train name it and the switch that skips it; data
    info --on-bad-image skip lists it and counts the rest."""
    folder = make_image_folder(tmp_path / "f", n_train=3, n_test=2, size=8)
    (folder / "train" / "bee" / "README.txt").write_text("notes")
    assert main(["data", "info", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "README.txt: not an image file" in err and "(--on-bad-image skip leaves such files out" in err, err
    assert main(["data", "info", str(folder), "--on-bad-image", "skip", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 9, "test": 6} and len(summary["skipped"]) == 1
    assert "README.txt" in summary["skipped"][0]
    assert main(["data", "info", str(folder), "--on-bad-image", "skip"]) == 0
    assert "skipped 1 file(s), not counted: " in capsys.readouterr().out
    assert main(["train", "--recipe", "demo", "--set", "data.source=imagefolder", "--set", f"data.data_dir={folder}",
                 "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "README.txt" in err and "(--set data.on_bad_image=skip leaves such files out" in err, err
    with caplog.at_level("WARNING", logger="deepres.data"):  # skipped: named once (the data is scanned twice)
        assert main(["train", "--recipe", "demo", "--set", "data.source=imagefolder", "--set",
                     f"data.data_dir={folder}", "--set", "data.on_bad_image=skip", "--set", "train.iterations=2",
                     "--set", "train.fit_to_data=true", "--quiet", "--run-dir", str(tmp_path / "run2")]) == 0
    assert caplog.text.count("README.txt") == 1, caplog.text


def test_prepare_then_train_source_reads_it(tmp_path, capsys):
    root = make_image_folder(tmp_path / "f", n_train=4, n_test=2, size=12)
    (root / "train" / "bee" / "0002.png").write_bytes(b"")
    dst = tmp_path / "out" / "small.pt"
    assert main(["data", "prepare", str(root), str(dst), "--size", "8"]) == 1
    assert "0002.png" in capsys.readouterr().err
    assert main(["data", "prepare", str(root), str(dst), "--size", "8",
                 "--on-bad-image", "skip", "--workers", "1"]) == 0
    assert "11 train / 6 test" in capsys.readouterr().out
    state = torch.load(dst, weights_only=True)
    assert state["splits"]["train"]["images"].shape == (11, 3, 8, 8) and len(state["skipped"]) == 1
    from deepres.config import DataConfig
    from deepres.data import build_data

    cfg = DataConfig(source="imagefolder", data_dir=str(dst), val_size=2)
    bundle = build_data(cfg, batch_size=3, eval_batch_size=4, seed=0)
    assert bundle.loader == "device" and bundle.dataset.classes == ["ant", "bee", "cat"]
    assert bundle.train.batch(0)[0].shape == (3, 3, 8, 8)
    assert main(["data", "info", "imagefolder", "--data-dir", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_shape"] == [3, 8, 8]


def test_data_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    out = capsys.readouterr().out
    assert "--on-bad-image" in out and "--size" in out


def _preview_config(root, tmp_path, *extra):
    from deepres.config import load_config

    return load_config("demo", ["data.source=imagefolder", f"data.data_dir={root}", f"data.cache_dir={tmp_path / 'c'}",
                                "data.val_size=0", "train.batch_size=6", "data.channels=3", *extra])


def test_preview_shows_training_images_as_the_run_sees_them(tmp_path, capsys):
    """Without augmentation each previewed image is one of the training images, the normalisation undone, titled
    with its class; with CutMix the titles give the two classes' shares; the command writes the grid and a bad key
    exits 2."""
    from deepres.report.plots import training_batch_images

    root = make_image_folder(tmp_path / "f", n_train=4, n_test=2)
    images, labels = training_batch_images(_preview_config(root, tmp_path, "data.preset=none"), rows=2, columns=5)
    assert images.shape == (2, 5, 3, 8, 8)
    from deepres.config import DataConfig
    from deepres.data import load_dataset

    train = load_dataset(DataConfig(source="imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "c"),
                                    val_size=0, channels=3)).train
    originals = train.images.float() / 255
    for r in range(2):
        for c in range(5):
            match = (originals - images[r, c]).abs().flatten(1).amax(1) < 1e-5
            assert match.sum() >= 1, (r, c)
            assert labels[r][c] == ["ant", "bee", "cat"][int(train.labels[match.nonzero()[0, 0]])]
    _, mixed = training_batch_images(_preview_config(root, tmp_path, "data.cutmix_alpha=1.0"), rows=3, columns=6)
    assert any(" / " in label and label.count(" 0.") == 2 for row in mixed for label in row)

    out = tmp_path / "grid.png"
    assert main(["data", "preview", "--recipe", "demo", "--set", "data.source=imagefolder", "--set",
                 f"data.data_dir={root}", "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "data.val_size=0",
                 "--set", "train.batch_size=6", "--set", "data.augment=rotate,noise", "--rows", "2",
                 "--columns", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "training batches 0-1" in capsys.readouterr().out
    assert main(["data", "preview", "--recipe", "demo", "--set", "data.augment=twist", "--out", str(out)]) == 2
    assert "data.augment[0]" in capsys.readouterr().err
    assert main(["data", "preview", "--recipe", "demo", "--set", "data.source=imagefolder", "--set",
                 f"data.data_dir={root}", "--set", "train.batch_size=6", "--columns", "7", "--out", str(out)]) == 2
    assert "data.val_size=5000" in capsys.readouterr().err  # the recipe's, as training says
    assert main(["data", "preview", "--recipe", "demo", "--set", "data.source=imagefolder", "--set",
                 f"data.data_dir={root}", "--set", "train.fit_to_data=true", "--columns", "7", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "notice: data.val_size" in err and "more than the batch size" in err


def test_benchmark_smoke(tmp_path):
    root = make_image_folder(tmp_path / "f", classes=("a", "b"), n_train=20, n_test=2, size=32, fmt="JPEG")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "deepres", "benchmark", "data", "--smoke", "--device", "cpu", "--data", str(root),
         "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "data_pipeline-cpu.json").read_text())
    assert KEYS <= set(result)
    assert result["benchmark"] == "data_pipeline" and result["device"].startswith("cpu")
    assert result["ours"] > 0 and result["reference"] > 0 and result["target"] == 10
    assert result["ratio"] == pytest.approx(result["ours"] / result["reference"])
