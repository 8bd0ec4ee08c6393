"""Training engine: the one loop, its steps (eager, compiled, CUDA graph), optimizer and schedules, logs, and
concurrent runs. Checkpoint I/O and run folders live in :mod:`deepres.runs` (re-exported here)."""

from ..runs import CheckpointError, build_model, load_checkpoint, load_for_inference, save_checkpoint
from .loop import NonFiniteLossError, TrainingInterrupted, train
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
