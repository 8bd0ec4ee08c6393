"""Semi-supervised pseudo-labeling (PAPER.md section 7): a teacher trained on the labeled images labels the
unlabeled ones; the images it is confident about join the labeled set and the model trains on both.

The labeled/unlabeled division is ``data.labeled_per_class``: the first N training images of each class (after the
validation split) keep their labels, the others form the unlabeled set (their true labels are kept aside, used only
to report how accurate the pseudo-labels are). ``task.pseudo_labels``: ``hard`` takes the teacher's top class, ``soft``
its softmax (Noisy Student's choice, Xie et al. 2020); ``task.threshold`` keeps an image only when the teacher's top
probability reaches it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .classification import ClassificationTask
from .teacher import check_teacher, load_teacher, teacher_logits, train_loader

__all__ = ["PseudoLabelTask", "PseudoLabels", "first_per_class", "label_unlabeled", "select_pseudo_labels",
           "split_labeled"]

# The unlabeled sample (data.unlabeled_subset) is a function of the dataset alone, never of the run's seed.
UNLABELED_SEED = 20200101


def split_labeled(dataset, per_class: int, unlabeled_subset: int | None = None):
    """A copy of ``dataset`` whose train split holds the first ``per_class`` images of each class, in their original
    order; the others go to ``extra["unlabeled"]`` (all, or a fixed sample of ``unlabeled_subset``)."""
    from ..data import Split

    train = dataset.train
    labeled, rest = first_per_class(train, per_class, dataset.num_classes, "data.labeled_per_class")
    if unlabeled_subset is not None:
        if unlabeled_subset < 0:
            raise ConfigError("data.unlabeled_subset", f"must be >= 0; got {unlabeled_subset}")
        order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(UNLABELED_SEED))
        rest = rest[order[:unlabeled_subset].sort().values]
    extra = dict(dataset.extra, unlabeled=Split(train.images[rest], train.labels[rest]))
    return dataclasses.replace(dataset, train=labeled, extra=extra)


def first_per_class(split, per_class: int, num_classes: int, key: str):
    """The first ``per_class`` images of each class, in their original order."""
    from ..data import Split

    if per_class <= 0:
        raise ConfigError(key, f"must be positive; got {per_class}")
    keep = torch.zeros(len(split), dtype=torch.bool)
    for k in range(num_classes):
        members = (split.labels == k).nonzero().flatten()
        if len(members) < per_class:
            raise ConfigError(key, f"class {k} has only {len(members)} images; asked for {per_class}")
        keep[members[:per_class]] = True
    chosen = keep.nonzero().flatten()
    return Split(split.images[chosen], split.labels[chosen]), (~keep).nonzero().flatten()


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


def label_unlabeled(teacher_path: str, dataset, device, threshold: float = 0.0, mode: str = "hard") -> PseudoLabels:
    """Run a teacher checkpoint over ``dataset.extra["unlabeled"]`` (see :func:`split_labeled`)."""
    unlabeled = dataset.extra.get("unlabeled")
    if unlabeled is None or len(unlabeled) == 0:
        raise ConfigError("data.labeled_per_class", "pseudo-labeling needs an unlabeled set: set "
                                                    "data.labeled_per_class (the rest of each class is unlabeled)")
    teacher, normalizer = load_teacher(teacher_path, dataset.classes, device)
    return select_pseudo_labels(teacher_logits(teacher, normalizer, unlabeled.images, device), threshold, mode)


class PseudoLabelTask(ClassificationTask):
    """Cross-entropy over the labeled images plus the kept pseudo-labeled ones (soft targets: soft cross-entropy)."""

    def __init__(self, teacher: str | None, mode: str = "hard", threshold: float = 0.0, label_smoothing: float = 0.0):
        super().__init__(label_smoothing)
        check_teacher(teacher)
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError("task.threshold", f"must be in [0, 1]; got {threshold}")
        self.teacher_path, self.mode, self.threshold = teacher, mode, threshold
        self.table = None  # soft mode: the loader yields indices into this (N, K) table of targets
        self.stats: dict = {}

    def prepare(self, model, data, config, device) -> None:
        from ..data import Split

        dataset = data.dataset
        labels = label_unlabeled(self.teacher_path, dataset, device, self.threshold, self.mode)
        unlabeled = dataset.extra["unlabeled"]
        self.stats = labels.stats(unlabeled.labels)
        chosen = labels.indices.cpu()
        images = torch.cat([dataset.train.images, unlabeled.images[chosen]])
        if self.mode == "hard":
            data.train = train_loader(Split(images, torch.cat([dataset.train.labels, labels.targets.cpu()])), data,
                                      config)
            return
        if config.data.cutmix_alpha > 0 or config.data.mixup_alpha > 0:
            raise ConfigError("task.pseudo_labels", "soft pseudo-labels cannot be combined with batch mixing "
                                                    "(data.cutmix_alpha / data.mixup_alpha); use hard labels")
        own = F.one_hot(dataset.train.labels, dataset.num_classes).float()
        self.table = torch.cat([own, labels.targets.cpu().float()]).to(device)
        data.train = train_loader(Split(images, torch.arange(len(images))), data, config)

    def targets(self, images: torch.Tensor, targets):
        return targets if self.table is None else self.table[targets]

    def summary(self) -> dict:
        return {"teacher": str(self.teacher_path), "pseudo_labels": self.mode, "threshold": self.threshold,
                **self.stats}
