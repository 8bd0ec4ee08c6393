"""The step kinds of the one loop on the CPU: the captured step's logic (with CUDA's graph primitives stood in for),
the compiled step against the eager one, fp16 with its GradScaler through a resume, and a captured step asked for
on a CPU."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from deepres.config import ConfigError, OptimConfig, load_config
from deepres.engine import load_checkpoint, train
from deepres.engine.logging import read_metrics
from deepres.engine.optim import build_optimizer, param_groups
from deepres.engine.steps import (CapturedStep, EagerStep, Precision, _inductor_default_cache_dir, _split,
                                  compile_model, inductor_cache_dir)
from deepres.models import create_model
from deepres.tasks import ClassificationTask

from .helpers import make_idx_dataset
from .test_engine import small_overrides


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("idx-steps"))


def _losses(run):
    return [r["train_loss"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]


class _Stream:
    def wait_stream(self, other):
        pass


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_captured_step_logic_matches_eager_steps(monkeypatch, optim):
    """CapturedStep on the CPU with CUDA's graph primitives stood in for (capture runs the body once, as capture plus
    the first replay do; each later replay runs it again, writing fresh gradients as a replayed backward does, since
    they were None at capture): static input copies, the learning rate as a tensor the update reads, three warm-up
    steps, then replays. 12 steps with an lr change equal 12 eager steps. AdamW is the fused kind the GPU uses (the
    CPU's foreach kind cannot read a tensor lr)."""
    replays = []

    class FakeGraph:
        def replay(self):
            replays.append(1)
            if len(replays) > 1:
                captured.optimizer.zero_grad(set_to_none=True)
                captured._body()

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    def make(kind):
        torch.manual_seed(0)
        model = create_model("resnet20", num_classes=4)
        if optim == "sgd":
            optimizer = build_optimizer(model, load_config(None, ["optim.lr=0.05"]).optim, torch.device("cpu"))
        else:
            optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=0.05, fused=True)
        precision = Precision("off", torch.device("cpu"))
        return kind(model, model, ClassificationTask(), optimizer, precision), model

    captured, model_c = make(CapturedStep)
    eager, model_e = make(EagerStep)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        lr = 0.05 if step < 6 else 0.005
        captured.set_lr(lr)
        eager.set_lr(lr)
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss_c, wrong_c, n_c = captured(x, y)
        loss_e, wrong_e, n_e = eager(x, y)
        assert n_c == n_e == 8 and float(wrong_c) == float(wrong_e)
        assert float(loss_c) == pytest.approx(float(loss_e), rel=1e-5), step
    assert captured.graph is not None and len(replays) == 12 - CapturedStep.WARMUP_STEPS
    for a, b in zip(model_c.state_dict().values(), model_e.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    state = captured.optimizer_state()
    assert all(isinstance(group["lr"], float) and group["lr"] == pytest.approx(0.005) for group in
               state["param_groups"])
    with pytest.raises(ValueError, match="one shape"):
        captured(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))


def test_captured_step_on_a_cpu_runs_eagerly_with_a_notice(idx_data, tmp_path):
    config = load_config(None, small_overrides(idx_data, **{"train.cuda_graph": True, "train.iterations": 4}))
    summary = train(config, tmp_path / "run", quiet=True)
    assert summary["step"] == "eager" and summary["cuda_graph"] is False
    assert any("train.cuda_graph" in n and "eagerly" in n for n in summary["notices"])


TINY = {"model.name": "speedrun_resnet9", "model.options": "{widths: [8, 16, 16, 32]}"}


