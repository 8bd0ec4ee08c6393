"""CUDA behaviour the CPU suite cannot show: the fast path's captured CUDA graph against its eager steps, bf16 with
channels_last, torch.compile, and the training loop's exact resume under bf16 + channels_last.

Skipped without a GPU (CI has none); on the GPU machine: ``pytest tests/test_cuda.py``. ``DEEPRES_TEST_DEVICE=cpu``
runs the same code on the CPU (graphs are then not captured), to check the tests themselves.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from deepres.config import load_config
from deepres.engine import load_checkpoint, train
from deepres.engine.fast import FastOptions, train_fast
from deepres.engine.logging import read_metrics

from .helpers import make_idx_dataset
from .test_engine import small_overrides

DEVICE = os.environ.get("DEEPRES_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the exact-resume test

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import tiny_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return tiny_image_folder(root / "data", classes=4, per_class=64, test_per_class=16), root / "cache"


def _config(folder, *extra):
    data, cache = folder
    return load_config("paper/cifar10_resnet20", [
        "data.source=imagefolder", f"data.data_dir={data}", f"data.cache_dir={cache}", "data.val_size=0",
        f"train.device={DEVICE}", "train.iterations=40", "train.batch_size=32", "train.eval_batch_size=64",
        "optim.lr=0.05", *extra])


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]


def test_graph_replay_equals_eager_steps(folder, tmp_path):
    """fp32: the captured step computes what the eager step computes (same batches, same updates)."""
    options = dict(log_every=5, quiet=True)
    config = _config(folder, "train.amp=off", "train.channels_last=false")
    eager = train_fast(config, tmp_path / "eager", FastOptions(graph=False, **options))
    graph = train_fast(config, tmp_path / "graph", FastOptions(graph=True, **options))
    assert graph["cuda_graph"] == (DEVICE == "cuda") and not eager["cuda_graph"]
    # The first windows agree to float rounding; later ones may drift by cuDNN's algorithm choices.
    assert _losses(tmp_path / "graph")[:2] == pytest.approx(_losses(tmp_path / "eager")[:2], rel=1e-4)
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "eager"), rel=5e-2)
    assert abs(graph["test_top1_error"] - eager["test_top1_error"]) <= 100 * 3 / 64


def test_bf16_channels_last_graph_learns_and_checkpoints(folder, tmp_path):
    config = _config(folder, "train.amp=bf16", "train.channels_last=true", "train.iterations=80")
    summary = train_fast(config, tmp_path / "run", FastOptions(log_every=10, eval_every=40, quiet=True))
    assert summary["amp"] == "bf16" and summary["channels_last"] == (DEVICE == "cuda")
    assert summary["test_top1_error"] <= 40.0  # four colour-coded classes: chance is 75%
    if DEVICE == "cuda":
        assert summary["cuda_graph"] and 0 < summary["peak_memory_mib"] < 2048
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 80 and all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())  # fp32 master


def test_compiled_fast_path_learns(folder, tmp_path):
    config = _config(folder, "train.amp=bf16", "train.channels_last=true")
    summary = train_fast(config, tmp_path / "run", FastOptions(compile_mode="reduce-overhead", log_every=10,
                                                               quiet=True))
    assert summary["compile_mode"] == "reduce-overhead" and summary["test_top1_error"] <= 25.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2]["train_loss"] < rows[0]["train_loss"]


def test_loop_bf16_channels_last_resume_equals_uninterrupted(tmp_path):
    data = make_idx_dataset(tmp_path / "data")
    extra = {"train.device": DEVICE, "train.amp": "bf16", "train.channels_last": True, "train.iterations": 20,
             "train.checkpoint_every": 10, "schedule.milestones": "15"}
    train(load_config(None, small_overrides(data, **extra)), tmp_path / "straight", quiet=True)
    train(load_config(None, small_overrides(data, **{**extra, "train.iterations": 10})), tmp_path / "resumed",
          quiet=True)
    train(load_config(None, small_overrides(data, **extra)), tmp_path / "resumed", resume="auto", quiet=True)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
