"""CUDA behaviour the CPU suite cannot show: the captured CUDA-graph step against eager steps (SGD and AdamW), resume
from a captured run, bf16 with channels_last, torch.compile, exact resume under bf16, activation checkpointing, NCCL
DDP, and the device loader giving a GPU the same batches as a CPU.

Skipped without a GPU (CI has none); on the GPU machine: ``pytest tests/test_cuda.py``. ``DEEPRES_TEST_DEVICE=cpu``
runs the same code on the CPU (the captured step then runs eagerly, with a notice), to check the tests themselves.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepres.benchmarks.common import tiny_image_folder
from deepres.config import load_config
from deepres.data import DeviceLoader, Normalizer, Split
from deepres.engine import load_checkpoint, train
from deepres.engine.logging import read_metrics

from .helpers import make_idx_dataset
from .test_engine import small_overrides

DEVICE = os.environ.get("DEEPRES_TEST_DEVICE", "cuda")
# train.device of the captured-step runs: on the CPU check, auto (cpu with train.cuda_graph is refused outright).
RUN_DEVICE = "auto" if DEVICE == "cpu" else DEVICE
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the exact-resume test
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return tiny_image_folder(root / "data", classes=4, per_class=64, test_per_class=16), root / "cache"


def _config(folder, *extra):
    data, cache = folder
    return load_config("paper/cifar10_resnet20", [
        "data.source=imagefolder", f"data.data_dir={data}", f"data.cache_dir={cache}", "data.val_size=32",
        f"train.device={RUN_DEVICE}", "train.iterations=50", "train.batch_size=32", "train.eval_batch_size=64",
        "train.log_every=1", "train.eval_every=25", "train.checkpoint_every=25", "schedule.milestones=30,45",
        "optim.lr=0.05", *extra])


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]


def test_graph_replay_equals_eager_steps_and_resumes(folder, tmp_path):
    """fp32, 50 steps through an lr drop at 30 and 45: the captured step computes what the eager step computes (same
    batches, same updates) to float tolerance; a run resumed from a captured run's checkpoint continues it."""
    eager = train(_config(folder, "train.amp=off"), tmp_path / "eager", quiet=True)
    graph = train(_config(folder, "train.amp=off", "train.cuda_graph=true"), tmp_path / "graph", quiet=True)
    assert graph["cuda_graph"] == (DEVICE == "cuda") and graph["step"] == ("graph" if DEVICE == "cuda" else "eager")
    assert not eager["cuda_graph"]
    assert eager["tf32"] is graph["tf32"] is (False if DEVICE == "cuda" else None)  # the paper's recipe: full fp32
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "graph")
    assert len(a) == len(b) == 50
    assert b[:10] == pytest.approx(a[:10], rel=1e-4)  # the first steps agree to float rounding
    assert b == pytest.approx(a, rel=5e-2)  # later ones may drift by cuDNN's algorithm choices
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "graph" / "metrics.jsonl") if "lr" in r}
    assert lrs[30] == pytest.approx(0.05) and lrs[31] == pytest.approx(0.005) and lrs[50] == pytest.approx(0.0005)
    for name in ("eager", "graph"):
        assert {"last.pt", "best.pt"} <= {p.name for p in (tmp_path / name / "checkpoints").iterdir()}

    # Resume: the first 25 steps captured, then the rest captured again from the checkpoint.
    config = _config(folder, "train.amp=off", "train.cuda_graph=true")
    train(_config(folder, "train.amp=off", "train.cuda_graph=true", "train.iterations=25"), tmp_path / "resumed",
          quiet=True)
    ckpt = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 25 and all(isinstance(g["lr"], float) for g in ckpt["optimizer"]["param_groups"])
    train(config, tmp_path / "resumed", resume="auto", quiet=True)
    assert _losses(tmp_path / "resumed") == pytest.approx(b, rel=5e-2)
    final = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    straight = load_checkpoint(tmp_path / "graph" / "checkpoints" / "last.pt")["model"]
    for key, value in straight.items():
        if value.is_floating_point():
            torch.testing.assert_close(final[key], value, rtol=5e-2, atol=5e-3)


def test_adamw_in_the_captured_step_equals_eager_steps(folder, tmp_path):
    """optim.name=adamw: the fused AdamW with its state capturable, its lr read from device memory, replayed in the
    graph computes what the eager step computes."""
    sets = ("train.amp=off", "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05", "train.iterations=30",
            "schedule.milestones=20")
    train(_config(folder, *sets), tmp_path / "eager", quiet=True)
    graph = train(_config(folder, *sets, "train.cuda_graph=true"), tmp_path / "graph", quiet=True)
    assert graph["step"] == ("graph" if DEVICE == "cuda" else "eager")
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "graph")
    assert len(a) == len(b) == 30 and b[:10] == pytest.approx(a[:10], rel=1e-4)
    assert b == pytest.approx(a, rel=5e-2) and b[-1] < b[0]


def test_bf16_channels_last_graph_learns_and_checkpoints_fp32(folder, tmp_path):
    summary = train(_config(folder, "train.amp=bf16", "train.channels_last=true", "train.cuda_graph=true",
                            "train.iterations=80", "train.log_every=10", "train.test_every=40"), tmp_path / "run",
                    quiet=True)
    assert summary["amp"] == "bf16" and summary["channels_last"] is True
    assert summary["test_top1_error"] <= 40.0  # four colour-coded classes: chance is 75%
    if DEVICE == "cuda":
        assert summary["cuda_graph"] and 0 < summary["peak_memory_mib"] < 2048
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 80 and all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())  # fp32 master


