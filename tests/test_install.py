"""deepres as an installed package, outside the source tree: the wheel carries the recipes and the benchmarks, found
without the checkout."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w",
                    str(wheels)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("deepres-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # The project's dependencies (torch, ...) from this environment's site-packages, without its editable deepres.
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        out = subprocess.run([python, "-m", "deepres", *args], cwd=work, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    where = subprocess.run([python, "-c", "import deepres; print(deepres.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(target) in where and str(ROOT) not in where
    assert "name: cifar10_resnet20" in run("config", "--recipe", "paper/cifar10_resnet20")
    assert "imagenet-throughput" in run("benchmark", "--help")
    from .helpers import make_idx_dataset

    data = make_idx_dataset(tmp_path / "data", n_train=256, n_test=64)
    out = run("train", "--recipe", "demo", "--run-dir", str(work / "run"), "--set", f"data.data_dir={data}",
              "--set", "data.val_size=32", "--set", "train.iterations=3", "--set", "train.batch_size=16",
              "--set", "train.eval_batch_size=64", "--set", "train.log_every=1")
    assert "test accuracy" in out and (work / "run" / "checkpoints" / "best.pt").is_file()


def test_the_pinned_versions_lie_within_the_stated_ranges():
    """constraints.txt (what make and CI install) and pyproject.toml (what the package accepts) agree: every pinned
    dependency satisfies its range, and the direct dependencies are all pinned."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for req in requirements:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req.specifier}"
    assert not project["requires-python"].startswith("==")
