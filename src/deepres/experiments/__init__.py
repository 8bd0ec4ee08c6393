"""Paper reproductions: ``deepres reproduce NAME``. Each is a list of runs plus the analysis of their logs."""

from . import cifar, imagenet, zoo  # noqa: F401  (importing an experiment module registers its experiments)
from . import efficient  # noqa: F401  (semi-supervised, distillation, transfer, augmentation)
from .base import EXPERIMENTS, Experiment, Options, RunSpec, register_experiment, run_experiment

__all__ = ["EXPERIMENTS", "Experiment", "Options", "RunSpec", "register_experiment", "run_experiment"]
