"""Knowledge distillation (Hinton, Vinyals, Dean 2015; PAPER.md section 7).

The student matches the teacher's softmax at temperature T and, with weight 1 - alpha, the labels at T = 1:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

T^2 keeps the soft term's gradients on the scale of the hard term's as T grows (Hinton et al., section 2).
``alpha = 1`` is the labels-free mode: the KL term alone. With ``data.labeled_per_class`` the unlabeled images join
the training set and take the KL term only. The teacher runs in eval mode without gradients; when the training
batches are not augmented, its logits over the training images are computed once and looked up per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .classification import ClassificationTask, main_logits
from .teacher import Renormalize, teacher_logits

__all__ = ["DistillationTask", "kd_loss", "masked_cross_entropy"]

UNLABELED = -1  # the label of an image without one


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the rows that have a label (int64 targets, -1: none) or soft targets (all rows).
    A batch with no labeled row gives 0, not NaN."""
    logits = logits.float()
    if targets.dtype != torch.int64:
        return ClassificationTask(label_smoothing).criterion(logits, targets)
    labeled = targets >= 0
    per_row = F.cross_entropy(logits, targets.clamp_min(0), label_smoothing=label_smoothing, reduction="none")
    return (per_row * labeled).sum() / labeled.sum().clamp_min(1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, alpha: float,
            targets: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, targets), KL averaged over rows."""
    t = float(temperature)
    log_q = F.log_softmax(student.float() / t, dim=1)
    log_p = F.log_softmax(teacher.float() / t, dim=1)
    loss = alpha * t * t * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    if alpha < 1 and targets is not None:
        loss = loss + (1 - alpha) * masked_cross_entropy(student, targets, label_smoothing)
    return loss


class DistillationTask(ClassificationTask):
    """Targets are (labels, teacher logits): labels int64 (-1 for an unlabeled image) or soft (mixed batches)."""

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0,
                 teacher_name: str | None = None):
        super().__init__(label_smoothing)
        self.teacher_name = teacher_name  # for the summary
        self.temperature, self.alpha = temperature, alpha
        self.teacher = self.renormalize = None
        # Cached mode: the loader yields image indices; these tables give each one's label and teacher logits.
        self.cached_labels = self.cached_logits = None
        self.unlabeled = 0  # unlabeled images added to the training split (the KL term only)

    def prepare(self, model, data, config, device, teacher=None) -> None:
        from ..data import Split, train_loader_over

        if teacher is None:
            raise ValueError("distillation needs a teacher: (model, normalizer)")
        self.teacher, normalizer = teacher
        self.renormalize = Renormalize(data.normalizer, normalizer)
        unlabeled = data.dataset.extra.get("unlabeled")
        train = data.dataset.train
        if unlabeled is not None and len(unlabeled):  # (Config.validate refuses mixing here: unlabeled rows)
            self.unlabeled = len(unlabeled)
            train = Split(torch.cat([train.images, unlabeled.images]),
                          torch.cat([train.labels, torch.full((len(unlabeled),), UNLABELED, dtype=torch.int64)]))
            data.train = train_loader_over(train, data, config.data)
        if not getattr(data.train, "augmented", True):
            # Unaugmented batches are the training images themselves: the teacher's logits are computed once.
            self.cached_logits = teacher_logits(self.teacher, normalizer, train.images, device)
            self.cached_labels = train.labels.to(device)
            indices = Split(train.images, torch.arange(len(train)))
            data.train = train_loader_over(indices, data, config.data, augment=False)

    def targets(self, images: torch.Tensor, targets):
        if self.cached_logits is not None:
            return self.cached_labels[targets], self.cached_logits[targets]
        with torch.no_grad():
            logits = main_logits(self.teacher(self.renormalize(images))).float()
        return targets, logits

    def criterion(self, logits: torch.Tensor, targets) -> torch.Tensor:
        labels, teacher = targets
        return kd_loss(logits, teacher, self.temperature, self.alpha, labels, self.label_smoothing)

    def labels(self, targets) -> torch.Tensor:
        """The labels where given, the teacher's top class for unlabeled images."""
        labels, teacher = targets
        hard = labels if labels.dtype == torch.int64 else labels.argmax(dim=1)
        return torch.where(hard >= 0, hard, teacher.argmax(dim=1))

    def summary(self) -> dict:
        return {"teacher": self.teacher_name, "temperature": self.temperature, "alpha": self.alpha,
                "teacher_logits_cached": self.cached_logits is not None}

    def training_images(self) -> str:
        return f" + {self.unlabeled:,} unlabeled" if self.unlabeled else ""
