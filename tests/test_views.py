"""Test-time views of images of any size (the paper's ImageNet testing): centre crop, 10-crop, multi-scale."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import deepres
from deepres.config import load_config
from deepres.data import Normalizer
from deepres.engine import train
from deepres.data import read_image
from deepres.data.presets import paper_imagenet_eval
from deepres.engine import load_checkpoint, load_for_inference
from deepres.engine.inference import evaluate_checkpoint, predict_images
from deepres.engine.logging import read_metrics
from deepres.evaluation import centre_view, evaluate_views, scale_views, ten_crop_views
from deepres.evaluation.crops import resize_shorter, ten_crops


class Samples:
    """Images of different sizes and aspect ratios, as an image folder holds them."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        sizes = [(40, 52), (48, 36), (40, 52), (64, 40), (36, 36)]
        self.images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
        self.labels = torch.tensor([0, 1, 2, 1, 0])

    def __len__(self):
        return len(self.images)

    def load(self, i):
        return self.images[i]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3)).eval()


def by_hand(model, normalizer, samples, views_of):
    scores = []
    with torch.no_grad():
        for image in samples.images:
            views = views_of(image)
            probs = torch.stack([F.softmax(model(normalizer(v[None])), dim=1)[0] for v in views]).mean(dim=0)
            scores.append(probs.log())
    scores = torch.stack(scores)
    return {"loss": F.nll_loss(scores, samples.labels).item(),
            "top1_error": 100.0 * (scores.argmax(1) != samples.labels).float().mean().item()}


@pytest.mark.parametrize("mode", ["centre", "ten", "scales"])
def test_views_equal_a_hand_computation(mode):
    model, samples = small_net(), Samples()
    normalizer = Normalizer(torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))
    if mode == "centre":
        views, by_image = centre_view(32, 37), lambda im: ten_crops(resize_shorter(im[None], 37), 32)[4]
    elif mode == "ten":
        views, by_image = ten_crop_views(32, 37), lambda im: torch.cat(ten_crops(resize_shorter(im[None], 37), 32))
    else:
        scales = [32, 48, 64]

        def by_image(im):
            out = []
            for s in scales:
                x = resize_shorter(im[None], s)[0]
                out += [x, x.flip(-1)]
            return out

        views = scale_views(scales)
    # Two images per batch: views of one shape from different images run together, others apart.
    result = evaluate_views(model, samples, views, normalizer, images_per_batch=2)
    expected = by_hand(model, normalizer, samples, lambda im: list(by_image(im)) if mode != "centre"
                       else [by_image(im)[0]])
    assert result["count"] == 5
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert result["top1_error"] == pytest.approx(expected["top1_error"])


def test_eval_of_an_imagenet_preset_run_on_a_folder_of_mixed_sizes(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for split, n in (("train", 12), ("val", 5)):
        for k in range(3):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(36, 70, size=2)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                    root / split / f"c{k}" / f"{i}.jpg")
    config = load_config("paper/imagenet_resnet18", [
        f"data.data_dir={root}", "data.val_size=6", "data.image_size=32", "data.num_workers=0",
        "train.iterations=2", "train.batch_size=6", "train.eval_batch_size=6", "train.eval_every=2",
        "train.checkpoint_every=2", "train.log_every=1", "optim.lr=0.001",
    ])
    train(config, tmp_path / "run", quiet=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    single = evaluate_checkpoint(ckpt)
    # the single view is the test the run made while training (same resize, same centre-crop rounding)
    tested = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "test_loss" in r][-1]
    assert single["loss"] == pytest.approx(tested["test_loss"], rel=1e-5)
    assert single["top1_error"] == pytest.approx(tested["test_top1_error"], abs=1e-9)
    # predict prepares a file as that test did: the preset's resize (37 for a 32 crop), then the centre crop
    file = sorted((root / "val" / "c1").iterdir())[0]
    model, normalizer, _ = load_for_inference(load_checkpoint(ckpt))
    with torch.no_grad():
        expected = F.softmax(model(normalizer(paper_imagenet_eval(32)(read_image(file))[None])), dim=1)[0]
    top = predict_images(ckpt, [file], top_k=3)[0]["top"]
    view = paper_imagenet_eval(32)(read_image(file)).float() / 255
    torch.testing.assert_close(deepres.load_model(ckpt).transform(file), view, rtol=0, atol=0)
    assert [row["probability"] for row in top] == pytest.approx([expected[r["index"]].item() for r in top], rel=1e-5)
    ten = evaluate_checkpoint(ckpt, ten_crop=True, per_class=True)
    matrix = torch.tensor(ten["confusion"])
    assert matrix.sum() == 15 and matrix.sum(dim=1).tolist() == [row["count"] for row in ten["per_class"]] == [5] * 3
    assert 100 * (1 - matrix.trace().item() / 15) == pytest.approx(ten["top1_error"])
    multi = evaluate_checkpoint(ckpt, scales=[32, 37, 55])
    assert single["count"] == ten["count"] == multi["count"] == 15
    assert (single["mode"], ten["mode"], multi["mode"]) == ("single view", "10-crop", "multi-scale [32, 37, 55]")
    for result in (single, ten, multi):
        assert 0.0 <= result["top1_error"] <= 100.0 and np.isfinite(result["loss"])
    # A test image that no longer decodes: an error naming it, or with on_bad_image=skip left out and listed
    broken = root / "val" / "c2" / "3.jpg"
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(ValueError, match="c2/3.jpg"):
        evaluate_checkpoint(ckpt)
    skipped = evaluate_checkpoint(ckpt, on_bad_image="skip")
    assert skipped["count"] == 14 and len(skipped["skipped_images"]) == 1
    assert skipped["skipped_images"][0].startswith(str(broken))
