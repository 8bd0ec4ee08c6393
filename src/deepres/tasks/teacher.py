"""A trained model used as a teacher: loaded from one of our checkpoints, in eval mode, without gradients.

Shared by distillation and pseudo-labeling: loading and checking the teacher, its logits over a whole uint8 split,
re-normalising the student's batches for it, and training loaders over images a task assembles.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config import ConfigError
from .classification import main_logits

__all__ = ["Renormalize", "check_teacher", "is_augmented", "load_teacher", "teacher_logits", "train_loader"]


def check_teacher(path: str | Path | None, key: str = "task.teacher") -> None:
    """A ConfigError unless ``path`` names an existing file (checked before any data is read)."""
    if not path:
        raise ConfigError(key, "this task needs a teacher checkpoint, e.g. "
                               "--set task.teacher=runs/teacher/checkpoints/last.pt")
    if not Path(path).is_file():
        raise ConfigError(key, f"teacher checkpoint not found: {path}")


def load_teacher(path: str | Path | None, classes: list[str], device: torch.device, key: str = "task.teacher"):
    """(model, normalizer) of a checkpoint: eval mode, parameters frozen, on ``device``; its classes must be ours."""
    from ..engine.checkpoint import load_checkpoint
    from ..engine.loop import load_for_inference

    check_teacher(path, key)
    ckpt = load_checkpoint(path)
    if list(ckpt["classes"]) != list(classes):
        raise ConfigError(key, f"the teacher {path} was trained on classes {ckpt['classes'][:5]}..., the data has "
                               f"{classes[:5]}...")
    model, normalizer, _ = load_for_inference(ckpt, device)
    model.requires_grad_(False)
    return model.eval(), normalizer


@torch.no_grad()
def teacher_logits(teacher: nn.Module, normalizer, images: torch.Tensor, device: torch.device,
                   batch_size: int = 500) -> torch.Tensor:
    """float32 logits (N, K) of uint8 images (N, C, H, W), in order, on ``device``."""
    teacher.eval()
    out = []
    for lo in range(0, len(images), batch_size):
        batch = normalizer(images[lo : lo + batch_size].to(device))
        out.append(main_logits(teacher(batch)).float())
    if not out:
        raise ValueError("no images to run the teacher on")
    return torch.cat(out)


class Renormalize:
    """Student-normalised images -> the teacher's normalisation (the identity when both are the same)."""

    def __init__(self, student, teacher):
        self.student, self.teacher = student, teacher
        self.identity = (student.mean.shape == teacher.mean.shape and torch.equal(student.mean, teacher.mean)
                         and torch.equal(student.std, teacher.std))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        x01 = x * self.student.std.to(x.device) + self.student.mean.to(x.device)
        return self.teacher.normalize01(x01.float())


def is_augmented(loader) -> bool:
    """Whether a training loader's batches vary with the step beyond their order (augmentation or mixing)."""
    from ..data import DeviceLoader

    return not isinstance(loader, DeviceLoader) or loader.augment is not None or loader.mix is not None


def train_loader(split, data, config, augment: bool = True):
    """A device-resident training loader over ``split`` with the run's batch, seed, normalisation, device and DDP
    slice; with the config's augmentation and batch mixing unless ``augment`` is False."""
    from ..data import DeviceLoader, train_augmentation, train_mix

    old = data.train
    if not isinstance(old, DeviceLoader):
        raise ConfigError("data.loader", f"task.name={config.task.name} needs the device-resident loader; "
                                         "set data.loader=device")
    return DeviceLoader(
        split,
        old.batch_size,
        normalizer=data.normalizer,
        device=old.device,
        seed=old.seed,
        augment=train_augmentation(config.data) if augment else None,
        mix=train_mix(config.data, data.dataset.num_classes) if augment else None,
        rank=old.rank,
        world_size=old.world_size,
    )
