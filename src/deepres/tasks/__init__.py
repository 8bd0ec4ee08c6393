"""Tasks turn model outputs and targets into a loss; the loop knows nothing of losses (see :mod:`.base`).

- ``classification``: cross-entropy (hard or mixed labels, label smoothing, auxiliary heads);
- ``distillation``: Hinton et al. 2015, a teacher checkpoint's softened outputs (:mod:`.distillation`);
- ``pseudo_label``: a teacher labels the unlabeled set and the model trains on both (:mod:`.pseudo_label`);
  Noisy Student repeats it with a noised student (:mod:`.noisy_student`).

Transfer learning (:mod:`.transfer`) and the Noisy Student noise (:mod:`.noise`) act on the model and live here too.
"""

from .base import Task
from .classification import ClassificationTask, main_logits
from .distillation import DistillationTask, kd_loss
from .pseudo_label import PseudoLabelTask, select_pseudo_labels, split_labeled

__all__ = [
    "ClassificationTask",
    "DistillationTask",
    "PseudoLabelTask",
    "Task",
    "build_task",
    "kd_loss",
    "main_logits",
    "select_pseudo_labels",
    "split_labeled",
]


def build_task(cfg) -> Task:
    """The task of a TaskConfig."""
    if cfg.name == "classification":
        return ClassificationTask(label_smoothing=cfg.label_smoothing)
    if cfg.name == "distillation":
        return DistillationTask(cfg.teacher, cfg.temperature, cfg.alpha, cfg.label_smoothing)
    if cfg.name == "pseudo_label":
        return PseudoLabelTask(cfg.teacher, cfg.pseudo_labels, cfg.threshold, cfg.label_smoothing)
    raise ValueError(f"task.name={cfg.name!r} is unknown")
