"""Real data learns: ResNet-20 on a few thousand CIFAR-10 JPEG images for a few hundred CPU steps (300 at batch 64)."""

from deepres.config import load_config
from deepres.engine import train

from .conftest import shared_data

# Chance is 90% error. Measured: 62.8% test error over all ten classes (the subsets span the classes).
MAX_TEST_ERROR = 70.0


def test_resnet20_learns_cifar10_jpeg(tmp_path):
    archive = shared_data("cifar10-jpeg.tar.gz")
    config = load_config("paper/cifar10_resnet20", [
        "data.source=imagefolder", f"data.data_dir={archive}", "data.val_size=1000", "data.train_subset=4000",
        "data.test_subset=2000", "train.iterations=300", "train.batch_size=64", "train.eval_every=150",
        "train.checkpoint_every=300", "train.log_every=50", "schedule.name=cosine", "schedule.warmup_iterations=30",
        "optim.lr=0.1",
    ])
    summary = train(config, tmp_path / "run", quiet=True)
    assert summary["test_top1_error"] < MAX_TEST_ERROR, summary
