"""``deepres data ...`` subcommands (registered by deepres.cli).

- ``deepres data info SOURCE [--data-dir DIR] [--val-size N] [--json]``: images per split and per class. ``--val-size``
  defaults to 0 here, so ``train`` shows the official training count; pass ``--val-size 5000`` to see the split a
  run uses (the recipe default). Image folders are counted from their files, without decoding.
- ``deepres data prepare SRC DST [--size N] [--channels 1|3] [--on-bad-image skip] [--workers N]``: decode an image
  folder (or a .tar.gz of one) once into a prepared file, which ``data.source=imagefolder data.data_dir=DST`` loads in
  about a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

SOURCE_NAMES = ("cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder")


def _config(source: str, data_dir: str | None, val_size: int, cache_dir: str | None = None):
    from ..config import DataConfig

    return DataConfig(source=source, data_dir=data_dir, val_size=val_size, cache_dir=cache_dir)


def dataset_summary(source: str, data_dir: str | None = None, val_size: int = 0, cache_dir: str | None = None) -> dict:
    """Per-split and per-class image counts of a source (what ``deepres data info`` prints)."""
    from .datasets import validation_indices

    cfg = _config(source, data_dir, val_size, cache_dir)
    if source == "imagefolder":
        from .folders import _require_data_dir, is_prepared_file, resolve_image_source, scan_image_folder

        path = _require_data_dir(cfg)
        if not is_prepared_file(path):
            index = scan_image_folder(resolve_image_source(path, cache_dir))
            k = len(index.classes)
            labels = {"train": index.splits["train"].labels, "test": index.splits["test"].labels}
            train_idx, val_idx = validation_indices(len(labels["train"]), val_size)
            if val_size > 0:
                labels["val"] = labels["train"][val_idx]
                labels["train"] = labels["train"][train_idx]
            return _summary(source, str(index.root), index.classes, labels, image_size=None)
    from .sources import load_dataset

    dataset = load_dataset(cfg)
    labels = {name: split.labels for name, split in dataset.splits().items()}
    shape = tuple(dataset.train.images.shape[1:])
    return _summary(source, dataset.origin, dataset.classes, labels, image_size=list(shape))


def _summary(source, origin, classes, labels, image_size) -> dict:
    import torch

    order = [n for n in ("train", "val", "test") if n in labels]
    per_class = {n: torch.bincount(labels[n], minlength=len(classes)).tolist() for n in order}
    return {
        "source": source,
        "origin": origin,
        "num_classes": len(classes),
        "image_shape": image_size,
        "splits": {n: int(len(labels[n])) for n in order},
        "classes": [{"name": c, **{n: per_class[n][i] for n in order}} for i, c in enumerate(classes)],
    }


def _print_summary(summary: dict) -> None:
    splits = list(summary["splits"])
    shape = "x".join(str(s) for s in summary["image_shape"]) if summary["image_shape"] else "as stored"
    print(f"{summary['source']}: {summary['num_classes']} classes, images {shape}, from {summary['origin']}")
    width = max([len("class"), len("total")] + [len(c["name"]) for c in summary["classes"]])
    print(f"{'class':<{width}} " + " ".join(f"{s:>8}" for s in splits))
    print("-" * (width + 9 * len(splits)))
    for c in summary["classes"]:
        print(f"{c['name']:<{width}} " + " ".join(f"{c[s]:>8,}" for s in splits))
    print("-" * (width + 9 * len(splits)))
    print(f"{'total':<{width}} " + " ".join(f"{summary['splits'][s]:>8,}" for s in splits))


def cmd_info(args: argparse.Namespace) -> int:
    summary = dataset_summary(args.source, args.data_dir, args.val_size, args.cache_dir)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .folders import prepare_image_folder

    start = time.perf_counter()
    dataset = prepare_image_folder(
        args.src,
        args.dst,
        image_size=args.size,
        channels=args.channels,
        on_bad_image=args.on_bad_image,
        workers=args.workers,
        cache_dir=args.cache_dir,
    )
    seconds = time.perf_counter() - start
    shape = "x".join(str(s) for s in dataset.train.images.shape[1:])
    skipped = len(dataset.extra.get("skipped", []))
    print(
        f"wrote {args.dst}: {len(dataset.train):,} train / {len(dataset.test):,} test images ({shape}), "
        f"{dataset.num_classes} classes, {skipped} skipped, in {seconds:.1f} s"
    )
    print(f"use it with: --set data.source=imagefolder --set data.data_dir={args.dst}")
    return 0


def _guarded(fn):
    """Library errors (bad input, missing files) become one line on stderr and exit status 1."""

    def run(args):
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(args)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            print(f"deepres data: error: {exc}", file=sys.stderr)
            return 1

    return run


def add_data_commands(sub) -> None:
    import os

    p = sub.add_parser("data", help="inspect and prepare datasets", description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: p.print_help() or 0)
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    q = data_sub.add_parser("info", help="images per split and per class of a data source")
    q.add_argument("source", choices=SOURCE_NAMES, help="data source")
    q.add_argument("--data-dir", help="where the data is (imagefolder: the folder, .tar.gz or prepared file)")
    q.add_argument(
        "--val-size", type=int, default=0,
        help="images carved from train for validation (default 0: the official train count; runs use 5000)",
    )
    q.add_argument("--cache-dir", help="cache for extracted archives (default: $DEEPRES_DATA/cache or ~/.cache/deepres)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_guarded(cmd_info))

    q = data_sub.add_parser("prepare", help="decode an image folder once into a file the imagefolder source loads fast")
    q.add_argument("src", help="image folder root/<split>/<class>/<image>, or a .tar.gz of one")
    q.add_argument("dst", help="the prepared file to write (e.g. data/cifar10-jpeg.pt)")
    q.add_argument("--size", type=int, default=None,
                   help="resize: shorter side to SIZE, centre square (default: keep; all images must share a size)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 or 3 (default: 1 when every image is grayscale, else 3)")
    q.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="a bad file is an error (default) or is skipped and logged")
    q.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all cores)")
    q.add_argument("--cache-dir", help="where a .tar.gz source is extracted (default: $DEEPRES_DATA/cache or "
                   "~/.cache/deepres)")
    q.set_defaults(func=_guarded(cmd_prepare))
