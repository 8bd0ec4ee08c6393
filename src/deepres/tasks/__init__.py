"""Tasks turn model outputs and targets into a loss; the loop knows nothing of losses (see :mod:`.base`).

- ``classification``: cross-entropy (hard or mixed labels, label smoothing, auxiliary heads);
- ``distillation``: Hinton et al. 2015, a teacher checkpoint's softened outputs (:mod:`.distillation`);
- ``pseudo_label``: a teacher labels the unlabeled set and the model trains on both (:mod:`.pseudo_label`).

Tasks are losses only: a task that needs a teacher is given one (the loop loads ``task.teacher``). Transfer learning
and the Noisy Student noise act on the model (:mod:`deepres.models.transfer`, :mod:`deepres.models.noise`); Noisy
Student's iterations are an experiment (:mod:`deepres.experiments.noisy_student`).
"""

from .base import Task
from .classification import ClassificationTask, main_logits
from .distillation import DistillationTask, kd_loss
from .pseudo_label import PseudoLabelTask, label_unlabeled, select_pseudo_labels

__all__ = [
    "ClassificationTask",
    "DistillationTask",
    "PseudoLabelTask",
    "Task",
    "build_task",
    "kd_loss",
    "label_unlabeled",
    "main_logits",
    "select_pseudo_labels",
]


def build_task(cfg) -> Task:
    """The task of a TaskConfig."""
    if cfg.name == "classification":
        return ClassificationTask(label_smoothing=cfg.label_smoothing)
    if cfg.name == "distillation":
        return DistillationTask(cfg.temperature, cfg.alpha, cfg.label_smoothing, cfg.teacher)
    if cfg.name == "pseudo_label":
        return PseudoLabelTask(cfg.pseudo_labels, cfg.threshold, cfg.label_smoothing, cfg.teacher)
    raise ValueError(f"task.name={cfg.name!r} is unknown")
