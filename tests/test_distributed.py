"""DDP on CPU (gloo): 2 processes reach the weights of 1 process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepres.engine import load_checkpoint
from deepres.engine.logging import read_metrics

from .helpers import make_idx_dataset
from .test_engine import small_overrides

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parents[1]))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_gloo_processes_match_one(tmp_path):
    data = make_idx_dataset(tmp_path / "data", n_train=320, n_test=101)  # 101: not divisible by 2 ranks
    overrides = small_overrides(data, **{"model.name": "ddp_test_net", "train.iterations": 12,
                                         "train.checkpoint_every": 6, "train.eval_every": 6, "train.log_every": 3})
    _run([sys.executable, str(WORKER), str(tmp_path / "single"), *overrides], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
          str(tmp_path / "ddp"), *overrides], tmp_path)
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")["model"]
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5)
    # Rank 0 alone logs; evaluation counts every test image once (101 over 2 ranks).
    rows = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in ("single", "ddp")}
    assert len(rows["ddp"]) == len(rows["single"])
    test = [r for r in rows["ddp"] if "test_top1_error" in r][0]
    single_test = [r for r in rows["single"] if "test_top1_error" in r][0]
    assert test["test_top1_error"] == pytest.approx(single_test["test_top1_error"], abs=1e-6)
    losses = lambda rs: [r["train_loss"] for r in rs if "train_loss" in r]  # noqa: E731
    assert losses(rows["ddp"]) == pytest.approx(losses(rows["single"]), rel=1e-4)