def test_fp16_scaler_state_round_trip(idx_data, tmp_path):
    """fp16 trains with a GradScaler; its state is in the checkpoint, so a resumed run equals an uninterrupted one."""
    extra = {"train.amp": "fp16", "train.iterations": 20, "train.checkpoint_every": 10, "schedule.milestones": "15",
             **TINY}
    straight = train(load_config(None, small_overrides(idx_data, **extra)), tmp_path / "straight", quiet=True)
    assert straight["amp"] == "fp16"
    train(load_config(None, small_overrides(idx_data, **{**extra, "train.iterations": 10})), tmp_path / "resumed",
          quiet=True)
    half = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    scaler = half["step_state"]["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 10  # ten finite steps since the start
    train(load_config(None, small_overrides(idx_data, **extra)), tmp_path / "resumed", resume="auto", quiet=True)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step_state"] == b["step_state"] and b["step_state"]["scaler"]["_growth_tracker"] == 20
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fp16_without_a_scaler_state_in_an_old_checkpoint_still_resumes(idx_data, tmp_path):
    """A checkpoint without ``step_state`` (written before fp16 had a scaler) resumes with a fresh scaler."""
    extra = {"train.amp": "fp16", "train.iterations": 6, "train.checkpoint_every": 3, **TINY}
    train(load_config(None, small_overrides(idx_data, **{**extra, "train.iterations": 3})), tmp_path / "r", quiet=True)
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    del ckpt["step_state"]
    torch.save(ckpt, path)
    assert train(load_config(None, small_overrides(idx_data, **extra)), tmp_path / "r", resume="auto",
                 quiet=True)["iterations"] == 6


def test_inductor_cache_dir_is_apart_only_under_a_capability_override():
    default = os.path.abspath(_inductor_default_cache_dir())
    assert inductor_cache_dir({}) is None
    assert inductor_cache_dir({"ATEN_CPU_CAPABILITY": "avx2"}) == default + "-aten-avx2"
    # Importing torchvision writes Inductor's default into the variable: that is no choice of the user's.
    assert inductor_cache_dir({"ATEN_CPU_CAPABILITY": "default", "TORCHINDUCTOR_CACHE_DIR": default}) == \
        default + "-aten-default"
    assert inductor_cache_dir({"ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": "/data/cache"}) is None


def test_compile_model_points_inductor_at_the_capability_folder(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    net = torch.nn.Linear(2, 2)
    compile_model(net)  # compiles lazily, at the first call
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.abspath(_inductor_default_cache_dir()) + "-aten-default"


COMPILE_ONCE = """
import torch
from deepres.engine.steps import compile_model
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
x = torch.randn(4, 3, 16, 16)
torch.testing.assert_close(compile_model(net)(x), net(x), rtol=1e-4, atol=1e-4)
"""


# Two fresh compiles in subprocesses: 45 s under `make test`, so `make test-slow`; the two tests above check the folder
# choice in the default suite.
@pytest.mark.slow
def test_compiled_code_of_a_capability_override_does_not_meet_the_native_code(tmp_path):
    """Inductor's cache does not key its code on ATEN_CPU_CAPABILITY: with torch.compile alone, a compile under
    =default after a native one on the same machine fails to build (the native run's vectorised C++ is reused), and
    under =avx2 on an AVX-512 CPU it crashed. compile_model keeps the override's code in a folder of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["TMPDIR"] = str(tmp_path)  # Inductor's default cache folder lies in the temporary folder: a fresh one
    for capability in ({}, {"ATEN_CPU_CAPABILITY": "default"}):
        out = subprocess.run([sys.executable, "-c", COMPILE_ONCE], env={**env, **capability}, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, (capability, out.stderr[-3000:])
    folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("torchinductor_"))
    assert len(folders) == 2 and folders[1] == folders[0] + "-aten-default", folders


def test_compiled_step_sees_the_eager_batches_and_honours_init_and_feature_extraction(idx_data, tmp_path):
    """torch.compile changes kernels, not the run: the same seed gives the same batches and, to float rounding, the
    same losses; model.init and finetune.mode=feature_extraction take effect under it too."""
    net = {**TINY, "data.preset": "paper_cifar",
           "train.iterations": 6, "train.deterministic": False, "train.eval_every": 6, "train.checkpoint_every": 6}
    eager = train(load_config(None, small_overrides(idx_data, **net)), tmp_path / "eager", quiet=True)
    compiled = train(load_config(None, small_overrides(idx_data, **net, **{"train.compile": "default"})),
                     tmp_path / "compiled", quiet=True)
    assert eager["step"] == "eager" and compiled["step"] == "compiled"
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-3)

    init = tmp_path / "eager" / "checkpoints" / "last.pt"
    frozen = train(load_config(None, small_overrides(idx_data, **net, **{
        "train.compile": "default", "model.init": str(init), "finetune.mode": "feature_extraction"})),
        tmp_path / "frozen", quiet=True)
    assert frozen["step"] == "compiled" and frozen["init"] == str(init)
    before = load_checkpoint(init)["model"]
    after = load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt")["model"]
    head = {k for k in after if k.startswith("fc.") or k.startswith("head.") or k.startswith("classifier.")}
    assert head, sorted(after)[-4:]
    for key, value in after.items():
        if key in head:
            continue
        assert torch.equal(value, before[key]), f"{key} moved under feature extraction"  # weights and BN statistics
    assert any(not torch.equal(after[k], before[k]) for k in head if after[k].is_floating_point())


def test_adamw_is_adam_with_decoupled_decay_and_the_exempt_groups():
    """optim.name=adamw against AdamW written out (float64, three steps of fixed gradients): the running moments with
    their bias corrections, the config's betas and eps, weight decay lr x weight_decay x weight apart from the
    gradient, and none on BN parameters and biases (decay_norm_and_bias=false)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 3)).double()
    cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.1, decay_norm_and_bias=False, betas=[0.8, 0.95], eps=1e-6)
    optimizer = build_optimizer(net, cfg, torch.device("cpu"))
    decayed = {id(net[0].weight), id(net[3].weight)}
    params = list(net.parameters())
    expected = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    generator = torch.Generator().manual_seed(1)
    for t in range(1, 4):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            g = p.grad
            m[i] = 0.8 * m[i] + 0.2 * g
            v[i] = 0.95 * v[i] + 0.05 * g * g
            if id(p) in decayed:
                expected[i] = expected[i] * (1 - 0.01 * 0.1)
            m_hat, v_hat = m[i] / (1 - 0.8 ** t), v[i] / (1 - 0.95 ** t)
            expected[i] = expected[i] - 0.01 * m_hat / (v_hat.sqrt() + 1e-6)
        optimizer.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    for bad, key in (("optim.betas=0.9,1.0", "optim.betas"), ("optim.betas=0.9", "optim.betas"),
                     ("optim.eps=0", "optim.eps")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["optim.name=adamw", bad])
    with pytest.raises(ConfigError, match="optim.nesterov.*SGD's"):
        load_config(None, ["optim.name=adamw", "optim.nesterov=true"])


