"""Pretrained weights the way torchvision and timm give them. No download: each test puts a file with the published
name into the torch.hub cache, as a download would, and checks what create_model does with it."""

import json
import warnings

import numpy as np
import pytest
import torch
import torchvision

from deepres.models import create_model, list_models
from deepres.models.pretrained import PRETRAINED, eval_transform, pretrained_cfg


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    return tmp_path / "checkpoints"


def _publish(hub, name: str, state: dict) -> None:
    torch.save(state, hub / pretrained_cfg(name)["file_name"])


def test_resnet50_gives_torchvisions_logits(hub):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50().eval()
    _publish(hub, "resnet50", theirs.state_dict())
    with pytest.warns(UserWarning, match="stride_on='3x3'"):
        ours = create_model("resnet50", pretrained=True).eval()
    assert ours.stride_on == "3x3"  # built as the weights were trained
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() < 1e-5
    cfg = ours.pretrained_cfg
    assert cfg["source"] == "torchvision" and cfg["num_classes"] == 1000 and len(cfg["classes"]) == 1000
    assert cfg["crop_size"] == 224 and cfg["top1"] > 75 and cfg["mean"][0] == pytest.approx(0.485)


def test_new_classes_and_grey_input_keep_the_pretrained_layers(hub):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18()
    _publish(hub, "resnet18", theirs.state_dict())
    model = create_model("resnet18", pretrained=True, num_classes=10, in_chans=1, drop_rate=0.2)
    assert model.fc.out_features == 10 and not torch.equal(model.fc.weight[:10], theirs.fc.weight[:10])
    torch.testing.assert_close(model.conv1.weight, theirs.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, theirs.layer4[1].conv2.weight)