def test_compiled_step_learns(folder, tmp_path):
    summary = train(_config(folder, "train.amp=bf16", "train.channels_last=true", "train.compile=reduce-overhead",
                            "train.iterations=40", "train.log_every=10"), tmp_path / "run", quiet=True)
    assert summary["step"] == "compiled" and summary["compile"] == "reduce-overhead"
    assert summary["test_top1_error"] <= 25.0
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_loop_bf16_channels_last_resume_equals_uninterrupted(tmp_path, micro_batches):
    """Also with gradient accumulation (train.micro_batches=2: each batch in two parts, one update)."""
    data = make_idx_dataset(tmp_path / "data")
    extra = {"train.device": DEVICE, "train.amp": "bf16", "train.channels_last": True, "train.iterations": 20,
             "train.checkpoint_every": 10, "schedule.milestones": "15", "train.micro_batches": micro_batches}
    train(load_config(None, small_overrides(data, **extra)), tmp_path / "straight", quiet=True)
    train(load_config(None, small_overrides(data, **{**extra, "train.iterations": 10})), tmp_path / "resumed",
          quiet=True)
    train(load_config(None, small_overrides(data, **extra)), tmp_path / "resumed", resume="auto", quiet=True)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_grad_checkpointing_equals_the_plain_run_bf16_channels_last(tmp_path):
    """Activation checkpointing on the GPU (deterministic kernels, bf16, channels_last): the same losses and weights as
    the plain run, the recomputation leaving BN's running statistics alone."""
    data = make_idx_dataset(tmp_path / "data")
    extra = {"train.device": DEVICE, "train.amp": "bf16", "train.channels_last": True, "train.iterations": 12,
             "schedule.milestones": "8"}
    plain = train(load_config(None, small_overrides(data, **extra)), tmp_path / "plain", quiet=True)
    checkpointed = train(load_config(None, small_overrides(data, **extra, **{"train.grad_checkpointing": True})),
                         tmp_path / "checkpointed", quiet=True)
    assert checkpointed["grad_checkpointing"] and not plain["grad_checkpointing"]
    assert _losses(tmp_path / "checkpointed") == _losses(tmp_path / "plain")
    a = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "checkpointed" / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_weight_ema_updates_without_waiting_for_the_gpu():
    """The EMA update (every step of an ema_decay run) computes its rate on the host: under CUDA's sync debug mode
    set to error, updates after the first (a copy) raise nothing, and the average follows the formula."""
    from deepres.engine.loop import weight_ema
    from deepres.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10).to(DEVICE)
    ema = weight_ema(net, 0.99)
    ema.update_parameters(net)
    with torch.no_grad():
        net.fc.weight.add_(1.0)
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update_parameters(net)
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert int(ema.n_averaged) == 4
    # The weights moved by 1 after the copy; each update n keeps d = (1 + n) / (10 + n) of the gap (the warm-up).
    gap = (ema.module.fc.weight - net.fc.weight).float()
    torch.testing.assert_close(gap, torch.full_like(gap, -(2 / 11) * (3 / 12) * (4 / 13)), rtol=1e-4, atol=1e-5)


def test_device_loader_gives_the_gpu_the_cpu_batches():
    """Batches are drawn from CPU generators: the same seed gives the same images, order and crops on any device."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(200) % 10)
    norm = Normalizer.fit(split.images)
    for gather in ("epoch", "batch"):
        cpu = DeviceLoader(split, 64, normalizer=norm, device="cpu", seed=7, gather=gather)
        dev = DeviceLoader(split, 64, normalizer=norm, device=DEVICE, seed=7, gather=gather)
        for step in (0, 1, 3, 4):
            (xc, yc), (xd, yd) = cpu.batch(step), dev.batch(step)
            assert torch.equal(yc, yd.cpu())
            torch.testing.assert_close(xd.cpu(), xc, rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "augment"])
def test_batched_policies_give_the_gpu_the_cpu_images(policy):
    """RandAugment, TrivialAugment and data.augment's random subset draw on the CPU and run their operations on the
    batch's device: the GPU's augmented batch is the CPU's up to float32 rounding (RandAugment and TrivialAugment:
    99.9% of the pixels equal, a nearest-neighbour tie or a truncated blend may go the other way; the random subset,
    all in float until one rounding: within one level of 255, 99% equal)."""
    from deepres.config import augment_ops
    from deepres.data import RandAugmentBatch, RandomSubset, TrivialAugmentBatch, step_generator

    augment = {"randaugment": lambda: RandAugmentBatch(2, 9), "trivialaugment": TrivialAugmentBatch,
               "augment": lambda: RandomSubset(augment_ops(["shear", "rotate", "perspective", "brightness",
                                                            "color_jitter", "noise"]), 0.5)}[policy]()
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        cpu = augment(images, step_generator(0, 1, step))
        dev = augment(images.to(DEVICE), step_generator(0, 1, step)).cpu()
        diff = (cpu.int() - dev.int()).abs()
        if policy == "augment":
            assert diff.max() <= 1 and (diff == 0).double().mean() > 0.99
        else:
            assert (diff == 0).double().mean() > 0.999, policy


def test_ddp_one_process_through_torchrun(tmp_path):
    """The multi-GPU path (NCCL on CUDA, gloo on the CPU) with one process: trains, checkpoints, leaves the group;
    with two micro-batches per batch (gradients reduced once, after the second)."""
    data = make_idx_dataset(tmp_path / "data")
    overrides = small_overrides(data, **{"train.device": DEVICE, "train.iterations": 6, "train.checkpoint_every": 3,
                                         "train.eval_every": 3, "train.deterministic": False,
                                         "train.micro_batches": 2})
    sets = [a for o in overrides for a in ("--set", o)]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
                          "deepres", "train", "--recipe", "demo", "--run-dir", str(tmp_path / "run"), *sets],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 6
