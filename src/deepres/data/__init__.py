"""Datasets, augmentation and loaders. Imports nothing from engine, experiments or cli.

Sources (``data.source``): cifar10, cifar100, fashion_mnist, mnist (official formats, downloaded when absent) and
imagefolder (a folder, a .tar.gz of one, or a file from ``deepres data prepare``). Loaders: the device-resident
:class:`DeviceLoader` and the worker :class:`WorkerLoader` share one protocol (``iterate(start_step)``,
``batch(step)``, ``steps_per_epoch``); :func:`build_data` picks one from the config.
"""

from .archives import cache_root, download, extract_archive
from .datasets import Dataset, Split, carve_validation, validation_indices
from .folders import FolderDataset, load_prepared, prepare_image_folder, scan_image_folder
from .images import BadImageError, decode_image_bytes, read_image
from .loaders import DeviceLoader, EvalLoader, Normalizer, random_crop_flip, step_generator
from .pipeline import DataBundle, build_data, choose_loader, device_augmentation, train_loader_over, train_mix
from .policies import RandAugmentBatch, RandomSubset, TrivialAugmentBatch
from .presets import CutMix, Mixup, pca_lighting
from .sources import SOURCES, load_dataset, register_source
from .subsets import first_per_class, load_run_dataset, split_labeled
from .workers import WorkerEvalLoader, WorkerLoader

__all__ = [
    "SOURCES",
    "BadImageError",
    "CutMix",
    "DataBundle",
    "Dataset",
    "DeviceLoader",
    "EvalLoader",
    "FolderDataset",
    "Mixup",
    "Normalizer",
    "RandAugmentBatch",
    "RandomSubset",
    "Split",
    "TrivialAugmentBatch",
    "WorkerEvalLoader",
    "WorkerLoader",
    "build_data",
    "cache_root",
    "carve_validation",
    "choose_loader",
    "decode_image_bytes",
    "device_augmentation",
    "download",
    "extract_archive",
    "load_dataset",
    "load_prepared",
    "load_run_dataset",
    "first_per_class",
    "split_labeled",
    "pca_lighting",
    "prepare_image_folder",
    "random_crop_flip",
    "read_image",
    "register_source",
    "scan_image_folder",
    "step_generator",
    "train_loader_over",
    "train_mix",
    "validation_indices",
]
