"""Datasets, augmentation and loaders. Imports nothing from engine, experiments or cli."""

from .datasets import Dataset, Split, carve_validation
from .loaders import DeviceLoader, EvalLoader, Normalizer, random_crop_flip, step_generator
from .pipeline import DataBundle, build_data, train_augmentation
from .sources import SOURCES, load_dataset, register_source

__all__ = [
    "SOURCES",
    "DataBundle",
    "Dataset",
    "DeviceLoader",
    "EvalLoader",
    "Normalizer",
    "Split",
    "build_data",
    "carve_validation",
    "load_dataset",
    "random_crop_flip",
    "register_source",
    "step_generator",
    "train_augmentation",
]
