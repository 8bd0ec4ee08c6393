"""Semi-supervised pseudo-labeling (PAPER.md section 7): a teacher trained on the labeled images labels the
unlabeled ones; the images it is confident about join the labeled set and the model trains on both.

The labeled/unlabeled division is ``data.labeled_per_class``: the first N training images of each class (after the
validation split) keep their labels, the others form the unlabeled set (their true labels are kept aside, used only
to report how accurate the pseudo-labels are). ``task.pseudo_labels``: ``hard`` takes the teacher's top class, ``soft``
its softmax (Noisy Student's choice, Xie et al. 2020); ``task.threshold`` keeps an image only when the teacher's top
probability reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .classification import ClassificationTask
from .teacher import teacher_logits

__all__ = ["PseudoLabelTask", "PseudoLabels", "label_unlabeled", "select_pseudo_labels"]


@dataclass
class PseudoLabels:
    """The teacher's verdict on an unlabeled set: which images are kept and their targets."""

    indices: torch.Tensor  # int64 (M,): kept images, positions in the unlabeled set
    targets: torch.Tensor  # int64 (M,) hard labels or float (M, K) soft labels
    confidence: torch.Tensor  # float (N,): the teacher's top probability for every unlabeled image
    predicted: torch.Tensor  # int64 (N,): its top class for every unlabeled image

    def stats(self, true_labels: torch.Tensor | None = None) -> dict:
        """Kept count, coverage (% of the unlabeled set) and, given the hidden labels, accuracy of kept labels (%)."""
        n = len(self.confidence)
        out = {"pseudo_labels_kept": len(self.indices), "pseudo_label_coverage": 100.0 * len(self.indices) / max(n, 1)}
        if true_labels is not None and len(self.indices):
            hits = self.predicted[self.indices].cpu() == true_labels[self.indices.cpu()]
            out["pseudo_label_accuracy"] = 100.0 * hits.double().mean().item()
        return out


def select_pseudo_labels(logits: torch.Tensor, threshold: float = 0.0, mode: str = "hard") -> PseudoLabels:
    """Keep the rows whose top softmax probability is >= ``threshold``; hard (top class) or soft (softmax) targets."""
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError("task.threshold", f"must be in [0, 1]; got {threshold}")
    if mode not in ("hard", "soft"):
        raise ConfigError("task.pseudo_labels", f"must be hard or soft; got {mode!r}")
    probs = F.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(dim=1)
    indices = (confidence >= threshold).nonzero().flatten()
    targets = predicted[indices] if mode == "hard" else probs[indices]
    return PseudoLabels(indices, targets, confidence, predicted)


def label_unlabeled(teacher, dataset, device, threshold: float = 0.0, mode: str = "hard") -> PseudoLabels:
    """Run ``teacher`` (model, normalizer) over ``dataset.extra["unlabeled"]`` (see
    :func:`deepres.data.subsets.split_labeled`)."""
    unlabeled = dataset.extra.get("unlabeled")
    if unlabeled is None or len(unlabeled) == 0:
        raise ConfigError("data.labeled_per_class", "pseudo-labeling needs an unlabeled set: set "
                                                    "data.labeled_per_class (the rest of each class is unlabeled)")
    teacher, normalizer = teacher
    return select_pseudo_labels(teacher_logits(teacher, normalizer, unlabeled.images, device), threshold, mode)


class PseudoLabelTask(ClassificationTask):
    """Cross-entropy over the labeled images plus the kept pseudo-labeled ones (soft targets: soft cross-entropy)."""

    needs_teacher = True

    def __init__(self, mode: str = "hard", threshold: float = 0.0, label_smoothing: float = 0.0,
                 teacher_name: str | None = None):
        super().__init__(label_smoothing)
        self.teacher_name, self.mode, self.threshold = teacher_name, mode, threshold
        self.table = None  # soft mode: the loader yields indices into this (N, K) table of targets
        self.stats: dict = {}

    def prepare(self, model, data, config, device, teacher=None) -> None:
        from ..data import Split, train_loader_over

        if teacher is None:
            raise ValueError("pseudo-labeling needs a teacher: (model, normalizer)")
        dataset = data.dataset
        labels = label_unlabeled(teacher, dataset, device, self.threshold, self.mode)
        unlabeled = dataset.extra["unlabeled"]
        self.stats = labels.stats(unlabeled.labels)
        chosen = labels.indices.cpu()
        images = torch.cat([dataset.train.images, unlabeled.images[chosen]])
        if self.mode == "hard":
            hard = Split(images, torch.cat([dataset.train.labels, labels.targets.cpu()]))
            data.train = train_loader_over(hard, data, config.data)
            return
        own = F.one_hot(dataset.train.labels, dataset.num_classes).float()
        self.table = torch.cat([own, labels.targets.cpu().float()]).to(device)
        data.train = train_loader_over(Split(images, torch.arange(len(images))), data, config.data)

    def targets(self, images: torch.Tensor, targets):
        return targets if self.table is None else self.table[targets]

    def summary(self) -> dict:
        return {"teacher": self.teacher_name, "pseudo_labels": self.mode, "threshold": self.threshold,
                **self.stats}

    def training_images(self) -> str:
        kept = self.stats.get("pseudo_labels_kept")
        return "" if kept is None else f" + {kept:,} pseudo-labeled"