def _straight_and_resumed(idx_data, tmp_path, sets: dict) -> tuple[dict, list]:
    """A run of ``sets`` straight through, and one stopped at step 3 and resumed: (the straight run's summary,
    [(step, train loss) of each run])."""
    straight = train(load_config(None, small_overrides(idx_data, **sets)), tmp_path / "straight", quiet=True)
    train(load_config(None, small_overrides(idx_data, **sets)), tmp_path / "resumed", quiet=True,
          on_step=lambda step, info: step < 3)
    train(load_config(None, small_overrides(idx_data, **sets)), tmp_path / "resumed", resume="auto", quiet=True)
    rows = [[(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / run / "metrics.jsonl") if "train_loss" in r]
            for run in ("straight", "resumed")]
    return straight, rows


def test_adamw_trains_resumes_exactly_and_a_changed_optimizer_is_refused(idx_data, tmp_path):
    sets = {"optim.name": "adamw", "optim.lr": 0.002, "optim.weight_decay": 0.05, "train.iterations": 6,
            "train.checkpoint_every": 3}
    straight, rows = _straight_and_resumed(idx_data, tmp_path, sets)
    assert rows[0] == rows[1] and len(rows[0]) == 6
    losses = [loss for _, loss in rows[0]]
    assert straight["iterations"] == 6 and losses[-1] < losses[0]
    state = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["optimizer"]
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(state["state"].values())))
    with pytest.raises(ValueError, match="optim.name adamw vs sgd"):
        train(load_config(None, small_overrides(idx_data, **{**sets, "optim.name": "sgd", "train.iterations": 9})),
              tmp_path / "resumed", resume="auto", quiet=True)


def test_trivialaugment_and_random_erasing_train_resume_exactly_and_bad_values_are_named(idx_data, tmp_path):
    sets = {"train.iterations": 6, "train.checkpoint_every": 3, "data.preset": "paper_cifar",
            "data.trivialaugment": True, "data.random_erasing": 0.5}
    straight, rows = _straight_and_resumed(idx_data, tmp_path, sets)
    assert rows[0] == rows[1] and len(rows[0]) == 6
    with pytest.raises(ValueError, match="data.random_erasing 0.5 vs 0.25"):
        train(load_config(None, small_overrides(idx_data, **{**sets, "data.random_erasing": 0.25,
                                                               "train.iterations": 9})),
              tmp_path / "resumed", resume="auto", quiet=True)
    with pytest.raises(ConfigError, match="data.trivialaugment.*randaugment_n=0"):
        load_config(None, small_overrides(idx_data, **{"data.trivialaugment": True, "data.randaugment_n": 2}))
    with pytest.raises(ConfigError, match=r"data.random_erasing.*\[0, 1\]; got 1.5"):
        load_config(None, small_overrides(idx_data, **{"data.random_erasing": 1.5}))


