"""Tasks turn model outputs and targets into a loss; the loop knows nothing of losses."""

from .classification import ClassificationTask, build_task, main_logits

__all__ = ["ClassificationTask", "build_task", "main_logits"]
