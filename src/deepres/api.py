"""The Python API: train and evaluate from Python as the command line does, with your own model, data and callbacks.

>>> import deepres
>>> summary = deepres.train("demo", {"train.iterations": 200}, run_dir="runs/api")
>>> deepres.evaluate("runs/api/checkpoints/best.pt")["top1_error"]
>>> model = deepres.load_model("runs/api/checkpoints/best.pt")    # float images in [0, 1] -> logits
>>> deepres.predict("runs/api/checkpoints/best.pt", ["shoe.png"], top_k=3)

See :func:`train`, :func:`evaluate`, :func:`load_model` and :func:`predict`; ``deepres.create_model`` /
``list_models`` / ``load_config`` are the model registry's and the config's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["evaluate", "export", "load_model", "predict", "train"]


def _override_text(key: str, value: Any) -> str:
    import yaml

    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def resolve_config(recipe=None, overrides: Mapping[str, Any] | Sequence[str] | None = None):
    """A Config from a recipe name or path (or a Config, or None: the defaults) with ``overrides`` applied: a mapping
    ``{"optim.lr": 0.05}`` or ``["optim.lr=0.05"]`` strings, as ``--set`` takes them."""
    from .config import Config, apply_overrides, load_config

    if isinstance(overrides, Mapping):
        overrides = [_override_text(k, v) for k, v in overrides.items()]
    overrides = list(overrides or [])
    if isinstance(recipe, Config):
        return apply_overrides(recipe, overrides).validate()
    if recipe is not None and not isinstance(recipe, (str, os.PathLike)):
        raise TypeError(f"recipe: a recipe name, a path or a Config; got {type(recipe).__name__}")
    return load_config(recipe, overrides)


def train(recipe: Any = None, overrides: Mapping[str, Any] | Sequence[str] | None = None, *,
          run_dir: str | os.PathLike | None = None, resume: str | None = None, model=None, dataset=None,
          on_step: Callable[[int, dict], Any] | None = None, on_eval: Callable[[int, dict], Any] | None = None,
          quiet: bool = True) -> dict:
    """Train a run, as ``deepres train`` does; returns its summary (also in ``<run_dir>/summary.json``).

    - ``recipe``: a recipe name (``"demo"``, ``"paper/cifar10_resnet20"``), a YAML path, a
      :class:`~deepres.config.Config`, or None (the defaults); ``overrides`` as in :func:`resolve_config`.
    - ``run_dir``: the run folder (default ``runs/<config name>``); ``resume``: None, ``"auto"`` or a checkpoint.
    - ``model``: your own ``nn.Module`` instead of ``model.name`` (its outputs: one logit per class of the data).
      Checkpoints record its class; load them into a model you build.
    - ``dataset``: your own data instead of ``data.source``: a :class:`~deepres.data.Dataset`, or ``(train, test)``
      map-style datasets of ``(image, label)`` (see :mod:`deepres.data.custom`), or a dict with ``train``, ``test``
      and optionally ``val``. Without ``val``, ``data.val_size`` carves one from train (0: none).
    - ``on_step(step, {"loss": tensor, "lr": float})`` after every step; returning False ends the run there (it is
      tested and checkpointed). ``on_eval(step, row)`` after every validation and test evaluation.
    - ``quiet``: no progress lines (the log, summary and checkpoints are written either way).

    Under a CPU quota smaller than the cores the process sees (a container's ``--cpus``), PyTorch's threads are
    bounded by the quota while the run trains, as on the command line, unless ``OMP_NUM_THREADS`` is set.
    """
    from .config import threads_within_quota
    from .engine import train as train_run

    config = resolve_config(recipe, overrides)
    dataset = _dataset(dataset)
    bounded = threads_within_quota()
    if bounded is not None and not quiet:
        print(f"deepres: {bounded[1]} while training", file=sys.stderr)
    try:
        return train_run(config, run_dir, resume, quiet, model=model, dataset=dataset, on_step=on_step,
                         on_eval=on_eval)
    finally:
        if bounded is not None:
            import torch

            torch.set_num_threads(bounded[0])


def _dataset(dataset):
    if dataset is None:
        return None
    from .data import Dataset
    from .data.custom import dataset_from

    if isinstance(dataset, Dataset):
        return dataset
    if isinstance(dataset, Mapping):
        unknown = set(dataset) - {"train", "test", "val", "classes"}
        if unknown or not {"train", "test"} <= set(dataset):
            raise ValueError(f"dataset: a dict needs 'train' and 'test' (and may have 'val', 'classes'); got "
                             f"{sorted(dataset)}")
        return dataset_from(dataset["train"], dataset["test"], dataset.get("val"), dataset.get("classes"))
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        return dataset_from(*dataset)
    raise TypeError(f"dataset: a deepres Dataset, a (train, test) pair or a dict; got {type(dataset).__name__}")


def evaluate(checkpoint: str | os.PathLike, *, split: str = "test", data_dir: str | None = None,
             ten_crop: bool = False, scales: Sequence[int] | None = None, batch_size: int | None = None,
             device: str = "cpu", workers: int | None = None, precision: str = "run",
             per_class: bool = False, on_bad_image: str | None = None, model=None, dataset=None) -> dict:
    """Top-1/top-5 error (percent) and loss of a checkpoint on a split of the data it was trained on (``split``:
    ``train``, ``val``, ``test`` or ``all``, every image once), as ``deepres eval`` prints them; ``data_dir`` reads
    the same source from elsewhere (a folder of class folders: ``carved`` names the test split cut from it).
    ``precision``: ``"run"`` tests in the arithmetic the run tested in during training (its ``train.amp``), so the
    number repeats its summary; ``"fp32"``, ``"bf16"`` or ``"fp16"`` (GPU) choose. ``per_class``: also
    ``per_class`` (each class's images, top-1 error and the class it is most often mistaken for) and ``confusion``
    (rows the true class). ``checkpoint`` may also name a model with pretrained weights (``"resnet50"``), tested on
    the ImageNet folder ``data_dir`` (its validation images, prepared as the weights were evaluated; the published
    error beside ours), in fp32 unless ``precision`` asks for bf16 or fp16. ``on_bad_image``: ``"error"``
    (pretrained weights' default) or ``"skip"`` (listed in ``skipped_images``) for an image file that cannot be
    decoded; None: the run's ``data.on_bad_image``.

    A run trained with your own model or data (``train(model=..., dataset=...)``) is tested with them: ``model`` the
    network to load its weights into (they replace its own), ``dataset`` the images: a map-style dataset of ``(image,
    label)`` (tested as the test split), or what ``train`` takes (``split`` chooses in it)."""
    from .engine.inference import evaluate_checkpoint, evaluate_pretrained, pretrained_name

    if pretrained_name(checkpoint) is not None:
        if model is not None or dataset is not None:
            raise ValueError(f"{checkpoint} names published weights, tested on an ImageNet folder (data_dir) with "
                             f"their own model; model= and dataset= are for a checkpoint of your own run")
        if data_dir is None or scales:
            raise ValueError(f"{checkpoint}: pretrained weights are tested on an ImageNet folder (data_dir) with a "
                             f"centre crop or ten_crop")
        return evaluate_pretrained(str(checkpoint), data_dir, ten_crop=ten_crop, batch_size=batch_size or 256,
                                   device=device, workers=workers, precision=precision, per_class=per_class,
                                   on_bad_image=on_bad_image or "error")
    return evaluate_checkpoint(Path(checkpoint), data_dir=data_dir, split=split, ten_crop=ten_crop, scales=scales,
                               batch_size=batch_size, device=device, workers=workers, precision=precision,
                               per_class=per_class, on_bad_image=on_bad_image, model=model,
                               dataset=_test_dataset(dataset))


def _test_dataset(dataset):
    """What :func:`evaluate` tests: a Dataset, or one map-style dataset as a Split (a Dataset when it names its
    classes, as torchvision's do)."""
    from .data import Dataset, Split
    from .data.custom import split_from

    if isinstance(dataset, Split):
        return dataset
    if dataset is None or isinstance(dataset, (Dataset, Mapping)) or (
            isinstance(dataset, (tuple, list)) and len(dataset) == 2 and not isinstance(dataset[0], tuple)):
        return _dataset(dataset)
    split, classes = split_from(dataset, "dataset"), getattr(dataset, "classes", None)
    if classes is None:
        return split
    return Dataset("dataset", [str(c) for c in classes], split, split, origin="dataset")


def load_model(checkpoint: str | os.PathLike, *, device: str = "cpu", model=None):
    """The trained model of a checkpoint in eval mode, as ``deepres export`` writes it: float images in [0, 1] of
    shape (N, C, H, W) in (``image_size`` (H, W) as trained, ``in_channels`` C), logits out, the run's normalisation
    built in. ``classes`` names the logits; ``model`` is the bare network (normalised input), for features or further
    training; ``transform`` prepares one image (a file, a PIL image or a tensor) as the run's test did:
    ``model(model.transform(image)[None])``. EMA weights when the run kept them.

    ``checkpoint`` may also name a model with pretrained weights (``"resnet50"``; ``deepres models --pretrained``):
    its ImageNet classes, the weights' normalisation, ``image_size`` their crop, ``transform`` their evaluation resize
    and crop.

    ``model``: the network to load the weights into (they replace its own), for a run that trained your own model
    (``train(model=net)``; its checkpoint names the class)."""
    from .engine.inference import load_classifier

    return load_classifier(checkpoint, device, model)


def predict(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], *, top_k: int = 5,
            device: str = "cpu", batch_size: int = 64, on_bad_image: str = "error", model=None) -> list[dict]:
    """Top-k classes of image files (folders stand for their images), as ``deepres predict --json`` prints them:
    ``[{"image": path, "top": [{"class", "index", "probability"}, ...]}, ...]``. Images are decoded as training
    decoded them, resized and centre-cropped to the model's input. ``checkpoint`` may also name a model with
    pretrained weights (``"resnet50"``), whose images are prepared as the weights were evaluated. A file that cannot
    be decoded raises an error naming it, or with ``on_bad_image="skip"`` keeps its place with ``top`` empty and
    ``"skipped"`` the reason. ``model``: as :func:`load_model`'s."""
    from .engine.inference import predict_images

    return predict_images(checkpoint, list(images), top_k=top_k, device=device, batch_size=batch_size,
                          on_bad_image=on_bad_image, model=model)


def export(checkpoint: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None, *,
           model=None) -> dict:
    """Export a checkpoint as ``deepres export`` does: ``fmt`` ``onnx``, ``torchscript``, ``export`` (a
    ``torch.export`` program, ``.pt2``) or ``safetensors``; ``out`` defaults to a file beside the checkpoint. The
    written file is checked against PyTorch first; returns its path, format, input shape and the largest
    difference. ``model``: as :func:`load_model`'s."""
    from .engine.inference import export_checkpoint

    return export_checkpoint(Path(checkpoint), fmt, out, model=model)