def test_the_random_subset_trains_resumes_exactly_and_bad_values_are_named(idx_data, tmp_path):
    sets = {"train.iterations": 6, "train.checkpoint_every": 3, "data.augment": ["shear", "rotate", "noise"]}
    straight, rows = _straight_and_resumed(idx_data, tmp_path, sets)
    assert rows[0] == rows[1] and len(rows[0]) == 6
    with pytest.raises(ValueError, match="data.augment_p 0.5 vs 0.25"):
        train(load_config(None, small_overrides(idx_data, **{**sets, "data.augment_p": 0.25,
                                                               "train.iterations": 9})),
              tmp_path / "resumed", resume="auto", quiet=True)
    for value, message in ((["rotation"], r"data.augment\[0\].*'rotation' \(did you mean 'rotate'\?\)"),
                           (["noise", "perspective:1.5"], r"data.augment\[1\].*must be in \[0, 1\]; got 1.5"),
                           (["rotate", "rotate:5"], r"data.augment\[1\].*rotate is listed twice")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, small_overrides(idx_data, **{"data.augment": value}))
    with pytest.raises(ConfigError, match="data.augment': one per-image policy"):
        load_config(None, small_overrides(idx_data, **{"data.augment": ["noise"], "data.randaugment_n": 2}))


def test_a_weight_ema_run_resumes_exactly(idx_data, tmp_path):
    """The average (its weights and update count) is checkpointed and restored: a run stopped at step 3 and resumed
    ends with the uninterrupted run's average, which best.pt and the test use."""
    sets = {"train.iterations": 6, "train.checkpoint_every": 3, "train.ema_decay": 0.9}
    straight, rows = _straight_and_resumed(idx_data, tmp_path, sets)
    assert rows[0] == rows[1] and len(rows[0]) == 6
    averages = [load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["ema"] for run in ("straight", "resumed")]
    assert int(averages[0]["n_averaged"]) == 6
    for key, value in averages[0].items():
        assert torch.equal(value, averages[1][key]), key
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert resumed["test_top1_error"] == straight["test_top1_error"]


def test_micro_batches_sum_to_the_whole_batchs_update():
    """Gradient accumulation: parts of 4, 3 and 3 images, each loss weighted by its share, give the whole batch's
    gradient (float64, a net without BN: every part sees the same function), hence the same weights, loss and errors
    over steps with momentum and weight decay."""
    def run(micro_batches):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                  torch.nn.Flatten(), torch.nn.Linear(32, 5)).double()
        optimizer = build_optimizer(net, OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4), torch.device("cpu"))
        step = EagerStep(net, net, ClassificationTask(), optimizer, Precision("off", torch.device("cpu")),
                         micro_batches=micro_batches)
        generator = torch.Generator().manual_seed(1)
        out = []
        for _ in range(3):
            images = torch.randn(10, 3, 6, 6, generator=generator, dtype=torch.float64)
            labels = torch.randint(0, 5, (10,), generator=generator)
            loss, wrong, count = step(images, labels)
            out.append((loss.item(), wrong.item(), count))
        return out, [p.detach().clone() for p in net.parameters()]

    whole, whole_weights = run(1)
    parts, parts_weights = run(3)
    assert [c for *_, c in parts] == [10, 10, 10] and [w for _, w, _ in parts] == [w for _, w, _ in whole]
    assert [lo for lo, *_ in parts] == pytest.approx([lo for lo, *_ in whole], rel=1e-6)  # returned as fp32
    for a, b in zip(whole_weights, parts_weights):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert [t.tolist() for t in _split((torch.arange(5), torch.arange(5) * 2), 2)[1]] == [[3, 4], [6, 8]]


def test_micro_batches_train_resume_exactly_and_are_refused_where_they_cannot_run(idx_data, tmp_path):
    sets = {"train.iterations": 6, "train.micro_batches": 3, "train.checkpoint_every": 3}
    straight, rows = _straight_and_resumed(idx_data, tmp_path, sets)
    assert straight["micro_batches"] == 3
    assert rows[0] == rows[1] and len(rows[0]) == 6
    with pytest.raises(ConfigError, match="train.micro_batches.*cuda_graph=false"):
        load_config(None, small_overrides(idx_data, **{"train.micro_batches": 2, "train.cuda_graph": True}))
    with pytest.raises(ConfigError, match=r"train.micro_batches.*\[1, train.batch_size=32\]"):
        load_config(None, small_overrides(idx_data, **{"train.micro_batches": 33}))
