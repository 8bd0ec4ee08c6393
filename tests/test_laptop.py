"""The laptop scale and the CPU precision it picks: bf16 autocast only on CPUs with native bf16 arithmetic."""

import json

import numpy as np
import pytest
import torch

from deepres.config import load_config
from deepres.engine.steps import native_bf16_cpu, resolve_amp
from deepres.experiments import EXPERIMENTS, Options, run_experiment
from deepres.experiments.base import LAPTOP_ITERATIONS

from .helpers import make_image_folder

ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"
HASWELL = "flags\t\t: fpu sse4_2 avx avx2 fma\n"


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("DEEPRES_CPU_BF16", raising=False)
    assert native_bf16_cpu(ZEN4) and native_bf16_cpu(SAPPHIRE_RAPIDS) and not native_bf16_cpu(HASWELL)
    assert not native_bf16_cpu("")  # flags that cannot be read: fp32
    monkeypatch.setenv("DEEPRES_CPU_BF16", "1")
    assert native_bf16_cpu(HASWELL)  # the override wins
    monkeypatch.setenv("DEEPRES_CPU_BF16", "0")
    assert not native_bf16_cpu(ZEN4)


@pytest.mark.parametrize("native,expected", [("1", "bf16"), ("0", "off")])
def test_auto_precision_on_the_cpu(monkeypatch, native, expected):
    monkeypatch.setenv("DEEPRES_CPU_BF16", native)
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == expected
    assert resolve_amp("off", cpu) == "off" and resolve_amp("bf16", cpu) == "bf16"  # an explicit choice stays


def test_auto_bf16_is_printed_and_recorded(monkeypatch, tmp_path, capsys):
    from deepres.engine import train

    from .helpers import make_idx_dataset
    from .test_engine import small_overrides

    monkeypatch.setenv("DEEPRES_CPU_BF16", "1")
    data = make_idx_dataset(tmp_path / "data", n_train=128, n_test=32)
    config = load_config(None, small_overrides(data, **{"train.amp": "auto", "train.iterations": 2,
                                                        "data.val_size": 32}))
    summary = train(config, tmp_path / "run")
    assert summary["amp"] == "bf16" and "precision bf16" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["amp"] == "bf16"


def test_laptop_plan_is_the_paper_recipe_shortened():
    options = Options(scale="laptop", data_dir="/data/cifar10-jpeg.tar.gz")
    specs = EXPERIMENTS["cifar-degradation"].plan(options)
    assert sorted(s.name for s in specs) == ["cifar10-plain20-s0", "cifar10-plain56-s0", "cifar10-resnet20-s0",
                                             "cifar10-resnet56-s0"]
    config = load_config(specs[0].recipe, specs[0].overrides)
    n = LAPTOP_ITERATIONS
    assert config.train.iterations == n and config.schedule.milestones == [n // 2, n * 3 // 4]  # 32k/48k of 64k
    assert (config.train.batch_size, config.optim.lr, config.data.val_size) == (128, 0.1, 0)  # the paper, all 50k
    assert config.train.amp == "auto" and config.train.channels_last  # bf16 where the CPU has it
    # A linear warm-up over the first 5% (ResNet-56 does not start converging at 0.1 without one), for every net.
    assert (config.schedule.warmup_iterations, config.schedule.warmup_lr) == (0.05, 0.01)
    assert config.train.test_every == n // 12 and config.train.checkpoint_every == n // 12
    responses = EXPERIMENTS["layer-responses"].plan(options)
    assert {s.name for s in responses} == {s.name for s in specs}  # Fig. 7 reads the same runs
    with pytest.raises(ValueError, match="--scale laptop"):
        run_experiment("zoo-cifar", options)


def test_laptop_report_on_tiny_runs(tmp_path):
    def paint(img, k):
        img[:, :, k % 3] += np.uint8(40 + 15 * k)

    data = make_image_folder(tmp_path / "cifar10-jpeg", {"train": 20, "test": 10}, paint)
    options = Options(scale="laptop", data_dir=str(data), out=tmp_path / "out", iterations=12, depths=[20])
    text = run_experiment("cifar-degradation", options).read_text()
    assert "**Laptop scale**: 12 iterations instead of the paper's 64,000" in text
    assert ("learning rate /10 at 6 and 9, after a linear warm-up" in text and "Hardware:" in text
            and "native bf16:" in text)
    assert "| Plain-20 |" in text and "| ResNet-20 |" in text and "ResNet-110" not in text
    assert ("Engine: the training loop (`deepres train`), 2 runs, one after another in this process: eager step, "
            "fp32, channels_last (2)") in text
