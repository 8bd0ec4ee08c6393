"""Training engine: the loop, optimizer and schedules, checkpoints, distribution, logs."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import NonFiniteLossError, TrainingInterrupted, build_model, load_for_inference, train
from .optim import Schedule, build_optimizer, param_groups

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "Schedule",
    "TrainingInterrupted",
    "build_model",
    "build_optimizer",
    "load_checkpoint",
    "load_for_inference",
    "param_groups",
    "save_checkpoint",
    "train",
]
