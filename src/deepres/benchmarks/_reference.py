"""The reference CIFAR trainer of the speed benchmarks: the way common reproductions train.

torchvision ``ImageFolder`` with PIL transforms (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``,
``Normalize``) in a ``DataLoader`` with worker processes, the net in eager fp32 (NCHW), ``torch.optim.SGD`` with its
default implementation, one step at a time with the loss read back every step (as a progress bar does). Same
architecture as ours (deepres' section 4.2 nets; torchvision has no CIFAR ResNet), same recipe: batch 128, lr 0.1,
momentum 0.9, weight decay 1e-4, lr / 10 at 32k and 48k, 64k iterations; ResNet-110 holds lr 0.01 for its first
400 iterations (the paper's "about 400").
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import validation_indices
from ..models import create_model

CHANNEL_MEAN = (0.4914, 0.4822, 0.4465)
CHANNEL_STD = (0.2470, 0.2435, 0.2616)


def reference_lr(step: int, model: str, milestones=(32000, 48000), base: float = 0.1) -> float:
    if model.endswith("110") and step < 400:
        return 0.01
    return base * 0.1 ** sum(step >= m for m in milestones)


def loaders(root: Path, batch_size: int, workers: int, val_size: int, device: torch.device):
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(CHANNEL_MEAN, CHANNEL_STD)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    train_idx, _ = validation_indices(len(train), val_size)
    train = torch.utils.data.Subset(train, train_idx.tolist())
    test = datasets.ImageFolder(str(root / "test"), transform=test_tf)
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    batch_size = min(batch_size, len(train))
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, **common)
    test_loader = torch.utils.data.DataLoader(test, batch_size=500, shuffle=False, **common)
    return train_loader, test_loader, len(train_loader.dataset.dataset.classes)


@torch.no_grad()
def test_error(model, loader, device) -> float:
    model.eval()
    wrong = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        wrong += int((model(x).argmax(1) != y).sum())
        total += len(y)
    model.train()
    return 100.0 * wrong / total


def train_reference(model_name: str, root: Path, device: torch.device, *, iterations: int, timed_steps: int | None,
                    batch_size: int = 128, workers: int = 4, val_size: int = 5000, seed: int = 0) -> dict:
    """Train the reference. ``timed_steps`` None: the whole schedule (and its test error); a number: only that many
    steps are run and timed, and the schedule's time is extrapolated as start-up + steps x time per step."""
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    train_loader, test_loader, num_classes = loaders(root, batch_size, workers, val_size, device)
    model = create_model(model_name, num_classes=num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))  # epochs back to back
    run_steps = iterations if timed_steps is None else min(timed_steps, iterations)
    model.train()
    startup = None
    t_first = None
    for step in range(run_steps):
        x, y = next(batches)
        if startup is None:  # the workers' start-up and first batch
            startup = time.perf_counter() - t_start
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(step, model_name)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the per-step read-back of a progress bar
        if step == 0:
            t_first = time.perf_counter()  # the first step (cuDNN autotuning, lazy init) is start-up too
    end = time.perf_counter()
    per_step = (end - t_first) / max(run_steps - 1, 1)
    startup_total = t_first - t_start
    result = {"measured_steps": run_steps, "startup_seconds": startup_total, "seconds_per_step": per_step,
              "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    if timed_steps is None:
        result["seconds"] = end - t_start
        result["extrapolated"] = False
        result["test_top1_error"] = test_error(model, test_loader, device)
    else:
        result["seconds"] = startup_total + per_step * (iterations - 1)
        result["extrapolated"] = run_steps < iterations
        result["test_top1_error"] = None
    return result
