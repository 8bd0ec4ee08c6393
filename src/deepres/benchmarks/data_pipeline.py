"""Training-batch throughput of the data pipeline: ours (the device-resident loader: the decoded split held on the
device as uint8, paper CIFAR augmentation and normalisation as batched tensor ops) against the usual torchvision
pipeline (``ImageFolder`` + PIL transforms ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
``Normalize`` in a ``DataLoader`` with 2 workers), batch 128, on the CIFAR-10 JPEG set, same machine, same run.

Only batch production is timed: ours after the images are decoded (a prepared file, cached after the first run);
the reference after its workers have delivered their first batch. Both end with the batch on the device.

    deepres benchmark data                       # writes benchmarks/results/data_pipeline-<cpu|cuda>.json
    deepres benchmark data --smoke --data DIR --out results/   # tiny run (CI)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from ..config import DataConfig
from ..data import DeviceLoader, Normalizer, load_dataset
from ..data.folders import resolve_image_source
from .common import RESULTS, default_cifar_data, device_name, sync

TARGET = 10.0


def measure_ours(dataset, device: torch.device, batch_size: int, batches: int, warmup: int) -> float:
    normalizer = Normalizer.fit(dataset.train.images, "pixel_mean")
    loader = DeviceLoader(dataset.train, batch_size, normalizer=normalizer, device=device, seed=0, crop_flip=True,
                          gather="epoch")
    for step in range(warmup):
        loader.batch(step)
    sync(device)
    start = time.perf_counter()
    for step in range(warmup, warmup + batches):
        x, y = loader.batch(step)
    sync(device)
    return batches * batch_size / (time.perf_counter() - start)


def measure_reference(root: Path, device: torch.device, batch_size: int, batches: int, workers: int) -> float:
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ])
    train = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=device.type == "cuda", persistent_workers=True)
    it = itertools.chain.from_iterable(itertools.repeat(loader))  # epochs back to back
    x, y = next(it)  # worker start-up: not timed
    x.to(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    sync(device)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepres benchmark data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--data", default=None, help="image folder root/{train,test}/<class>/ or .tar.gz (default: "
                        "the CIFAR-10 JPEG set in $DEEPRES_DATA, ../shared/data or ./data)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=None, help="timed batches of ours (default 400; smoke 5)")
    parser.add_argument("--reference-batches", type=int, default=None, help="timed batches of the reference "
                        "(default 60; smoke 2)")
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--cache-dir", default=None, help="where the archive is extracted and decoded images cached")
    parser.add_argument("--smoke", action="store_true", help="a tiny run for CI (few batches, small data allowed)")
    parser.add_argument("--out", default=None, help="result folder, or a .json path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    args.data = args.data or default_cifar_data()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    batches = args.batches or (5 if args.smoke else 400)
    ref_batches = args.reference_batches or (2 if args.smoke else 60)
    cfg = DataConfig(source="imagefolder", data_dir=args.data, val_size=0, cache_dir=args.cache_dir,
                     num_workers=os.cpu_count() or 1)
    root = resolve_image_source(args.data, args.cache_dir)
    dataset = load_dataset(cfg)  # decoded once, then read from the cache: not timed
    batch_size = min(args.batch_size, len(dataset.train))  # a smoke folder may hold fewer images than a batch
    ours = measure_ours(dataset, device, batch_size, batches, warmup=2 if args.smoke else 20)
    reference = measure_reference(root, device, batch_size, ref_batches, args.workers)
    result = {
        "benchmark": "data_pipeline",
        "device": device_name(device),
        "torch": torch.__version__,
        "metric": (f"training images/s, batch {batch_size}, CIFAR-10 JPEG train split, paper CIFAR augmentation "
                   f"(pad 4, random 32 crop, flip) + normalisation, batch on the device; reference: torchvision "
                   f"ImageFolder + PIL transforms, DataLoader with {args.workers} workers"),
        "ours": ours,
        "reference": reference,
        "ratio": ours / reference,
        "target": TARGET,
    }
    out = Path(args.out) if args.out else RESULTS
    path = out if out.suffix == ".json" else out / f"data_pipeline-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
