"""eval / predict / export round trips on a trained checkpoint, and the 10-crop and multi-scale tests."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deepres.config import load_config
from deepres.engine import load_checkpoint, load_for_inference, train
from deepres.engine.inference import evaluate_checkpoint, export_checkpoint, predict_images
from deepres.evaluation import multiscale_predict, ten_crop_predict, ten_crops

from .helpers import make_idx_dataset
from .test_engine import small_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    data = make_idx_dataset(root / "data")
    config = load_config(None, small_overrides(data, **{"train.iterations": 40, "train.log_every": 20}))
    summary = train(config, root / "run", quiet=True)
    return root / "run" / "checkpoints" / "last.pt", summary, data


def test_eval_matches_the_training_run(trained):
    path, summary, _ = trained
    result = evaluate_checkpoint(path)
    assert result["count"] == 128 and result["precision"] == "fp32"
    assert result["top1_error"] == pytest.approx(summary["test_top1_error"], abs=1e-9)
    # split="all": every image of the data once, its errors those of the splits together (within one image: batches
    # of other sizes may round a near tie the other way on some CPUs)
    parts = [evaluate_checkpoint(path, split=s) for s in ("train", "val", "test")]
    whole = evaluate_checkpoint(path, split="all")
    assert whole["count"] == sum(p["count"] for p in parts) and "carved" not in whole
    wrong = sum(p["top1_error"] * p["count"] / 100 for p in parts)
    assert abs(whole["top1_error"] * whole["count"] / 100 - wrong) <= 1.0 + 1e-6


def test_eval_of_a_missing_validation_split_says_so(trained, tmp_path):
    _, _, data = trained
    config = load_config(None, small_overrides(data, **{"train.iterations": 2, "data.val_size": 0}))
    train(config, tmp_path / "run", quiet=True)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(ValueError, match=r"no validation split to test here \(the run's data.val_size: 0\); the "
                                         r"splits: train, test, all"):
        evaluate_checkpoint(path, split="val")
    assert evaluate_checkpoint(path, split="all")["count"] == evaluate_checkpoint(path, split="train")["count"] + 128


def test_eval_repeats_a_bf16_runs_numbers_in_bf16_and_tests_in_fp32_when_asked(trained, tmp_path):
    """A run that tested in bf16 during training is tested in bf16 again (its summary's number), and says so."""
    _, _, data = trained
    config = load_config(None, small_overrides(data, **{"train.iterations": 10, "train.amp": "bf16"}))
    summary = train(config, tmp_path / "run", quiet=True)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(path)["eval_precision"] == "bf16"
    result = evaluate_checkpoint(path)
    assert result["precision"] == "bf16" and result["top1_error"] == pytest.approx(summary["test_top1_error"],
                                                                                   abs=1e-9)
    assert result["top5_error"] == pytest.approx(summary["test_top5_error"], abs=1e-9)
    assert evaluate_checkpoint(path, precision="fp32")["precision"] == "fp32"
    assert evaluate_checkpoint(path, precision="fp16")["precision"] == "fp32"  # fp16 needs a GPU
    with pytest.raises(ValueError, match="precision must be one of run, fp32, bf16, fp16"):
        evaluate_checkpoint(path, precision="fp8")


def test_per_class_errors_and_confusion_equal_a_hand_count(trained, capsys):
    from deepres.cli import main
    from deepres.data import load_dataset

    path, summary, _ = trained
    result = evaluate_checkpoint(path, per_class=True)
    model, normalizer, config = load_for_inference(load_checkpoint(path))
    test = load_dataset(config.data).test
    with torch.no_grad():
        predicted = model(normalizer(test.images)).argmax(dim=1)
    classes = len(result["per_class"])
    by_hand = torch.zeros(classes, classes, dtype=torch.int64)
    for label, guess in zip(test.labels.tolist(), predicted.tolist()):
        by_hand[label, guess] += 1
    assert result["confusion"] == by_hand.tolist()
    assert result["top1_error"] == pytest.approx(summary["test_top1_error"], abs=1e-9)
    for i, row in enumerate(result["per_class"]):
        count = int(by_hand[i].sum())
        assert row["count"] == count and row["top1_error"] == pytest.approx(100 * (1 - by_hand[i, i].item() / count))
        others = by_hand[i].clone()
        others[i] = -1
        if others.max() > 0:
            j = [r["class"] for r in result["per_class"]].index(row["mistaken_for"])
            assert j != i and by_hand[i, j] == others.max()
            assert row["mistaken_share"] == pytest.approx(100 * others.max().item() / count)
        else:
            assert row["mistaken_for"] is None
    assert main(["eval", str(path), "--per-class"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"top-5 error {result['top5_error']:.2f}%, loss" in lines[0]  # 10 classes: top-5 shown
    assert lines[1].split() == ["class", "images", "top-1", "error", "most", "often", "mistaken", "for"]
    assert len(lines) == 2 + classes


def test_ten_crop_equals_the_hand_computed_mean(trained):
    path, _, _ = trained
    model, normalizer, _ = load_for_inference(load_checkpoint(path))
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    padded = F.pad(images, (4, 4, 4, 4))
    views = []
    for y, x in [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]:  # 24x24 canvas, 16x16 crops
        views.append(padded[..., y : y + 16, x : x + 16])
    views += [v.flip(-1) for v in views]
    with torch.no_grad():
        by_hand = torch.stack([F.softmax(model(normalizer(v)), dim=1) for v in views]).mean(0)
        ours = ten_crop_predict(normalizer, 16, pad=4)(model, images).exp()
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)
    assert [tuple(c.shape[-2:]) for c in ten_crops(torch.zeros(1, 1, 256, 300), 224)] == [(224, 224)] * 10


def test_multiscale_and_ten_crop_from_the_cli(trained):
    path, _, _ = trained
    out = subprocess.run([sys.executable, "-m", "deepres", "eval", str(path), "--ten-crop", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mode"] == "10-crop" and result["count"] == 128 and result["top1_error"] < 50
    with pytest.warns(UserWarning, match="trained with the none preset .* usually test worse than the single view"):
        multi = evaluate_checkpoint(path, scales=[16, 24])
    assert multi["mode"] == "multi-scale [16, 24]" and 0 <= multi["top1_error"] <= 100
    model, normalizer, _ = load_for_inference(load_checkpoint(path))
    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        single = F.softmax(model(normalizer(x)), 1)
        both = (single + F.softmax(model(normalizer(x.flip(-1))), 1)) / 2
        torch.testing.assert_close(multiscale_predict(normalizer, [16])(model, x).exp(), both)


def test_predict_names_classes(trained, tmp_path):
    path, _, data = trained
    from deepres.data.sources import read_idx

    images = read_idx(data / "t10k-images-idx3-ubyte.gz")[:4]
    labels = read_idx(data / "t10k-labels-idx1-ubyte.gz")[:4]
    files = []
    for i, img in enumerate(images):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(img).convert("RGB").save(f)  # colour file into a grayscale model: converted
        files.append(f)
    results = predict_images(path, files, top_k=3)
    classes = load_checkpoint(path)["classes"]
    assert [len(r["top"]) for r in results] == [3] * 4
    assert all(abs(sum(t["probability"] for t in r["top"])) <= 1.0 + 1e-6 for r in results)
    hits = sum(r["top"][0]["class"] == classes[int(y)] for r, y in zip(results, labels))
    assert hits >= 3
    out = subprocess.run([sys.executable, "-m", "deepres", "predict", str(path), str(files[0]), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)[0]["top"][0]["class"] in classes
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = subprocess.run([sys.executable, "-m", "deepres", "predict", str(path), str(bad)], capture_output=True,
                         text=True)
    assert out.returncode == 1 and "broken.png" in out.stderr and "--on-bad-image skip" in out.stderr
    # skipped: the bad file keeps its place, empty, with the reason; the others are classified as before
    mixed = predict_images(path, [files[0], bad, files[1]], top_k=3, batch_size=2, on_bad_image="skip")
    assert [r["image"] for r in mixed] == [str(files[0]), str(bad), str(files[1])]
    assert mixed[1]["top"] == [] and isinstance(mixed[1]["skipped"], str) and mixed[1]["skipped"]
    assert [t["class"] for t in mixed[2]["top"]] == [t["class"] for t in results[1]["top"]]
    assert "skipped" not in mixed[0] and mixed[0]["top"][0]["probability"] == pytest.approx(
        results[0]["top"][0]["probability"], rel=1e-4, abs=1e-6)
    out = subprocess.run([sys.executable, "-m", "deepres", "predict", str(path), str(bad), str(files[0]),
                          "--on-bad-image", "skip", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "skipped 1 bad image(s) of 2: " in out.stderr and "broken.png" in out.stderr
    assert [bool(r["top"]) for r in json.loads(out.stdout)] == [False, True]
    with pytest.raises(ValueError, match="on_bad_image must be"):
        predict_images(path, files, on_bad_image="ignore")


def test_predict_takes_folders_in_batches(trained, tmp_path):
    """A folder stands for its image files (subfolders too, name order, other files left out); images go through
    in batches, each image's result the same as alone."""
    path, _, data = trained
    from deepres.data.sources import read_idx

    images = read_idx(data / "t10k-images-idx3-ubyte.gz")[:5]
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    names = ["b.png", "a.png", "more/c.png", "more/d.jpg", "e.bmp"]
    for img, name in zip(images, names):
        Image.fromarray(img).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    results = predict_images(path, [folder], top_k=2, batch_size=2)
    assert [Path(r["image"]).relative_to(folder).as_posix() for r in results] == sorted(names)
    for r in results:
        alone = predict_images(path, [r["image"]], top_k=2)[0]
        assert [t["class"] for t in alone["top"]] == [t["class"] for t in r["top"]]
        assert [t["probability"] for t in alone["top"]] == pytest.approx([t["probability"] for t in r["top"]],
                                                                         rel=1e-4, abs=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files .* in folder .*empty"):
        predict_images(path, [tmp_path / "empty"])
    out = subprocess.run([sys.executable, "-m", "deepres", "predict", str(path), str(folder / "more"), "--json",
                          "--batch-size", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [Path(r["image"]).name for r in json.loads(out.stdout)] == ["c.png", "d.jpg"]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "export"])
def test_export_round_trip(trained, tmp_path, fmt):
    path, _, _ = trained
    result = export_checkpoint(path, fmt, tmp_path / ("model.pt2" if fmt == "export" else f"model.{fmt}"))
    assert result["max_abs_diff"] < 1e-4
    model, normalizer, _ = load_for_inference(load_checkpoint(path))
    x = torch.rand(5, 1, 16, 16)  # another batch size than the export example
    with torch.no_grad():
        expected = model((x - normalizer.mean) / normalizer.std).numpy()
    classes = load_checkpoint(path)["classes"]
    if fmt == "onnx":
        import onnx
        import onnxruntime as ort

        got = ort.InferenceSession(result["path"]).run(None, {"images": x.numpy()})[0]
        props = {p.key: p.value for p in onnx.load(result["path"]).metadata_props}
    else:
        files = {"deepres/classes": "", "deepres/normalization_std": ""}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated upstream
            got = (torch.export.load(result["path"], extra_files=files).module() if fmt == "export" else
                   torch.jit.load(result["path"], _extra_files=files))(x).numpy()
        props = {k.split("/", 1)[1]: v.decode() if isinstance(v, bytes) else v for k, v in files.items()}
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert json.loads(props["classes"]) == classes  # class names and normalisation travel with the model
    assert json.loads(props["normalization_std"]) == normalizer.std.flatten().tolist()


def test_export_warns_nothing_and_a_pt2_program_is_named_so(trained, tmp_path):
    path, _, _ = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check that reads the file back leaks no deprecation warning
        export_checkpoint(path, "torchscript", tmp_path / "model.pt")
    with pytest.raises(ValueError, match="ends in .pt2"):
        export_checkpoint(path, "export", tmp_path / "model.bin")
    out = subprocess.run([sys.executable, "-m", "deepres", "export", str(path), "--format", "export", "--out",
                          str(tmp_path / "cli.pt2")], capture_output=True, text=True)
    assert out.returncode == 0 and "wrote" in out.stdout and "Unable to load" not in out.stderr, out.stderr
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_onnx_export_of_deformable_convolutions(tmp_path):
    """torchvision's deform_conv2d goes out as ONNX's DeformConv (opset 19): onnxruntime's outputs equal PyTorch's at
    fractional, position-dependent offsets, with stride, dilation, groups and offset groups."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from torch.torch_version import TorchVersion

    from deepres.engine.inference import ONNXRUNTIME_DEFORM_CONV, _export
    from deepres.models import DeformConv2d

    assert TorchVersion("1.23.2") < ONNXRUNTIME_DEFORM_CONV <= TorchVersion("1.25.0+cpu")

    torch.manual_seed(0)
    net = torch.nn.Sequential(DeformConv2d(4, 8, 3, padding=1, offset_groups=2), torch.nn.ReLU(),
                              DeformConv2d(8, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False))
    with torch.no_grad():
        for conv in net[0], net[2]:
            conv.offset.weight.normal_(0, 0.3)
    example = torch.randn(2, 4, 11, 11)
    if TorchVersion(ort.__version__) < ONNXRUNTIME_DEFORM_CONV:  # no DeformConv kernel to check the file with
        with pytest.raises(RuntimeError, match=f"onnxruntime 1.25 or newer.*this one is {ort.__version__}"):
            _export(net.eval(), example, tmp_path / "deform.onnx", "onnx", {"classes": "[]"})
        pytest.skip(f"onnxruntime {ort.__version__} has no DeformConv kernel (1.25 has)")
    got = _export(net.eval(), example, tmp_path / "deform.onnx", "onnx", {"classes": "[]"})
    with torch.no_grad():
        expected = net(example)
    assert got.shape == expected.shape == (2, 6, 6, 6)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert [n.op_type for n in onnx.load(tmp_path / "deform.onnx").graph.node].count("DeformConv") == 2


def test_an_onnx_export_onnx_cannot_express_names_the_other_formats(tmp_path):
    pytest.importorskip("onnxruntime")
    from deepres.engine.inference import _export

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(6))  # 10x10 into 6x6 bins
    with pytest.raises(RuntimeError, match="ONNX export failed: .*adaptive_avg_pool2d.*--format torchscript"):
        _export(net.eval(), torch.randn(1, 1, 12, 12), tmp_path / "pool.onnx", "onnx", {})


def test_safetensors_export_holds_the_weights_and_metadata(trained, tmp_path):
    from deepres.runs import read_safetensors

    path, _, _ = trained
    result = export_checkpoint(path, "safetensors", tmp_path / "model.safetensors")
    assert result["max_abs_diff"] == 0.0
    tensors, meta = read_safetensors(result["path"])
    ckpt = load_checkpoint(path)
    assert set(tensors) == set(ckpt["model"]) and all(torch.equal(tensors[k], ckpt["model"][k]) for k in tensors)
    assert json.loads(meta["classes"]) == ckpt["classes"] and meta["model"] == ckpt["config"]["model"]["name"]
    header = int.from_bytes(Path(result["path"]).read_bytes()[:8], "little")
    assert header % 8 == 0  # the format's alignment