def test_densenet_files_with_the_old_names_load(hub):
    torch.manual_seed(0)
    theirs = torchvision.models.densenet121().eval()
    old = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v for k, v in theirs.state_dict().items()}
    _publish(hub, "densenet121", old)
    ours = create_model("densenet121", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() < 1e-5


def test_googlenet_gives_torchvisions_logits_and_new_heads_for_new_classes(hub):
    """torchvision's GoogLeNet weights take inputs in [-1, 1]: ours is built with transform_input, so the same
    ImageNet-normalised input gives the same logits. A new class count leaves the classifier and both auxiliary heads'
    logits layers fresh, the rest pretrained; without auxiliary heads the file's are not loaded."""
    torch.manual_seed(0)
    theirs = torchvision.models.googlenet(aux_logits=True, init_weights=True, transform_input=True).eval()
    with torch.no_grad():
        for module in theirs.modules():  # trained-looking running statistics, so a wrong transform shows
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    _publish(hub, "googlenet", theirs.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the input stays ImageNet-normalised
        ours = create_model("googlenet", pretrained=True).eval()
    assert ours.transform_input and ours.pretrained_cfg["crop_size"] == 224 and ours.pretrained_cfg["top1"] > 69
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        assert (ours(x) - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())
    tuned = create_model("googlenet", pretrained=True, num_classes=10)
    for head in (tuned.fc, tuned.aux1.fc2, tuned.aux2.fc2):
        assert head.out_features == 10
    assert not torch.equal(tuned.fc.weight, theirs.fc.weight[:10])
    assert torch.equal(tuned.aux1.fc1.weight, theirs.aux1.fc1.weight)
    assert torch.equal(tuned.inception5b.branch1.conv.weight, theirs.inception5b.branch1.conv.weight)
    bare = create_model("googlenet", pretrained=True, aux_logits=False)
    assert not bare.aux_logits and torch.equal(bare.fc.weight, theirs.fc.weight)
    # grey: normalised with ImageNet's average mean and std (data.normalize=imagenet), the RGB net's logits on the
    # grey image repeated three times and normalised per channel
    grey = create_model("googlenet", pretrained=True, in_chans=1).eval()
    pixels = torch.rand(2, 1, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = theirs((pixels.expand(-1, 3, -1, -1) - mean) / std)
        got = grey((pixels - mean.mean()) / std.mean())
    assert (got - expected).abs().max().item() < 1e-4 * max(1.0, expected.abs().max().item())
    with pytest.raises(ValueError, match="in_channels 3 or 1"):
        create_model("googlenet", pretrained=True, in_chans=2)


def test_deformable_resnet50_starts_from_resnet50s_weights(hub):
    """Zero offsets: the pretrained deformable net is exactly torchvision's ResNet-50 until training moves them."""
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50().eval()
    _publish(hub, "resnet50", theirs.state_dict())
    with pytest.warns(UserWarning, match="stride_on='3x3'"):
        ours = create_model("deform_resnet50", pretrained=True).eval()
    assert ours.pretrained_cfg["weights_of"] == "resnet50" and ours.pretrained_cfg["file_name"].startswith("resnet50")
    offsets = [p for name, p in ours.named_parameters() if ".offset." in name]
    assert len(offsets) == 2 * 13 and all(not p.any() for p in offsets)
    # In float64 (fp32's rounding differs between deform_conv2d's and the convolution's kernels: 2e-5 of logits near
    # 50, as torchvision's own fp32 is from its float64): the same function.
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = theirs.double()(x)
        assert (ours.double()(x) - expected).abs().max().item() < 1e-10 * expected.abs().max().item()


def test_what_has_no_weights_or_contradicts_them_is_an_error(hub):
    with pytest.raises(ValueError, match="no pretrained weights for 'resnet56'.*resnet50"):
        create_model("resnet56", pretrained=True)
    with pytest.raises(ValueError, match="stride_on='1x1' contradicts"):
        create_model("resnet50", pretrained=True, stride_on="1x1")
    with pytest.raises(RuntimeError, match="place the file at"):  # no network here, no file in the cache
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            create_model("resnet34", pretrained=True)


def test_every_listed_model_is_registered_and_described():
    assert set(PRETRAINED) <= set(list_models())
    transform = eval_transform(pretrained_cfg("efficientnet_b0"))
    out = transform(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_eval_transform_takes_pil_images_as_torchvisions_transforms_do():
    from PIL import Image

    cfg = pretrained_cfg("resnet18")
    transform = eval_transform(cfg)
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    ours = transform(tensor)
    assert type(ours) is torch.Tensor and ours.shape == (3, 224, 224)
    assert torch.equal(transform(Image.fromarray(pixels)), ours)
    assert torch.equal(transform(Image.fromarray(np.dstack([pixels, pixels[..., :1]]))), ours)  # RGBA: alpha dropped
    grey = pixels[..., 0]
    assert torch.equal(transform(Image.fromarray(grey)), transform(Image.fromarray(np.dstack([grey] * 3))))
    # torchvision's own preset (tensor path) resizes uint8 in float and rounds: at most one grey level apart
    theirs = torchvision.models.ResNet18_Weights.DEFAULT.transforms()(tensor)
    assert (ours - theirs).abs().max().item() <= 1.001 / 255 / min(cfg["std"])
    with pytest.raises(ValueError, match="5 channels"):
        transform(torch.zeros(5, 8, 8, dtype=torch.uint8))


def test_predict_and_load_model_take_a_pretrained_models_name(hub, tmp_path):
    import deepres
    from deepres.data import read_image
    from PIL import Image

    torch.manual_seed(0)
    theirs = torchvision.models.resnet18().eval()
    _publish(hub, "resnet18", theirs.state_dict())
    image = tmp_path / "photo.png"
    Image.fromarray(torch.randint(0, 256, (260, 300, 3), dtype=torch.uint8).numpy()).save(image)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    with torch.no_grad():  # the weights' preprocessing (resize 256, crop 224, their mean and std) and torchvision's net
        x = eval_transform(pretrained_cfg("resnet18"))(read_image(image))
        expected = torch.softmax(theirs(x[None]), dim=1)[0].topk(3)
        # torchvision's own transform resizes uint8 with other rounding (one grey level apart): the same classes
        assert torch.equal(theirs(weights.transforms()(read_image(image))[None]).topk(3).indices[0], expected.indices)
    [got] = deepres.predict("resnet18", [image], top_k=3)
    classes = weights.meta["categories"]
    assert [t["class"] for t in got["top"]] == [classes[i] for i in expected.indices.tolist()]
    assert [t["probability"] for t in got["top"]] == pytest.approx(expected.values.tolist(), rel=1e-4)
    model = deepres.load_model("resnet18")
    assert model.image_size == (224, 224) and model.classes == classes
    with torch.no_grad():
        raw = x * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        assert (model(raw[None]) - theirs(x[None])).abs().max().item() < 1e-4
        # model.transform: the weights' resize and crop, [0, 1] out (the model normalises), from a file or PIL image
        torch.testing.assert_close(model.transform(image), raw, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.transform(Image.open(image)), raw, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="resnet20 has no pretrained weights"):
        deepres.predict("resnet20", [image])


def test_eval_of_pretrained_weights_on_an_imagenet_folder(hub, tmp_path, monkeypatch, capsys):
    """Each image prepared as the weights were evaluated (resize, centre crop, their mean and std; shrunk here to a
    36 resize and 32 crop to keep it fast), class folders in sorted order; the published error beside ours."""
    import deepres.models.pretrained as pretrained
    from deepres.cli import main
    from deepres.data import read_image
    from deepres.engine.inference import evaluate_pretrained
    from PIL import Image

    real = pretrained.pretrained_cfg
    monkeypatch.setattr(pretrained, "pretrained_cfg", lambda name: {**real(name), "resize_size": 36, "crop_size": 32})
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18().eval()
    _publish(hub, "resnet18", theirs.state_dict())
    generator = torch.Generator().manual_seed(0)
    for c in range(1000):
        folder = tmp_path / "imagenet" / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        pixels = torch.randint(0, 256, (40 + c % 7, 48, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / "image.png")
    transform = eval_transform(pretrained.pretrained_cfg("resnet18"))
    files = sorted((tmp_path / "imagenet" / "val").glob("*/image.png"))
    with torch.no_grad():
        logits = theirs(torch.stack([transform(read_image(f)) for f in files]))
    labels = torch.arange(1000)
    expected_top1 = 100.0 * (logits.argmax(1) != labels).float().mean().item()
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()

    import deepres

    result = deepres.evaluate("resnet18", data_dir=tmp_path / "imagenet", batch_size=250, workers=0, per_class=True)
    assert result["count"] == 1000 and result["split"] == "val" and result["precision"] == "fp32"
    assert result["top1_error"] == pytest.approx(expected_top1, abs=0.11)  # one image's worth of rounding
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert result["published_top1_error"] == pytest.approx(100 - real("resnet18")["top1"])
    # Per class (one image each here): its row names the folder and the weights' class; the confusion matrix holds
    # each image once, at (its class, the predicted class).
    rows, matrix = result["per_class"], torch.tensor(result["confusion"])
    categories = real("resnet18")["classes"]
    assert rows[0]["class"] == f"n00000000 ({categories[0]})" and [r["count"] for r in rows] == [1] * 1000
    assert matrix.sum() == 1000 and (matrix.sum(1) == 1).all()
    agree = (matrix.argmax(1) == logits.argmax(1)).float().mean().item()
    assert agree >= 0.99 and sum(r["top1_error"] for r in rows) / 1000 == pytest.approx(result["top1_error"])
    bf16 = deepres.evaluate("resnet18", data_dir=tmp_path / "imagenet", batch_size=250, workers=0, precision="bf16")
    assert bf16["precision"] == "bf16" and bf16["loss"] != result["loss"]
    assert bf16["loss"] == pytest.approx(result["loss"], rel=0.05)
    assert main(["eval", "resnet18", "--data-dir", str(tmp_path / "imagenet"), "--ten-crop", "--workers", "0",
                 "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "on val (10-crop, 1,000 images, fp32; resize 36 (bilinear), 10 crops 32" in out, out
    published = result["published_top1_error"]
    assert f"published (torchvision, single centre crop, fp32): top-1 error {published:.2f}%" in out
    assert "most often mistaken for" in out and f"n00000000 ({categories[0]})" in out
    assert main(["eval", "resnet18"]) == 2 and "--data-dir" in capsys.readouterr().err
    broken = tmp_path / "imagenet" / "val" / "n00000007" / "image.png"
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(ValueError, match="n00000007"):
        evaluate_pretrained("resnet18", tmp_path / "imagenet", workers=0)
    assert main(["eval", "resnet18", "--data-dir", str(tmp_path / "imagenet"), "--workers", "0", "--on-bad-image",
                 "skip", "--json"]) == 0
    captured = capsys.readouterr()
    skipping = json.loads(captured.out)
    assert skipping["count"] == 999 and skipping["skipped"] == 1 and "n00000007" in skipping["skipped_images"][0]
    assert "skipped 1 bad image(s) of val" in captured.err
    (tmp_path / "imagenet" / "val" / "n00000999" / "image.png").rename(tmp_path / "spare.png")
    (tmp_path / "imagenet" / "val" / "n00000999").rmdir()
    with pytest.raises(ValueError, match="999 class folders; resnet18's weights know 1000"):
        evaluate_pretrained("resnet18", tmp_path / "imagenet", workers=0)
