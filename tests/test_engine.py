"""The training loop: learning, exact resume after a real kill, atomic checkpoints, NaN halt, schedules, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepres.config import load_config
from deepres.engine import (
    NonFiniteLossError,
    Schedule,
    load_checkpoint,
    param_groups,
    save_checkpoint,
    train,
)
from deepres.engine.logging import read_metrics
from deepres.models import create_model

from .helpers import make_idx_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("idx"))


def small_overrides(data_dir, **extra):
    items = {
        "name": "t",
        "model.name": "resnet20",
        "data.source": "fashion_mnist",
        "data.data_dir": str(data_dir),
        "data.val_size": 64,
        "data.preset": "none",
        "train.batch_size": 32,
        "train.eval_batch_size": 64,
        "train.iterations": 30,
        "train.log_every": 1,
        "train.eval_every": 10,
        "train.checkpoint_every": 10,
        "train.deterministic": True,
        "schedule.name": "multistep",
        "schedule.milestones": "20",
        "optim.lr": 0.05,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "train_loss" in r]


def test_training_learns_and_writes_the_run_folder(idx_data, tmp_path):
    config = load_config(None, small_overrides(idx_data, **{"train.iterations": 60, "train.log_every": 10}))
    summary = train(config, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert any((run / "tensorboard").iterdir())
    rows = read_metrics(run / "metrics.jsonl")
    keys = set().union(*rows)
    for key in ["step", "lr", "train_loss", "train_top1_error", "val_loss", "val_top1_error", "val_top5_error",
                "test_loss", "test_top1_error", "test_top5_error", "images_per_s", "elapsed_s"]:
        assert key in keys
    assert summary["test_top1_error"] < 30.0  # chance is 90%
    assert load_config(run / "config.yaml") == config
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    val_errors = {r["step"]: r["val_top1_error"] for r in rows if "val_top1_error" in r}
    assert best["step"] == min(val_errors, key=lambda s: (val_errors[s], s)) == summary["best_step"]
    assert summary["best_val_top1_error"] == val_errors[best["step"]]
    # The multistep schedule dropped the rate at 20 iterations.
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[10] == pytest.approx(0.05) and lrs[30] == pytest.approx(0.005)


def test_existing_run_is_not_overwritten(idx_data, tmp_path):
    config = load_config(None, small_overrides(idx_data, **{"train.iterations": 10}))
    train(config, tmp_path / "run", quiet=True)
    with pytest.raises(FileExistsError, match="--resume auto"):
        train(config, tmp_path / "run", quiet=True)


def _cli(args, **kw):
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, "-m", "deepres", *args], env=env, cwd=ROOT, **kw)


def test_exact_resume_after_kill_9(idx_data, tmp_path):
    """kill -9 mid-epoch, then --resume auto: every logged loss and the final weights equal an uninterrupted run's.
    The device loader gathers each epoch's order, crops and flips at once (data.gather=epoch); 448 training images
    at batch 32 are 14 steps an epoch, and the checkpoint the run resumes from lies inside the second epoch."""
    overrides = small_overrides(idx_data, **{"train.iterations": 40, "train.checkpoint_every": 5,
                                             "data.preset": "paper_cifar", "data.gather": "epoch"})
    sets = [a for o in overrides for a in ("--set", o)]
    reference = tmp_path / "reference"
    assert _cli(["train", "--recipe", str(ROOT / "src/deepres/recipes/toolkit/demo.yaml"),
                 "--run-dir", str(reference), *sets],
                stderr=subprocess.DEVNULL).wait() == 0

    run = tmp_path / "killed"
    proc = _cli(["train", "--recipe", str(ROOT / "src/deepres/recipes/toolkit/demo.yaml"),
                 "--run-dir", str(run), *sets],
                stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-epoch, between checkpoints
        done = [s for s, _ in losses(run)]
        if done and done[-1] >= 17:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = losses(run)[-1][0]
    assert 17 <= killed_at < 40, killed_at
    resumed_from = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 15 <= resumed_from < killed_at + 1 and resumed_from % 14, resumed_from

    resumed = _cli(["train", "--recipe", str(ROOT / "src/deepres/recipes/toolkit/demo.yaml"),
                    "--run-dir", str(run), *sets, "--resume", "auto"], stderr=subprocess.DEVNULL)
    assert resumed.wait() == 0
    assert losses(run) == losses(reference)  # every logged loss, bit for bit
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(reference / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigterm_saves_last_checkpoint(idx_data, tmp_path):
    overrides = small_overrides(idx_data, **{"train.iterations": 400, "train.checkpoint_every": 1000})
    sets = [a for o in overrides for a in ("--set", o)]
    run = tmp_path / "run"
    proc = _cli(["train", "--recipe", str(ROOT / "src/deepres/recipes/toolkit/demo.yaml"),
                 "--run-dir", str(run), *sets],
                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (losses(run) and losses(run)[-1][0] >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 5 <= step < 400 and "--resume auto" in err


def test_nan_loss_halts_and_keeps_the_checkpoint(idx_data, tmp_path):
    config = load_config(None, small_overrides(idx_data, **{"optim.lr": 1e12, "train.iterations": 50,
                                                             "train.checkpoint_every": 1, "train.log_every": 1}))
    with pytest.raises(NonFiniteLossError, match=r"at step \d+") as info:
        train(config, tmp_path / "run", quiet=True)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)  # intact and loadable
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert str(last) in str(info.value)


def test_nan_exit_code_from_cli(idx_data, tmp_path):
    sets = [a for o in small_overrides(idx_data, **{"optim.lr": 1e12, "train.iterations": 30}) for a in ("--set", o)]
    proc = _cli(["train", "--recipe", "demo", "--run-dir", str(tmp_path / "r"), *sets], stderr=subprocess.PIPE,
                text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "NaN/inf" in err


def test_resume_with_other_model_or_data_is_refused(idx_data, tmp_path):
    config = load_config(None, small_overrides(idx_data, **{"train.iterations": 10}))
    train(config, tmp_path / "run", quiet=True)
    other_model = load_config(None, small_overrides(idx_data, **{"train.iterations": 20, "model.name": "resnet32"}))
    with pytest.raises(ValueError, match="cannot resume.*model"):
        train(other_model, tmp_path / "run", resume="auto", quiet=True)
    other_data = make_idx_dataset(tmp_path / "other", seed=1)
    config2 = load_config(None, small_overrides(other_data, **{"train.iterations": 20}))
    with pytest.raises(ValueError, match="training data differs"):
        train(config2, tmp_path / "run", resume="auto", quiet=True)


def test_atomic_save_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_checkpoint_is_weights_only_loadable(tmp_path):
    path = save_checkpoint({"step": 3, "config": {"a": [1, 2]}, "model": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_param_groups_by_module_type():
    model = create_model("resnet20")
    groups = param_groups(model, 1e-4, decay_norm_and_bias=False)
    decayed = {id(p) for p in groups[0]["params"]}
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert all(id(w) in decayed for w in convs) and id(model.fc.weight) in decayed
    assert not any(id(p) in decayed for p in norms) and id(model.fc.bias) not in decayed
    assert groups[1]["weight_decay"] == 0.0
    everything = param_groups(model, 1e-4)
    assert len(everything) == 1 and len(everything[0]["params"]) == len(list(model.parameters()))


def test_schedules():
    cfg = load_config(None, ["schedule.milestones=32000,48000"]).schedule
    s = Schedule(cfg, 0.1, 64000)
    assert [s.lr_at(i) for i in (0, 31999, 32000, 48000, 63999)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])
    cos = Schedule(load_config(None, ["schedule.name=cosine", "schedule.warmup_iterations=10"]).schedule, 0.1, 110)
    assert cos.lr_at(0) == pytest.approx(0.01) and cos.lr_at(10) == pytest.approx(0.1)
    assert cos.lr_at(60) == pytest.approx(0.05) and cos.lr_at(110) == pytest.approx(0.0)
    # ResNet-110: 0.01 until the training error is below 80%, then 0.1 (section 4.2).
    warm = Schedule(load_config(None, ["schedule.warmup_until_train_error=80"]).schedule, 0.1, 64000)
    for step in range(Schedule.WINDOW):
        assert warm.lr_at(step) == 0.01
        warm.observe_train_error(85.0, step)
    assert not warm.error_warmup_done
    for step in range(Schedule.WINDOW, 2 * Schedule.WINDOW):
        warm.observe_train_error(70.0, step)
    assert warm.error_warmup_done and warm.lr_at(6) == 0.1
    # The window's mean fell below 80% with its 7th batch at 70% (13 x 85 + 7 x 70 = 1595 < 20 x 80), iteration 26.
    assert warm.error_warmup_iterations == Schedule.WINDOW + 7
    again = Schedule(load_config(None, ["schedule.warmup_until_train_error=80"]).schedule, 0.1, 64000)
    again.load_state_dict(json.loads(json.dumps(warm.state_dict())))
    assert again.lr_at(6) == 0.1 and again.error_warmup_iterations == Schedule.WINDOW + 7


def test_error_driven_warmup_is_reported(idx_data, tmp_path):
    """The paper's ResNet-110 hold (lr 0.01 until the training error is below a threshold): the summary says how
    many iterations it lasted, and the logged rates switch right after them; a hold that never ends is a notice."""
    hold = {"schedule.name": "constant", "optim.lr": 0.1, "schedule.warmup_lr": 0.01, "train.eval_every": 100,
            "train.checkpoint_every": 100}
    config = load_config(None, small_overrides(idx_data, **hold, **{"train.iterations": 60,
                                                                     "schedule.warmup_until_train_error": 5}))
    summary = train(config, tmp_path / "ends", quiet=True)
    held = summary["error_warmup_iterations"]
    # The first batches are near chance (90% wrong), so the first full window's mean is far above 5%; the synthetic
    # classes (a bar each) are learnt within about 15 iterations at lr 0.01, and the mean falls below 5% soon after.
    assert Schedule.WINDOW < held < 60, held
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "ends" / "metrics.jsonl") if "lr" in r}
    assert {lrs[s] for s in range(1, held + 1)} == {0.01} and {lrs[s] for s in range(held + 1, 61)} == {0.1}
    assert not summary["notices"]

    config = load_config(None, small_overrides(idx_data, **hold, **{"train.iterations": 25,
                                                                     "schedule.warmup_until_train_error": 0.001}))
    summary = train(config, tmp_path / "never", quiet=True)
    assert summary["error_warmup_iterations"] is None
    assert any("never fell below schedule.warmup_until_train_error=0.001%" in n for n in summary["notices"])
    plain = train(load_config(None, small_overrides(idx_data, **{"train.iterations": 5})), tmp_path / "off",
                  quiet=True)
    assert "error_warmup_iterations" not in plain


def test_out_of_memory_names_a_batch_size(idx_data, tmp_path, monkeypatch):
    import deepres.engine.loop as loop
    from deepres.tasks import Task

    class OOMTask(Task):
        error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def loss(self, outputs, targets):
            raise self.error

    monkeypatch.setattr(loop, "build_task", lambda cfg: OOMTask())
    config = load_config(None, small_overrides(idx_data))
    with pytest.raises(RuntimeError, match=r"^CUDA out of memory at train.batch_size=32 on cpu: try --set "
                                           r"train.micro_batches=2 .*--set train.batch_size=16"):
        train(config, tmp_path / "run", quiet=True)
    OOMTask.error = RuntimeError("[enforce fail at alloc_cpu.cpp:116] DefaultCPUAllocator: can't allocate memory: "
                                 "you tried to allocate 822083584 bytes")  # what a CPU step raises
    config = load_config(None, small_overrides(idx_data, **{"train.micro_batches": 2}))
    with pytest.raises(RuntimeError, match=r"^out of memory at train.batch_size=32, train.micro_batches=2 on cpu: "
                                           r"try --set train.micro_batches=4"):
        train(config, tmp_path / "run2", quiet=True)


def test_ema_weights_are_kept_and_used_for_inference(idx_data, tmp_path):
    from deepres.engine import load_for_inference

    config = load_config(None, small_overrides(idx_data, **{"train.iterations": 12, "train.ema_decay": 0.9,
                                                             "optim.grad_clip": 1.0}))
    train(config, tmp_path / "run", quiet=True)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["ema"] is not None
    model, _, _ = load_for_inference(ckpt)
    ema_fc = ckpt["ema"]["module.fc.weight"]
    assert torch.equal(model.fc.weight, ema_fc) and not torch.equal(ema_fc, ckpt["model"]["fc.weight"])


@pytest.mark.parametrize("warmup", [True, False])
def test_weight_ema_follows_the_formula(warmup):
    """float64: the first update copies the weights, the n-th after it moves the average by 1 - d towards them,
    d = min(decay, (1 + n) / (10 + n)) with the warm-up, d = decay without; BN's integer count is averaged too."""
    from deepres.engine.loop import weight_ema

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).double()
    ema = weight_ema(net, 0.95, warmup)
    expected = None
    for n in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
        current = torch.cat([p.detach().flatten() for p in net.parameters()])
        if expected is None:
            expected = current.clone()
        else:
            rate = min(0.95, (1 + n) / (10 + n)) if warmup else 0.95
            expected = rate * expected + (1 - rate) * current
        ema.update_parameters(net)
    averaged = torch.cat([p.detach().flatten() for p in ema.module.parameters()])
    torch.testing.assert_close(averaged, expected, rtol=1e-12, atol=1e-12)
    assert weight_ema(net, None) is None


def test_channels_last_trains_the_same(idx_data, tmp_path):
    """NHWC changes the kernels, not the maths: the first step's loss (the same weights and batch) agrees to float
    rounding; later steps drift apart by rounding amplified through training (measured up to 0.6% after 5 steps with
    one intra-op thread), so they are compared loosely."""
    runs = {}
    for flag in (False, True):
        config = load_config(None, small_overrides(idx_data, **{"train.iterations": 5, "train.channels_last": flag}))
        train(config, tmp_path / str(flag), quiet=True)
        runs[flag] = [loss for _, loss in losses(tmp_path / str(flag))]
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True] == pytest.approx(runs[False], rel=3e-2)
