"""A recipe against the data it meets: every misfit named at once, or the recipe bounded to the data.

Recipes are written for a dataset's size (``imagefolder_fast``: ImageNet, batch 256, 10,000 validation images). On
a folder of a few hundred images those values leave no training images or make a batch larger than the split. Before
anything is built, :func:`fit_to_data` counts the training images and either lists every misfit in one error (the
default) or, with ``train.fit_to_data``, bounds them, each change a notice the run prints and logs.
"""

from __future__ import annotations

import dataclasses

from ..config import Config, ConfigError
from ..data.datasets import resolve_size

__all__ = ["DataMisfit", "fit_to_data", "training_images"]


class DataMisfit(ConfigError):
    """Config values the data cannot satisfy; ``problems`` lists (key, message) for each."""

    def __init__(self, problems: list[tuple[str, str]], where: str):
        self.key, self.problems = problems[0][0], problems
        listed = "; ".join(f"{key}={message}" for key, message in problems)
        keys = ", ".join(key for key, _ in problems)
        self.message = (f"the data ({where}) does not fit them: {listed} (train.fit_to_data=true bounds them to the "
                        f"data)")
        ValueError.__init__(self, f"config keys {keys}: {self.message}")


def training_images(data) -> tuple[int, str, tuple[int, int] | None, int]:
    """(training images before the validation split, where they are, the first image's (height, width), classes) of a
    DataConfig."""
    from ..data import sources

    if data.source == "imagefolder":
        from ..data.folders import (_require_data_dir, is_prepared_file, load_prepared, resolve_image_source,
                                    scan_image_folder)
        from ..data.images import file_image_size

        path = _require_data_dir(data)
        if is_prepared_file(path):
            prepared = load_prepared(path)
            return len(prepared.train), str(path), tuple(prepared.train.images.shape[-2:]), prepared.num_classes
        # quiet: the loader scans again and names each skipped file; here only the count is wanted
        index = scan_image_folder(resolve_image_source(path, data.cache_dir), data.on_bad_image, data.test_size,
                                  quiet=True)
        size = file_image_size(index.splits["train"].paths[0])  # None: a bad first image, named later by the loader
        return len(index.splits["train"]), str(path), size, len(index.classes)
    dataset = sources.SOURCES[data.source](data)
    return len(dataset.train), data.source, tuple(dataset.train.images.shape[-2:]), dataset.num_classes


def _small_images(model, side: int) -> list[str]:
    """Advice (no change) when images far below a 224-pixel net's input meet it: every such family has a 32x32 form
    (``small_input``) that downsamples less."""
    from ..models import model_entry

    try:
        native = min(model_entry(model.name).input_size)
    except ValueError:  # an unknown model is named later, with its close matches
        return []
    if side >= 64 or native < 100 or "small_input" in model.options:
        return []
    return [f"model {model.name} is built for {native}x{native} input; its downsampling leaves {side}x{side} images "
            f"a few pixels wide early on. model.options.small_input=true gives it its 32x32 form (less downsampling: "
            f"more compute per image); this run keeps the {native}x{native} form"]


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def fit_to_data(config: Config, world_size: int = 1, count: tuple | None = None) -> tuple[Config, list[str]]:
    """``config`` checked against its data's size; returns (the config, notices). Without ``train.fit_to_data`` a
    misfit raises :class:`DataMisfit` naming every key at once; with it, the values are bounded (see the config's
    comment) and each change is a notice. ``count``: :func:`training_images`'s tuple, the classes optional (needed
    only with ``data.labeled_per_class``)."""
    d, t, o, s = config.data, config.train, config.optim, config.schedule
    n, where, image, *classes = count or training_images(d)
    where = f"{n:,} training images in {where}"
    problems, notices = [], []
    val = resolve_size(d.val_size, n)
    if t.fit_to_data and val > n // 10:
        notices.append(f"data.val_size {d.val_size} -> {n // 10}: a tenth of the {n:,} training images")
        val = n // 10
        d = dataclasses.replace(d, val_size=val)
    elif val >= n:
        problems.append(("data.val_size", f"{d.val_size} leaves no training images"))
    n_train = max(0, n - val)
    if d.train_subset is not None:
        n_train = min(n_train, d.train_subset)
    images = "training images"
    if d.labeled_per_class is not None and classes:  # the labeled images train; the rest wait unlabeled
        n_train, images = min(n_train, d.labeled_per_class * classes[0]), "labeled training images"
    batch = t.batch_size
    if t.fit_to_data and batch > max(world_size, n_train // 2):
        batch = max(world_size, _power_of_two_at_most(n_train // 2) // world_size * world_size)
        scale = batch / t.batch_size
        notices.append(f"train.batch_size {t.batch_size} -> {batch}: at most half of the {n_train:,} {images};"
                       f" optim.lr {o.lr:g} -> {o.lr * scale:g} (scaled with the batch)")
        o = dataclasses.replace(o, lr=o.lr * scale)
        s = dataclasses.replace(s, warmup_lr=s.warmup_lr * scale, min_lr=s.min_lr * scale)
        t = dataclasses.replace(t, batch_size=batch)
    elif batch > (n_train or n):  # with no training images left, against all of them: every misfit at once
        problems.append(("train.batch_size", f"{batch} is larger than the training split ({n_train or n:,} {images})"))
    if problems:
        raise DataMisfit(problems, where)
    if t.fit_to_data and d.preset == "paper_imagenet" and d.image_size is None and image is not None:
        side = min(image)
        if side < 256:  # smaller than the preset's test resize: crop in proportion rather than upsample
            crop = max(8, side * 224 // 256 // 8 * 8)
            notices.append(f"data.image_size null -> {crop}: the images are {image[0]}x{image[1]}, smaller than the "
                           f"preset's 256 resize for 224 crops, so the crops scale with them")
            d = dataclasses.replace(d, image_size=crop)
    if t.fit_to_data:
        iterations = t.iterations if t.epochs is None else max(1, round(t.epochs * (n_train // batch)))
        bounded = max(1, iterations // 10)
        for key in ("log_every", "eval_every", "checkpoint_every"):
            value = getattr(t, key)
            if value > iterations:
                notices.append(f"train.{key} {value} -> {bounded}: a tenth of the run's {iterations:,} iterations")
                t = dataclasses.replace(t, **{key: bounded})
    if notices:
        config = dataclasses.replace(config, data=d, train=t, optim=o, schedule=s)
    if t.fit_to_data and image is not None:
        notices += _small_images(config.model, d.image_size or min(image))
    return config, notices
