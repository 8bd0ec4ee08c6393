"""Using a trained checkpoint: evaluate it (single view, 10-crop, multi-scale), predict images, export it."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..config import available_cores, data_workers
from ..data import Dataset, Split, load_dataset
from ..evaluation import RawLoader, evaluate, multiscale_predict, single_predict, ten_crop_predict
from ..evaluation.crops import centre_crop, resize_shorter
from ..runs import load_checkpoint, load_for_inference

__all__ = [
    "NormalizedModel",
    "TestTransform",
    "evaluate_checkpoint",
    "evaluate_checkpoint_modes",
    "eval_precision",
    "evaluate_pretrained",
    "per_class_errors",
    "export_checkpoint",
    "image_files",
    "load_classifier",
    "load_image",
    "predict_images",
]


def evaluate_checkpoint(
    path: str | Path,
    *,
    data_dir: str | None = None,
    split: str = "test",
    ten_crop: bool = False,
    scales: Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    workers: int | None = None,
    precision: str = "run",
    per_class: bool = False,
    on_bad_image: str | None = None,
    model: nn.Module | None = None,
    dataset=None,
) -> dict:
    """Top-1/top-5 error of a checkpoint on a split of the data it was trained on (or the same source elsewhere):
    ``train``, ``val``, ``test`` or ``all`` (every image of the data, e.g. a new folder of class folders)."""
    return evaluate_checkpoint_modes(path, [(ten_crop, scales)], data_dir=data_dir, split=split,
                                     batch_size=batch_size, device=device, workers=workers, precision=precision,
                                     per_class=per_class, on_bad_image=on_bad_image, model=model,
                                     dataset=dataset)[0]


def per_class_errors(confusion: list[list[int]], classes: Sequence[str]) -> list[dict]:
    """Per class of a confusion matrix (rows the true class): its images, top-1 error, and the class its images were
    most often mistaken for (None when never), with the share of its images that went there."""
    rows = []
    for i, name in enumerate(classes):
        row = confusion[i]
        count = sum(row)
        others = [j for j in range(len(row)) if j != i]
        worst = max(others, key=lambda j: row[j]) if others else None
        rows.append({"class": name, "count": count,
                     "top1_error": 100.0 * (count - row[i]) / count if count else None,
                     "mistaken_for": classes[worst] if worst is not None and row[worst] else None,
                     "mistaken_share": 100.0 * row[worst] / count if worst is not None and count else 0.0})
    return rows


EVAL_PRECISIONS = ("run", "fp32", "bf16", "fp16")


def eval_precision(precision: str, ckpt: dict, device: str) -> str:
    """The arithmetic a checkpoint is tested in: ``run`` (default) is the autocast its run tested in (bf16 when it
    trained in bf16), so a test of its weights repeats the number in its summary; fp16 needs a GPU and falls back to
    fp32 elsewhere. Returns "fp32", "bf16" or "fp16"."""
    from .steps import resolve_amp

    if _checked(precision) == "run":
        precision = ckpt.get("eval_precision") or resolve_amp(ckpt["config"]["train"].get("amp", "off"),
                                                              torch.device(device))
    return _on_device(precision, device)


def _checked(precision: str) -> str:
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(EVAL_PRECISIONS)}; got {precision!r}")
    return precision


def _on_device(precision: str, device: str) -> str:
    """A resolved precision as results name it (a run's "off" is fp32); fp16 off a GPU falls back to fp32."""
    precision = {"off": "fp32"}.get(precision, precision)
    return "fp32" if precision == "fp16" and torch.device(device).type != "cuda" else precision


def _autocast(precision: str, device: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return None
    return lambda: torch.autocast(torch.device(device).type, dtype=dtype)


def evaluate_checkpoint_modes(
    path: str | Path,
    modes: Sequence[tuple[bool, Sequence[int] | None]],
    *,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int | None = None,
    device: str = "cpu",
    workers: int | None = None,
    precision: str = "run",
    per_class: bool = False,
    on_bad_image: str | None = None,
    model: nn.Module | None = None,
    dataset=None,
) -> list[dict]:
    """:func:`evaluate_checkpoint` for several test modes, each ``(ten_crop, scales)``; the checkpoint and the data
    are read once. Runs of the paper's ImageNet preset are tested on images of any size, resized one by one.
    ``workers``: decoding processes (default: the run's ``data.num_workers``, at most the cores). ``batch_size``:
    images per forward pass (default: the run's ``train.eval_batch_size``). ``precision``: see
    :func:`eval_precision`; each result names it. ``per_class``: each result also holds the confusion matrix
    (``confusion``, rows the true class) and ``per_class`` (:func:`per_class_errors`). ``on_bad_image``: ``error``
    or ``skip`` an image file that cannot be decoded (None: the run's ``data.on_bad_image``); skipped test images are
    listed in ``skipped_images``. A 10-crop or multi-scale test
    of a run that trained on uncropped images (not the ImageNet preset) warns: those views are not what the model
    learned from. ``model``: the network of a run that trained one given in Python (see :func:`load_for_inference`);
    ``dataset``: the data of a run that was given its data in Python, a :class:`Dataset` (``split`` chooses in it)
    or a :class:`Split` (tested as the test split, its labels the checkpoint's classes).
    """
    ckpt = load_checkpoint(path)
    if dataset is None and ckpt.get("data_given"):
        raise ValueError(f"{path}: this run trained on data given in Python (deepres.train(dataset=...)), not on "
                         f"data.source: pass the images to test, e.g. deepres.evaluate(checkpoint, dataset=test_set)")
    if isinstance(dataset, Split):
        if len(dataset) and not 0 <= int(dataset.labels.min()) <= int(dataset.labels.max()) < len(ckpt["classes"]):
            raise ValueError(f"dataset: labels must be class indices 0..{len(ckpt['classes']) - 1} (the checkpoint's "
                             f"{len(ckpt['classes'])} classes); got {int(dataset.labels.min())}.."
                             f"{int(dataset.labels.max())}")
        dataset = Dataset("dataset", list(ckpt["classes"]), dataset, dataset, origin="dataset")
    precision = eval_precision(precision, ckpt, device)
    autocast = _autocast(precision, device)
    model, normalizer, config = load_for_inference(ckpt, device, model)
    batch_size = batch_size or config.train.eval_batch_size
    data_cfg = config.data if data_dir is None else dataclasses.replace(config.data, data_dir=data_dir)
    workers = min(data_workers(config.data), available_cores()) if workers is None else workers
    data_cfg = dataclasses.replace(data_cfg, train_subset=None, num_workers=max(0, workers),
                                   on_bad_image=on_bad_image or data_cfg.on_bad_image)
    if split in ("test", "all"):  # neither depends on the validation split: none carved (a small folder)
        data_cfg = dataclasses.replace(data_cfg, val_size=0)
    if data_cfg.preset != "paper_imagenet" and any(ten or sc for ten, sc in modes):
        import warnings

        warnings.warn(f"{path}: trained with the {data_cfg.preset} preset (whole images, no crops of a larger "
                      f"one); 10-crop and multi-scale views differ from what it learned from and usually test "
                      f"worse than the single view", stacklevel=2)
    resized = data_cfg.preset == "paper_imagenet"
    if dataset is None and resized and data_cfg.source == "imagefolder":
        from ..data.pipeline import _folder_dataset

        dataset = _folder_dataset(data_cfg, None)  # scanned, not decoded: the images differ in size
    elif dataset is None:
        dataset = load_dataset(data_cfg)
    dataset = _in_checkpoint_classes(dataset, list(ckpt["classes"]))
    splits = dataset.splits()
    if split == "all":
        splits["all"] = _every_image(splits)
    if split == "val" and splits.get("val") is None:
        raise ValueError(f"{path}: no validation split to test here (the run's data.val_size: "
                         f"{config.data.val_size}); the splits: train, test, all")
    if split not in splits:
        raise ValueError(f"split must be one of {', '.join([*splits, 'all'])}; got {split!r}")
    # A folder of class folders: its test split is carved (a fixed share of each class), as its run carved it
    carved = dataset.extra.get("carved", "") if split == "test" else ""
    crop = int(ckpt["image_size"][0])
    results = []
    for ten_crop, scales in modes:
        if resized:
            result = _evaluate_resized(model, normalizer, splits[split], data_cfg, crop, ten_crop, scales, batch_size,
                                       device, autocast, per_class)
        else:
            if ten_crop:
                predict = ten_crop_predict(normalizer, crop, pad=4 if dataset.image_size[0] == crop else 0)
            elif scales:
                predict = multiscale_predict(normalizer, scales)
            else:
                predict = single_predict(normalizer)
            result = evaluate(model, RawLoader(splits[split], batch_size), device=torch.device(device), predict=predict,
                              autocast=autocast, confusion=per_class)
        mode = "10-crop" if ten_crop else (f"multi-scale {list(scales)}" if scales else "single view")
        if per_class:
            result["per_class"] = per_class_errors(result["confusion"], dataset.classes)
        results.append({"checkpoint": str(path), "split": split, "mode": mode, "precision": precision,
                        "num_classes": len(dataset.classes), **({"carved": carved} if carved else {}), **result})
    return results


def _every_image(splits: dict):
    """The images of every split in one (train, then validation, then test): ``split="all"``, a folder tested whole."""
    from ..data.folders import FileSplit

    parts = []
    for split in splits.values():  # a split given as both train and test (a Split passed in Python) counts once
        if split is not None and len(split) and all(split is not part for part in parts):
            parts.append(split)
    if len(parts) < 2:
        return parts[0] if parts else splits["test"]
    labels = torch.cat([s.labels for s in parts])
    if isinstance(parts[0], FileSplit):
        return FileSplit([p for s in parts for p in s.paths], labels)
    return Split(torch.cat([s.images for s in parts]), labels)


def _in_checkpoint_classes(dataset, classes: list[str]):
    """``dataset`` with its labels counted in the checkpoint's ``classes``: the same list, or a subset of it by name
    (a folder of some of the classes), its labels mapped to the checkpoint's indices."""
    if list(dataset.classes) == classes:
        return dataset
    unknown = [c for c in dataset.classes if c not in classes]
    if unknown:
        raise ValueError(f"the data's classes differ from the checkpoint's: {len(unknown)} not among the checkpoint's "
                         f"{len(classes)} ({', '.join(map(str, unknown[:5]))}{', ...' if len(unknown) > 5 else ''}); "
                         f"the checkpoint's: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}")
    to_checkpoint = torch.tensor([classes.index(c) for c in dataset.classes], dtype=torch.int64)
    splits = {name: dataclasses.replace(split, labels=to_checkpoint[split.labels])
              for name, split in dataset.splits().items()}
    return dataclasses.replace(dataset, classes=classes, **splits)


@torch.no_grad()
def evaluate_pretrained(name: str, data_dir: str | Path, *, ten_crop: bool = False, batch_size: int = 256,
                        device: str = "cpu", workers: int | None = None, on_bad_image: str = "error",
                        precision: str = "fp32", per_class: bool = False) -> dict:
    """Top-1/top-5 error of a model's pretrained weights on the validation images of an ImageNet-layout folder
    (``root/val/<wnid>/``, or ``root/<wnid>/`` itself; an archive of either), each image prepared as the weights were
    evaluated: shorter side resized with their interpolation, centre crop (or the 10 crops of that resized image),
    their mean and std. Class folders map to the weights' classes in sorted order, as torchvision's ImageNet does.
    The published numbers come beside ours (``published_top1_error``, ``published_top5_error``). ``precision``:
    fp32 (``run``: the published weights' own), bf16, or fp16 on a GPU. ``per_class``: also ``per_class``
    (:func:`per_class_errors`, each class named by its folder and the weights' class name) and ``confusion``."""
    from torchvision.transforms.v2 import functional as TF

    from ..data.folders import FileSplit, _scan_split, find_split_root, resolve_image_source
    from ..data.loaders import Normalizer
    from ..data.workers import FileSamples
    from ..evaluation.crops import ten_crops
    from ..evaluation.views import evaluate_views
    from ..models import create_model
    from ..models.pretrained import eval_normalization, eval_resize, pretrained_cfg

    if pretrained_name(name) is None:
        raise ValueError(f"{name!r} is not a model with pretrained weights (deepres models --pretrained lists them)")
    precision = _on_device("fp32" if _checked(precision) == "run" else precision, device)  # as published: fp32
    root = find_split_root(resolve_image_source(data_dir))
    folder = next((root / s for s in ("val", "test") if (root / s).is_dir()), root)
    skipped: list[str] = []
    classes, paths, labels = _scan_split(folder, on_bad_image, skipped)
    cfg = pretrained_cfg(name)
    if len(classes) != cfg["num_classes"]:
        raise ValueError(f"{folder} has {len(classes)} class folders; {name}'s weights know {cfg['num_classes']} "
                         f"classes (ImageNet's, in the sorted order of their folder names n01440764 ...)")
    model = create_model(name, pretrained=True).eval().to(device)
    resize, crop = eval_resize(cfg), cfg["crop_size"]

    def views(image: torch.Tensor) -> list[torch.Tensor]:  # the resize predict's eval_transform does, then the crops
        x = resize(image)
        if ten_crop:
            return [torch.cat(ten_crops(x[None], crop))]
        return [TF.center_crop(x, [crop, crop])[None]]

    normalizer = Normalizer(*eval_normalization(cfg))
    per_batch = max(1, batch_size // (10 if ten_crop else 1))
    workers = available_cores() if workers is None else workers
    result = evaluate_views(model, FileSamples(FileSplit(paths, torch.tensor(labels)), 3), views, normalizer,
                            device=device, images_per_batch=per_batch, workers=max(0, min(workers, 8)),
                            autocast=_autocast(precision, device), confusion=per_class, on_bad_image=on_bad_image)
    if per_class:
        names = [f"{folder_name} ({category})" for folder_name, category in zip(classes, cfg["classes"])]
        result["per_class"] = per_class_errors(result["confusion"], names)
    skipped += result.pop("skipped_images", [])  # files the scan left out, then images that did not decode
    if skipped:
        result["skipped_images"] = skipped
    published = {f"published_top{k}_error": None if cfg[f"top{k}"] is None else 100.0 - cfg[f"top{k}"] for k in (1, 5)}
    return {"checkpoint": name, "split": folder.name, "mode": "10-crop" if ten_crop else "single view",
            "precision": precision, **result,
            "skipped": len(skipped), **published, "weights": cfg["weights"],
            "preprocessing": f"resize {cfg['resize_size']} ({cfg['interpolation']}), "
                             f"{'10 crops' if ten_crop else 'centre crop'} "
                             f"{crop}, mean {list(cfg['mean'])}, std {list(cfg['std'])}"}


def _evaluate_resized(model, normalizer, part, data_cfg, crop, ten_crop, scales, batch_size, device,
                      autocast=None, confusion: bool = False) -> dict:
    """ImageNet-style evaluation: images of any size, resized per image (single centre crop, 10-crop or scales)."""
    from ..data.presets import imagenet_scales
    from ..data.workers import FileSamples, TensorSamples
    from ..evaluation.views import centre_view, evaluate_views, scale_views, ten_crop_views

    samples = FileSamples(part, data_cfg.channels or 3) if hasattr(part, "paths") else TensorSamples(part)
    resize = imagenet_scales(crop)[2]
    if ten_crop:
        views = ten_crop_views(crop, resize)
    elif scales:
        views = scale_views(scales)
    else:
        views = centre_view(crop, resize)
    per_batch = max(1, batch_size // (10 if ten_crop else 2 * len(scales) if scales else 1))
    return evaluate_views(model, samples, views, normalizer, device=device, images_per_batch=per_batch,
                          workers=max(0, data_workers(data_cfg)), autocast=autocast, confusion=confusion,
                          on_bad_image=data_cfg.on_bad_image)


def load_image(path: str | Path, channels: int, size: Sequence[int], resize: int | None = None) -> torch.Tensor:
    """An image file as uint8 (C, H, W), decoded as training decodes (:func:`deepres.data.read_image`: alpha over
    white, 16-bit scaled, the pixel limit), then :func:`fit_image`."""
    from ..data import read_image
    from ..data.images import to_channels

    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return fit_image(to_channels(read_image(path), channels), size, resize)


def fit_image(image: torch.Tensor, size: Sequence[int], resize: int | None = None) -> torch.Tensor:
    """A uint8 (C, H, W) image with its shorter side resized to ``resize`` and the centre crop of ``size`` taken, as a
    run's own test prepared its images. Without ``resize`` (runs that trained on whole images) an image of ``size`` is
    taken as it is and others are resized to the crop's shorter side."""
    h, w = int(size[0]), int(size[1])
    if resize is not None or tuple(image.shape[-2:]) != (h, w):
        image = centre_crop(resize_shorter(image[None], resize or min(h, w)), (h, w))[0]
    return image.contiguous()


class TestTransform:
    """One image prepared as a model's test prepared its images, for :func:`load_classifier`'s model (which
    normalises itself): an image file, a PIL image or a (C, H, W) tensor (uint8, or float in [0, 1]) in; float
    (C, H, W) in [0, 1] out. A PIL image is decoded as its PNG file would be (alpha over white, grey kept grey), then
    brought to the model's channels. ``pretrained_cfg``: the published weights' resize, interpolation and crop
    (:func:`~deepres.models.eval_transform`) instead of a run's."""

    __test__ = False  # not a pytest class

    def __init__(self, channels: int, size: Sequence[int], resize: int | None = None,
                 pretrained_cfg: dict | None = None):
        self.channels, self.size, self.resize = channels, tuple(int(v) for v in size), resize
        self.pretrained = None
        if pretrained_cfg is not None:
            from ..models import eval_transform

            self.pretrained = eval_transform(pretrained_cfg, normalize=False)

    def __call__(self, image) -> torch.Tensor:
        from ..data import read_image
        from ..data.images import decode_image_bytes, to_channels

        if isinstance(image, (str, os.PathLike)):
            if not Path(image).is_file():
                raise FileNotFoundError(f"image not found: {image}")
            image = read_image(image)
        elif not isinstance(image, torch.Tensor):  # a PIL image
            import io

            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = decode_image_bytes(buffer.getvalue(), "<PIL image>")
        elif image.is_floating_point():
            image = (image * 255).round().clamp(0, 255).to(torch.uint8)
        image = to_channels(image, self.channels)
        if self.pretrained is not None:
            return self.pretrained(image)
        return fit_image(image, self.size, self.resize).float() / 255


def run_test_resize(config: dict, crop: int) -> int | None:
    """The shorter side a checkpoint's run resized its test images to before the centre crop (the paper's ImageNet
    preset: 256 for a 224 crop), or None for runs that trained on whole images."""
    from ..data.presets import imagenet_scales

    return imagenet_scales(crop)[2] if config["data"].get("preset") == "paper_imagenet" else None


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files ``paths`` name: files as given, folders searched (with their subfolders) for files with an
    image extension, in name order. A path that does not exist, or a folder without images, is an error naming it."""
    from ..data.images import IMAGE_EXTENSIONS

    files = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {given}")
            files += found
        elif given.is_file():
            files.append(given)
        else:
            raise FileNotFoundError(f"image not found: {given}")
    return files


def pretrained_name(path: str | Path) -> str | None:
    """``path`` as the name of a model with pretrained weights (``deepres models --pretrained``), when it names no
    file."""
    from ..models.pretrained import PRETRAINED

    name = str(path)
    return name if name in PRETRAINED and not Path(path).exists() else None


def load_classifier(path: str | Path, device: str = "cpu", model: nn.Module | None = None) -> NormalizedModel:
    """A checkpoint's trained model (or, for a model name with pretrained weights, those weights) as
    :func:`deepres.load_model` gives it: eval mode, normalisation inside, float images in [0, 1] in, logits out, with
    ``classes``, ``image_size``, ``in_channels`` and ``transform`` (a :class:`TestTransform`: one image prepared as
    the run's test, or the weights' evaluation, prepared it). ``model``: see :func:`load_for_inference`."""
    name = pretrained_name(path)
    if name is not None and model is not None:
        raise ValueError(f"{path} names published weights, which build their own model; model= is for a checkpoint "
                         f"of your own model")
    if name is not None:
        from ..models import create_model
        from ..models.pretrained import eval_normalization

        model = create_model(name, pretrained=True)
        cfg = model.pretrained_cfg
        wrapped = NormalizedModel(model, *eval_normalization(cfg)).to(device).eval()
        wrapped.classes, wrapped.image_size, wrapped.in_channels = list(cfg["classes"]), tuple(cfg["input_size"][1:]), 3
        wrapped.transform = TestTransform(3, wrapped.image_size, pretrained_cfg=cfg)
        return wrapped
    if not Path(path).exists():
        from ..models import list_models

        if str(path) in list_models():
            raise FileNotFoundError(f"checkpoint not found: {path}; model {path} has no pretrained weights (deepres "
                                    f"models --pretrained lists those that have)")
    ckpt = load_checkpoint(path)
    model, normalizer, _ = load_for_inference(ckpt, device, model)
    wrapped = NormalizedModel(model, normalizer.mean, normalizer.std).to(device).eval()
    wrapped.classes = list(ckpt["classes"])
    wrapped.image_size = tuple(int(v) for v in ckpt["image_size"])
    wrapped.in_channels = int(ckpt["in_channels"])
    wrapped.transform = TestTransform(wrapped.in_channels, wrapped.image_size,
                                      run_test_resize(ckpt["config"], wrapped.image_size[0]))
    return wrapped


@torch.no_grad()
def predict_images(path: str | Path, images: Sequence[str | Path], top_k: int = 5, device: str = "cpu",
                   batch_size: int = 64, on_bad_image: str = "error", model: nn.Module | None = None) -> list[dict]:
    """Top-k classes (by name, with probabilities) for each image file; folders among ``images`` stand for the image
    files in them (:func:`image_files`). Images are decoded and classified ``batch_size`` at a time. ``path`` is a
    checkpoint, or the name of a model with pretrained weights (``resnet50``: ImageNet's classes). A file that cannot
    be decoded is an error naming it (``on_bad_image="error"``), or (``"skip"``) keeps its place in the results with
    ``top`` empty and ``skipped`` the reason. ``model``: see :func:`load_for_inference`."""
    from ..data.images import BadImageError

    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip'; got {on_bad_image!r}")
    model = load_classifier(path, device, model)
    classes, files = model.classes, image_files(images)
    k = min(top_k, len(classes))
    results = []
    for start in range(0, len(files), batch_size):
        chunk, prepared, bad = files[start : start + batch_size], [], {}
        for p in chunk:
            try:
                prepared.append(model.transform(p))
            except BadImageError as exc:
                if on_bad_image == "error":
                    raise
                bad[p] = exc.reason
        top = []
        if prepared:
            probs = torch.softmax(model(torch.stack(prepared).to(device)).float(), dim=1)
            values, indices = probs.topk(k, dim=1)
            top = [[{"class": classes[i], "index": int(i), "probability": float(v)}
                    for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]
        good = iter(top)
        results += [{"image": str(p), "top": [], "skipped": bad[p]} if p in bad
                    else {"image": str(p), "top": next(good)} for p in chunk]
    return results


class NormalizedModel(nn.Module):
    """The exported form: float images in [0, 1] (N, C, H, W) in, logits out; normalisation built in."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model((images - self.mean) / self.std)
        return out if isinstance(out, torch.Tensor) else out[0]


EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "export": ".pt2", "safetensors": ".safetensors"}


def export_metadata(ckpt: dict, normalizer) -> dict[str, str]:
    """What an exported file carries beside its weights: class names, normalisation, input size, the run's config."""
    import json

    config = ckpt["config"]
    return {"format": "deepres-export-v1", "model": config["model"]["name"],
            "classes": json.dumps(list(ckpt["classes"])), "in_channels": str(int(ckpt["in_channels"])),
            "image_size": json.dumps(list(ckpt["image_size"])),
            "normalization_mean": json.dumps(normalizer.mean.flatten().tolist()),
            "normalization_mean_shape": json.dumps(list(normalizer.mean.shape)),
            "normalization_std": json.dumps(normalizer.std.flatten().tolist()),
            "input": "float images in [0, 1], (N, C, H, W); the model normalises them itself (onnx, torchscript, "
                     "export)",
            "config": json.dumps(config, default=str)}


@torch.no_grad()
def export_checkpoint(path: str | Path, fmt: str, out: str | Path | None = None, atol: float = 1e-4,
                      model: nn.Module | None = None) -> dict:
    """Export to ONNX, TorchScript or ``torch.export`` (a ``.pt2`` program) - the model with its normalisation inside,
    taking [0, 1] images of any batch size - or to safetensors (the weights and metadata), and check the written file
    against PyTorch on random images. Every format carries the class names, normalisation and input size as metadata
    (:func:`export_metadata`). ``model``: see :func:`load_for_inference`."""
    if fmt not in EXPORT_SUFFIX:
        raise ValueError(f"format must be one of {', '.join(EXPORT_SUFFIX)}; got {fmt!r}")
    ckpt = load_checkpoint(path)
    model, normalizer, _ = load_for_inference(ckpt, model=model)
    wrapped = NormalizedModel(model, normalizer.mean, normalizer.std).eval()
    c, (h, w) = int(ckpt["in_channels"]), ckpt["image_size"]
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    expected = wrapped(example)
    out = Path(out) if out else Path(path).with_suffix(EXPORT_SUFFIX[fmt])
    if fmt == "export" and out.suffix != ".pt2":
        raise ValueError(f"--out {out}: a torch.export program's name ends in .pt2 (torch.export.load expects it)")
    _check_room(out, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    # Written whole, then renamed: never a torn export (torch.export reads back only names ending in .pt2).
    tmp = out.with_name(f".{out.name}.tmp{'.pt2' if fmt == 'export' else ''}")
    metadata = export_metadata(ckpt, normalizer)
    try:
        if fmt == "safetensors":
            got = _export_safetensors(ckpt, model, normalizer, metadata, example, tmp)
        else:
            got = _export(wrapped, example, tmp, fmt, metadata)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) or "enforce fail" in str(exc) or "write" in str(exc).lower():
            raise OSError(getattr(exc, "errno", None) or errno.EIO, f"cannot write {out}: "
                          f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]}",
                          str(out)) from None
        raise
    diff = (got - expected).abs().max().item()
    if diff > atol:
        raise RuntimeError(f"exported model disagrees with PyTorch: max abs difference {diff:.3g} > {atol}")
    return {"path": str(out), "format": fmt, "max_abs_diff": diff, "input": [None, c, h, w]}


def _check_room(out: Path, weight_bytes: int) -> None:
    """Refuse an export the folder cannot hold (a native writer aborts the process on a full disk)."""
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(errno.EACCES, f"cannot write {out}: {os.strerror(errno.EACCES)}", str(out))
    free = shutil.disk_usage(folder).free
    if free < weight_bytes * 1.2 + (1 << 20):
        raise OSError(errno.ENOSPC, f"cannot write {out}: {os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free, "
                                    f"the export needs about {weight_bytes * 1.2 / 2**20:.1f} MiB)", str(out))


def _export_safetensors(ckpt, model, normalizer, metadata, example, out: Path) -> torch.Tensor:
    """Write the model's weights with ``metadata``; read them back into a fresh model and return its outputs."""
    from ..runs import build_model, read_safetensors, write_safetensors

    write_safetensors(model.state_dict(), out, metadata)
    tensors, meta = read_safetensors(out)
    assert meta == metadata
    from ..config import from_dict

    fresh = build_model(from_dict(ckpt["config"]).model, len(ckpt["classes"]), int(ckpt["in_channels"]))
    fresh.load_state_dict(tensors)
    return NormalizedModel(fresh.eval(), normalizer.mean, normalizer.std).eval()(example)


ONNXRUNTIME_DEFORM_CONV = (1, 25)  # the first onnxruntime that runs ONNX's DeformConv (opset 19) on the CPU


def _export(wrapped: nn.Module, example: torch.Tensor, out: Path, fmt: str, metadata: dict) -> torch.Tensor:
    """Write ``wrapped`` to ``out`` in ``fmt`` (with ``metadata``) and return the written file's outputs on
    ``example``."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("ONNX export needs onnx and onnxruntime: pip install 'deepres[export]'") from None
        import warnings

        from torch.torch_version import TorchVersion

        from ..models.deform import DeformConv2d, register_onnx_deform_conv

        deformable = any(isinstance(m, DeformConv2d) for m in wrapped.modules())
        if deformable and TorchVersion(ort.__version__) < ONNXRUNTIME_DEFORM_CONV:  # compares as packaging's
            raise RuntimeError(
                f"ONNX export of deformable convolutions is checked with onnxruntime "
                f"{'.'.join(map(str, ONNXRUNTIME_DEFORM_CONV))} or newer, the first with a DeformConv kernel; this one "
                f"is {ort.__version__} (Python 3.11 or newer gets it) (--format torchscript, export or safetensors "
                f"export every model)")
        batch = {0: "batch"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(wrapped, (example,), str(out), dynamo=False, input_names=["images"],
                                  output_names=["logits"], dynamic_axes={"images": batch, "logits": batch},
                                  opset_version=register_onnx_deform_conv() if deformable else None)
            except torch.onnx.errors.OnnxExporterError as exc:  # an operator or shape ONNX cannot express
                raise RuntimeError(f"ONNX export failed: {str(exc).splitlines()[0]} (--format torchscript, export or "
                                   f"safetensors export every model)") from None
        import onnx

        proto = onnx.load(str(out))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(out))
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": example.numpy()})[0])
    import warnings

    extra = {f"deepres/{k}": v for k, v in metadata.items()}
    if fmt == "export":  # torch.export's program (PyTorch's successor of TorchScript): torch.export.load(path).module()
        from torch.export import Dim

        try:
            # A bound on the batch: without one, PyTorch 2.6 refuses the option-A shortcut's strided slice (a guard
            # that the batch is not 2**63 - 1); 2**20 images a call is no limit in practice.
            batch = Dim("batch", min=1, max=2**20)
            program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
        except Exception as exc:  # torch._dynamo's errors: an operator or control flow it cannot capture
            raise RuntimeError(f"torch.export failed: {str(exc).strip().splitlines()[0]} (--format torchscript or "
                               f"safetensors)") from None
        torch.export.save(program, str(out), extra_files=extra)
        return torch.export.load(str(out)).module()(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the portable C++ format
        scripted = torch.jit.trace(wrapped, example)
        scripted.save(str(out), _extra_files=extra)
        return torch.jit.load(str(out))(example)
