"""Decode + the paper's ImageNet training augmentation, images/s, on a folder of ImageNet-sized JPEGs the benchmark
writes itself (default 2,048 images of 500x375, photo-like: smooth random fields plus grain, quality 90).

Ours (GPU): the files' bytes read on the host, decoded in batches on the GPU (``torchvision.io.decode_jpeg`` with
``device="cuda"``, nvJPEG), then the paper's augmentation (section 3.4: shorter side random in [256, 480], random
224 crop, horizontal flip, PCA lighting, mean/std normalisation) for the whole batch at once: every image's scale
and crop become one box in the original image, and ``torchvision.ops.roi_align`` resamples all boxes to 224x224
in one kernel (bilinear, 2x2 samples per output pixel; on the CPU each box is resized on its own). Reference: the
CPU worker pipeline (a ``DataLoader`` with one worker per core, each decoding with PIL and augmenting with torchvision
transforms), batches moved to the GPU.
On the CPU (``--smoke``), ours decodes with ``torchvision.io.decode_jpeg`` on the CPU in the main process.

The GPU result is compared with the ResNet-50 training rate of ``imagenet-throughput`` (when its result file for the
same device exists; else with that benchmark's target, 4,500 images/s): the pipeline must feed it.

    deepres benchmark jpeg-pipeline                     # GPU: writes jpeg-pipeline-<device>.json
    deepres benchmark jpeg-pipeline --images 4096 --folder /tmp/jpegs --batch-size 256
    deepres benchmark jpeg-pipeline --smoke --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.loaders import single_thread_on_cpu
from ..data.presets import IMAGENET_EIGVAL, IMAGENET_EIGVEC
from .common import RESULTS, device_name, gpu_or_cpu, sync, write_result
from .imagenet_throughput import RESNET50_IMAGES_PER_S

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def write_jpegs(folder: Path, count: int, width: int = 500, height: int = 375, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs (reused when the folder already holds them)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}.jpg" for i in range(count)]
    rng = np.random.default_rng(seed)
    for path in paths:
        if path.exists():
            continue
        coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return paths


def paper_boxes(sizes: torch.Tensor, generator: torch.Generator, crop: int = 224, lo: int = 256, hi: int = 480):
    """(N, 4) boxes x1, y1, x2, y2 in original pixels: the 224 crop of the image resized to shorter side
    S ~ U[lo, hi]."""
    n = sizes.shape[0]
    h, w = sizes[:, 0].double(), sizes[:, 1].double()
    short = torch.minimum(h, w)
    target = torch.randint(lo, hi + 1, (n,), generator=generator).double()
    factor = target / short
    rh, rw = (h * factor).floor(), (w * factor).floor()
    oy = (torch.rand(n, generator=generator, dtype=torch.float64) * (rh - crop + 1)).floor()
    ox = (torch.rand(n, generator=generator, dtype=torch.float64) * (rw - crop + 1)).floor()
    return torch.stack([ox / factor, oy / factor, (ox + crop) / factor, (oy + crop) / factor], dim=1)


def augment_batch(images: list[torch.Tensor], generator: torch.Generator, crop: int = 224) -> torch.Tensor:
    """Decoded uint8 (3, H, W) images -> normalised float (N, 3, crop, crop): scale, crop, flip, lighting in batch."""
    from torchvision.ops import roi_align

    device = images[0].device
    n = len(images)
    sizes = torch.tensor([img.shape[-2:] for img in images])
    hmax, wmax = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    if all(img.shape == images[0].shape for img in images):
        batch = torch.stack(images)
    else:  # different sizes: one padded batch; every box lies inside its own image
        batch = torch.zeros((n, 3, hmax, wmax), dtype=torch.uint8, device=device)
        for i, img in enumerate(images):
            batch[i, :, : img.shape[-2], : img.shape[-1]] = img
    boxes = paper_boxes(sizes, generator, crop)
    if device.type == "cuda":
        rois = torch.cat([torch.arange(n, dtype=torch.float64)[:, None], boxes], dim=1).float().to(device)
        x = roi_align(batch.float(), rois, output_size=crop, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    else:  # roi_align is slow on the CPU: resize each box (rounded to whole pixels) on its own
        x = torch.stack([
            F.interpolate(batch[i:i + 1, :, int(y1):int(math.ceil(y2)), int(x1):int(math.ceil(x2))],
                          size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)[0].float()
            for i, (x1, y1, x2, y2) in enumerate(boxes.tolist())])
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x).div_(255.0)
    alpha = torch.randn(n, 3, generator=generator) * 0.1  # AlexNet PCA lighting
    shift = ((alpha * IMAGENET_EIGVAL) @ IMAGENET_EIGVEC.T).to(device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return x.add_(shift[:, :, None, None]).sub_(mean).div_(std)


def measure_ours(paths: list[Path], device: torch.device, batch_size: int, batches: int) -> float:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    generator = torch.Generator().manual_seed(0)

    def one(b: int):
        chunk = [paths[(b * batch_size + i) % len(paths)] for i in range(batch_size)]
        data = [read_file(str(p)) for p in chunk]
        with single_thread_on_cpu(device):  # small ops: a busy 2-core thread pool only adds waiting
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            return augment_batch(images, generator)

    one(0)  # nvJPEG handles and kernels: not timed
    sync(device)
    start = time.perf_counter()
    for b in range(1, batches + 1):
        out = one(b)
    sync(device)
    assert out.shape == (batch_size, 3, 224, 224)
    return batches * batch_size / (time.perf_counter() - start)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


class _Lighting:
    """Per-image PCA lighting on a float tensor (the reference does everything per image)."""

    def __call__(self, x):
        alpha = torch.randn(3) * 0.1
        return x + ((alpha * IMAGENET_EIGVAL) @ IMAGENET_EIGVEC.T)[:, None, None]


def measure_reference(paths: list[Path], device: torch.device, batch_size: int, batches: int, workers: int) -> float:
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResize(256, 481, antialias=True), v2.RandomCrop(224), v2.RandomHorizontalFlip(),
                            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), _Lighting(),
                            v2.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(_Files(paths, transform), batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)

    def batches_forever():
        while True:
            yield from loader

    it = batches_forever()
    next(it)[0].to(device)  # worker start-up: not timed
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        x = next(it).to(device, non_blocking=True)
    sync(device)
    assert x.shape == (batch_size, 3, 224, 224)
    return batches * batch_size / (time.perf_counter() - start)


def resnet50_rate(device: torch.device, folder: Path | None = None) -> float | None:
    """ResNet-50's training rate from imagenet-throughput's result file (in ``folder``, else benchmarks/results)."""
    for root in ([Path(folder)] if folder else []) + [RESULTS]:
        path = root / f"imagenet-throughput-resnet50-{device_name(device)}.json"
        if path.exists():
            return json.loads(path.read_text())["ours"]
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deepres benchmark jpeg-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="JPEGs to write (default 2048; smoke 8)")
    parser.add_argument("--folder", default=None, help="where the JPEGs are written and reused (default: temporary)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (smoke 4)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches of ours (default 40; smoke 2)")
    parser.add_argument("--reference-batches", type=int, default=None, help="default 20 (smoke 2)")
    parser.add_argument("--workers", type=int, default=None, help="reference workers (default: every core; smoke 1)")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run (CI)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = gpu_or_cpu(args.smoke)
    count = args.images or (8 if args.smoke else 2048)
    batch_size = args.batch_size or (4 if args.smoke else 256)
    batches = args.batches or (2 if args.smoke else 40)
    ref_batches = args.reference_batches or (2 if args.smoke else 20)
    workers = args.workers if args.workers is not None else (1 if args.smoke else os.cpu_count() or 1)
    tmp = tempfile.TemporaryDirectory(prefix="deepres-jpeg-") if args.folder is None else None
    folder = Path(args.folder) if args.folder else Path(tmp.name)
    paths = write_jpegs(folder, count)
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024

    ours = measure_ours(paths, device, batch_size, batches)
    reference = measure_reference(paths, device, batch_size, ref_batches, workers)
    rate = resnet50_rate(device, args.out) if device.type == "cuda" else None
    feed = rate if rate is not None else RESNET50_IMAGES_PER_S
    gpu = device.type == "cuda"
    metric = (f"training images/s, decode + paper ImageNet augmentation (shorter side in [256, 480], 224 crop, flip, "
              f"PCA lighting, normalisation), batch {batch_size}, {count} JPEGs of 500x375 (mean {mean_kb:.0f} KB), "
              f"batch on the device; ours: {'nvJPEG batched decode on the GPU' if gpu else 'torchvision.io decode'} "
              f"+ batched roi_align augmentation; reference: DataLoader with {workers} PIL workers")
    write_result("jpeg-pipeline", device, metric, ours, reference, out=args.out,
                 target={"images_per_s_min": feed, "source": "imagenet-throughput resnet50 result" if rate else
                         "the issue's ResNet-50 target"},
                 meets_target=gpu and ours >= feed, feeds_resnet50=gpu and ours >= feed, resnet50_images_per_s=rate,
                 images=count, mean_file_kb=mean_kb, batch_size=batch_size, workers=workers,
                 peak_memory_mib_ours=torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
