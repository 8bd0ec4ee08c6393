"""Small runs shared by the distillation, transfer and pseudo-label tests: a learnable IDX set and a teacher."""

from pathlib import Path

import pytest
import torch

from deepres.config import load_config
from deepres.data.loaders import single_thread_on_cpu
from deepres.engine import train

from .helpers import make_idx_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these nets are tiny, and a second thread only waits when the cores are shared."""
    with single_thread_on_cpu(torch.device("cpu")):
        yield


def idx_dataset(root: Path) -> Path:
    return make_idx_dataset(root, n_train=640, n_test=128, size=16)


def overrides(data_dir, **extra) -> list[str]:
    items = {
        "name": "t",
        "model.name": "resnet20",
        "model.options.widths": "[8, 16, 32]",  # a narrow ResNet-20: these tests check paths, not accuracy
        "data.source": "fashion_mnist",
        "data.data_dir": str(data_dir),
        "data.val_size": 64,
        "data.preset": "none",
        "train.batch_size": 32,
        "train.eval_batch_size": 128,
        "train.iterations": 10,
        "train.log_every": 5,
        "train.eval_every": 5,
        "train.checkpoint_every": 5,
        "schedule.name": "constant",
        "optim.lr": 0.05,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def train_teacher(data_dir, run_dir: Path, iterations: int = 30) -> Path:
    """A ResNet-20 trained well above chance on the IDX set; returns its last.pt."""
    config = load_config(None, overrides(data_dir, **{"train.iterations": iterations, "schedule.name": "cosine"}))
    with single_thread_on_cpu(torch.device("cpu")):
        train(config, run_dir, quiet=True)
    return run_dir / "checkpoints" / "last.pt"


# Shared by the distillation, pseudo-label and transfer tests: one IDX set and one teacher (read, never changed) for
# the whole session, trained once instead of once per module.
@pytest.fixture(scope="session")
def idx_data(tmp_path_factory):
    return idx_dataset(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="session")
def teacher(idx_data, tmp_path_factory):
    return train_teacher(idx_data, tmp_path_factory.mktemp("teacher") / "run")
