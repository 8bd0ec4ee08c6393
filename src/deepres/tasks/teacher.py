"""What distillation and pseudo-labeling do with a teacher they are given (the loop loads it from a checkpoint,
:func:`deepres.runs.load_teacher`): its logits over a whole uint8 split, re-normalising the student's batches for
it, and training loaders over the images a task assembles.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .classification import main_logits

__all__ = ["Renormalize", "teacher_logits"]


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
