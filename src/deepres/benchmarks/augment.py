"""Per-image augmentation of a training batch: ours (batched on the device: every image draws its own operations,
and each operation runs once on the images that drew it) against the same policy as torchvision ``transforms.v2``
applied image by image, the way a per-sample pipeline runs it, on the same uint8 batch of CIFAR-10 JPEG images,
same machine, same run. The headline is ``data.augment``'s random subset (against ``RandomApply`` of
``RandomAffine``, ``RandomRotation``, ``RandomPerspective``, ``ColorJitter`` and Gaussian noise); RandAugment (N=2,
M=9) and TrivialAugment Wide are measured beside it against ``v2.RandAugment`` and ``v2.TrivialAugmentWide``.

    deepres benchmark augment                    # writes benchmarks/results/augment-<device>.json
    deepres benchmark augment --smoke --out DIR  # tiny run (CI)
"""

from __future__ import annotations

import argparse
import itertools

import torch

from ..config import DataConfig, augment_ops
from ..data import load_dataset, step_generator
from ..data.policies import RandAugmentBatch, RandomSubset, TrivialAugmentBatch
from .common import default_cifar_data, gpu_or_cpu, time_steps, write_result

OPS = ["shear", "rotate", "perspective", "brightness", "color_jitter", "noise"]


class _NoiseV2:
    """Gaussian noise on a uint8 image, as a per-image transform (torchvision's takes float images only)."""

    def __init__(self, std: float):
        self.std = std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        noisy = image.float() + torch.randn(image.shape, device=image.device) * (255 * self.std)
        return noisy.round_().clamp_(0, 255).to(torch.uint8)


def torchvision_policy(p: float):
    """The six default operations as torchvision v2 transforms, each applied with probability ``p``."""
    from torchvision.transforms import v2

    bilinear = v2.InterpolationMode.BILINEAR
    s = dict(augment_ops(OPS))
    transforms = [
        v2.RandomAffine(0.0, shear=(-s["shear"], s["shear"], -s["shear"], s["shear"]), interpolation=bilinear),
        v2.RandomRotation(s["rotate"], interpolation=bilinear),
        v2.RandomPerspective(s["perspective"], p=1.0, interpolation=bilinear),
        v2.ColorJitter(brightness=s["brightness"]),
        v2.ColorJitter(*(s["color_jitter"],) * 3, hue=s["color_jitter"] / 4),
        _NoiseV2(s["noise"]),
    ]
    return v2.Compose([v2.RandomApply([t], p=p) for t in transforms])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepres benchmark augment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="image folder or .tar.gz (default: the CIFAR-10 JPEG set); "
                        "--smoke uses random images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--p", type=float, default=0.5, help="probability of each operation (default 0.5)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches of each (default 20; smoke 2)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run for CI (random images, few batches)")
    parser.add_argument("--out", default=None, help="result folder (default benchmarks/results/)")
    args = parser.parse_args(argv)

    device = gpu_or_cpu(args.smoke)
    batches = args.batches or (2 if args.smoke else 20)
    if args.smoke:
        images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)
    else:
        data = args.data or default_cifar_data()
        images = load_dataset(DataConfig(source="imagefolder", data_dir=data, val_size=0)).train.images
        images = images[: args.batch_size]
    images = images.to(device)
    warmup = 1 if args.smoke else 5

    def rates(ours, theirs) -> tuple[float, float]:
        """Images/s of each over the same steps (the first ``warmup`` untimed: first uses of each kernel)."""
        steps_ours, steps_theirs = itertools.count(), itertools.count()

        def run_ours() -> None:
            ours(images, step_generator(0, 1, next(steps_ours)))

        def run_theirs() -> None:
            torch.manual_seed(next(steps_theirs))
            torch.stack([theirs(image) for image in images])

        return tuple(len(images) / time_steps(run, device, warmup, batches) for run in (run_ours, run_theirs))

    from torchvision.transforms import v2

    ours_rate, reference = rates(RandomSubset(augment_ops(OPS), args.p), torchvision_policy(args.p))
    others = {}
    for name, ours, theirs in (("randaugment", RandAugmentBatch(2, 9), v2.RandAugment(2, 9)),
                               ("trivialaugment", TrivialAugmentBatch(), v2.TrivialAugmentWide())):
        a, b = rates(ours, theirs)
        others[name] = {"ours": a, "reference": b, "ratio": a / b}
    metric = (f"augmented images/s: {', '.join(OPS)} at their default strengths, each with probability {args.p}, "
              f"on a uint8 batch of {len(images)} {'random' if args.smoke else 'CIFAR-10 JPEG'} 32x32 images on the "
              f"device; reference: the same operations as torchvision v2 transforms image by image "
              f"(torch.get_num_threads() = {torch.get_num_threads()}); randaugment (N=2, M=9) and trivialaugment: "
              f"the same measurement against v2.RandAugment and v2.TrivialAugmentWide")
    path = write_result("augment", device, metric, ours_rate, reference, None, out=args.out, **others)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
