"""DDP on CPU (gloo): 2 processes reach the weights of 1 process with the same global batch."""

import json
import os
import signal
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
ROOT = WORKER.parents[1]


def _env(**extra) -> dict:
    """The workers import deepres from the source tree (as on a machine where it is not installed) and tests' helpers
    from the repository root."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), **extra)


def _run(cmd, tmp_path, **env_extra):
    """Run ``cmd`` in a session of its own: on a timeout the whole job (torchrun and its workers) is killed, not only
    torchrun, so no worker outlives the test."""
    with subprocess.Popen(cmd, env=_env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            raise AssertionError(f"{cmd[:4]} ran past 300 s: {err[-3000:]}") from None
    assert proc.returncode == 0, err[-3000:]


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


def test_error_driven_warmup_switches_every_rank_on_the_same_step(tmp_path):
    """The paper's ResNet-110 rule (lr 0.01 until the training error is below a threshold) under DDP: rank 0's labels
    are one class (its local error falls to 0 within steps), rank 1's are noise (its local error stays near 90%);
    their local errors straddle the threshold.
    The switch is decided from the error of the whole global batch, so both ranks switch on the same step and end
    with identical weights (decided per rank, rank 0 alone would step at 0.1 and the replicas would part)."""
    data = make_idx_dataset(tmp_path / "data", n_train=320, n_test=64)
    threshold = 85.0
    overrides = small_overrides(data, **{"model.name": "ddp_test_net", "train.iterations": 40, "data.val_size": 0,
                                         "train.checkpoint_every": 40, "train.eval_every": 40, "train.log_every": 5,
                                         "schedule.name": "constant", "optim.lr": 0.1, "schedule.warmup_lr": 0.01,
                                         "schedule.warmup_until_train_error": threshold, "train.deterministic": False})
    run = tmp_path / "ddp"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(run),
          *overrides], tmp_path, DDP_STRADDLE="1")
    local = {r: [json.loads(line)["local_error"] for line in (run / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)}
    switch = len(local[0])  # errors are observed until the switch
    assert len(local[1]) == switch < 40, "both ranks stopped observing (switched) on the same step, before the end"
    window = 20
    mean0, mean1 = (sum(local[r][switch - window:switch]) / window for r in (0, 1))
    assert mean0 < threshold <= mean1, (mean0, mean1)  # the local errors straddle the threshold at the switch
    assert (mean0 + mean1) / 2 < threshold  # the global batch's error crossed it
    lrs = [r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.1)
    a, b = torch.load(run / "rank0.pt"), torch.load(run / "rank1.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_stalled_rank_ends_the_job_within_the_timeout(tmp_path):
    """A rank that stops answering (hung, not dead) ends the job after ``train.dist_timeout_s`` with a non-zero exit
    and a message, not after gloo's half-hour default; only rank 0 wrote the run's files."""
    import time

    data = make_idx_dataset(tmp_path / "data", n_train=320, n_test=40)
    overrides = small_overrides(data, **{"model.name": "ddp_test_net", "train.iterations": 12,
                                         "train.dist_timeout_s": 10})
    env = _env(DDP_STALL="3")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(WORKER), str(tmp_path / "ddp"), *overrides], env=env, capture_output=True, text=True,
                         timeout=600)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert elapsed < 240, f"the job took {elapsed:.0f} s to notice a stalled rank with a 10 s timeout"
    assert "did not answer within train.dist_timeout_s=10 s" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "ddp" / "summary.json").exists()
