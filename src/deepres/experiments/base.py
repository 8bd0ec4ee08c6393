"""An experiment is a list of training runs plus the analysis that turns their logs into a report.

Runs live in ``OUT/runs/<run name>``; a run with a ``summary.json`` is complete and skipped, an interrupted one resumes
from its ``last.pt``, so a killed reproduction continues where it stopped. Runs are shared between experiments with
the same ``--out`` (Table 6 and Fig. 6 train the same residual nets).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import load_config
from ..engine.logging import read_metrics

__all__ = ["EXPERIMENTS", "Experiment", "Options", "RunResult", "RunSpec", "register_experiment", "run_experiment"]

SCALES = ("smoke", "full")


@dataclass
class Options:
    scale: str = "smoke"
    seeds: int = 1
    data_dir: str | None = None
    out: Path = Path("runs/reproduce")
    include_1202: bool = False
    # CIFAR experiments: train only these depths (of 20, 32, 44, 56, 110); None: all the paper's.
    depths: list[int] | None = None


@dataclass
class RunSpec:
    name: str
    recipe: str
    overrides: list[str]
    meta: dict = field(default_factory=dict)


@dataclass
class RunResult:
    spec: RunSpec
    run_dir: Path
    summary: dict
    metrics: list[dict]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = [(r["step"], r[key]) for r in self.metrics if r.get(key) is not None]
        return [s for s, _ in rows], [v for _, v in rows]


@dataclass
class Experiment:
    name: str
    title: str
    plan: Callable[[Options], list[RunSpec]]
    analyze: Callable[[Options, list[RunResult], Path], str]


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(experiment: Experiment) -> Experiment:
    if experiment.name in EXPERIMENTS:
        raise ValueError(f"experiment '{experiment.name}' is already registered")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


# ---------------------------------------------------------------------------------------------------------------
# Data: the CIFAR-10 JPEG folder when we can find it, else the official CIFAR-10 release.

def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def cifar_data_overrides(data_dir: str | None) -> tuple[list[str], str]:
    """Overrides selecting the CIFAR-10 data, and a sentence naming it for the report."""
    candidates = [Path(data_dir)] if data_dir else []
    if not data_dir:
        for root in (os.environ.get("DEEPRES_DATA"), _repo_root().parent / "shared" / "data", Path("data")):
            if root:
                candidates += [Path(root) / "cifar10-jpeg.tar.gz", Path(root) / "cifar10-jpeg"]
    for path in candidates:
        if path.exists():
            if (path / "cifar-10-batches-py").exists() or path.name == "cifar-10-python.tar.gz" or \
                    (path / "cifar-10-python.tar.gz").exists():
                return ([f"data.source=cifar10", f"data.data_dir={path}"],
                        f"official CIFAR-10 (python release) from `{path}`")
            return ([f"data.source=imagefolder", f"data.data_dir={path}"],
                    f"the CIFAR-10 JPEG set (`{path}`): 32x32 JPEG files at quality 75, not bit-identical to the "
                    f"official CIFAR-10 release, so errors here run a few points above the paper's and are not "
                    f"directly comparable with them")
    return ["data.source=cifar10"] + ([f"data.data_dir={data_dir}"] if data_dir else []), "official CIFAR-10"


# Smoke scale: the whole path (train, resume, analysis, report) on a CPU in minutes; numbers mean nothing.
SMOKE = [
    "train.iterations=24", "train.batch_size=32", "train.eval_batch_size=200", "data.train_subset=800",
    "data.val_size=200", "data.test_subset=200", "train.eval_every=12", "train.test_every=12", "train.log_every=4",
    "train.checkpoint_every=12", "schedule.milestones=12,18",
    "optim.lr=0.025",  # the paper's 0.1 at batch 128, scaled linearly to batch 32
]
FULL = ["train.test_every=2000"]


def scale_overrides(options: Options) -> list[str]:
    if options.scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}; got {options.scale!r}")
    return list(SMOKE if options.scale == "smoke" else FULL)


# ---------------------------------------------------------------------------------------------------------------


def _run_one(spec: RunSpec, run_dir: Path) -> dict:
    from ..engine import NonFiniteLossError, train

    done = run_dir / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = load_config(spec.recipe, spec.overrides + [f"name={spec.name}"])
    resume = "auto" if (run_dir / "checkpoints" / "last.pt").exists() else None
    print(f"[reproduce] {spec.name}: {'resuming' if resume else 'training'} in {run_dir}", flush=True)
    try:
        return train(config, run_dir, resume=resume, quiet=True)
    except NonFiniteLossError as exc:
        # A diverged run is a result (plain nets can diverge), not a reason to stop the reproduction.
        summary = {"run_dir": str(run_dir), "model": config.model.name, "diverged": True, "message": str(exc)}
        done.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[reproduce] {spec.name}: diverged ({exc})", flush=True)
        return summary


def environment() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"device": device, "torch": torch.__version__, "python": platform.python_version(), "deepres": __version__}


def run_experiment(name: str, options: Options) -> Path:
    """Train every run of an experiment that is not complete yet, then write ``OUT/<name>/report.md`` and plots."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment '{name}'; known: {', '.join(sorted(EXPERIMENTS))}")
    experiment = EXPERIMENTS[name]
    out = Path(options.out)
    t0 = time.time()
    results = []
    for spec in experiment.plan(options):
        run_dir = out / "runs" / spec.name
        summary = _run_one(spec, run_dir)
        results.append(RunResult(spec, run_dir, summary, read_metrics(run_dir / "metrics.jsonl")))
    report_dir = out / name
    (report_dir / "plots").mkdir(parents=True, exist_ok=True)
    body = experiment.analyze(options, results, report_dir)
    env = environment()
    train_seconds = sum(r.summary.get("elapsed_s", 0.0) for r in results)
    header = [
        f"# {experiment.title}",
        "",
        f"Command: `deepres reproduce {name} --scale {options.scale} --seeds {options.seeds}"
        + (f" --data-dir {options.data_dir}" if options.data_dir else "") + "`",
        "",
        f"Hardware: {env['device']}; software: deepres {env['deepres']}, torch {env['torch']}, "
        f"Python {env['python']}. Wall time of the runs: {train_seconds / 60:.1f} min "
        f"({len(results)} runs; this invocation {(time.time() - t0) / 60:.1f} min).",
        "",
    ]
    if options.scale == "smoke":
        header += ["**Smoke scale**: tiny schedules on data subsets, to exercise the whole path. The numbers below "
                   "say nothing about the paper's claims.", ""]
    report = report_dir / "report.md"
    report.write_text("\n".join(header) + body.rstrip() + "\n")
    return report
