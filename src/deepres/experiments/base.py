"""An experiment is a list of training runs plus the analysis that turns their logs into a report.

Runs live in ``OUT/runs/<run name>``; a run with a ``summary.json`` is complete and skipped, an interrupted one resumes
from its ``last.pt``, so a killed reproduction continues where it stopped. Runs are shared between experiments with
the same ``--out`` (Table 6 and Fig. 6 train the same residual nets).

Engines: the training loop (:func:`deepres.engine.train`, checkpoints every ``train.checkpoint_every`` steps) or, for
runs that allow it (the paper's CIFAR recipes), the fast path (:mod:`deepres.engine.fast`: data on the device, CUDA
graph, bf16, channels_last), several runs side by side as separate processes (:mod:`deepres.engine.concurrent`).
``--engine auto`` takes the fast path when a GPU is present. A fast run keeps only its final checkpoint, so an
interrupted one starts again from step 0; a run that already has a loop checkpoint is always finished by the loop.
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
    # CIFAR paper experiments: a shortened schedule of this many iterations (learning-rate drops at the paper's
    # fractions, 1/2 and 3/4); None: the scale's schedule (64,000 at full scale).
    iterations: int | None = None
    engine: str = "auto"  # "auto" (fast path on a GPU), "loop" or "fast" (also on a CPU)
    parallel: int | None = None  # fast-path runs at once; None: 5 on a GPU, 1 on a CPU


ENGINES = ("auto", "loop", "fast")
GPU_PARALLEL = 5  # the paper's CIFAR nets leave most of an H100 idle: five side by side (benchmark cifar-table)


@dataclass
class RunSpec:
    name: str
    recipe: str
    overrides: list[str]
    meta: dict = field(default_factory=dict)
    fast: bool = False  # the fast path may train it (classification on in-memory data; see deepres.engine.fast)


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
    shortens: bool = False  # takes Options.iterations (the paper's multistep CIFAR schedule)


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


def shortened_schedule(iterations: int) -> list[str]:
    """The paper's CIFAR schedule (64k iterations, lr /10 at 32k and 48k) compressed to ``iterations``, with test
    curves, validation and checkpoints every eighth of the run."""
    if iterations < 8:
        raise ValueError(f"--iterations must be at least 8; got {iterations}")
    every = iterations // 8
    return [f"train.iterations={iterations}", f"schedule.milestones={iterations // 2},{iterations * 3 // 4}",
            f"train.test_every={every}", f"train.eval_every={every}", f"train.checkpoint_every={every}",
            f"train.log_every={max(1, min(100, every // 4))}"]


def command_line(name: str, options: Options) -> str:
    """The ``deepres reproduce`` command that ``options`` stand for."""
    parts = [f"deepres reproduce {name} --scale {options.scale} --seeds {options.seeds}"]
    if options.data_dir:
        parts.append(f"--data-dir {options.data_dir}")
    if options.depths:
        parts.append("--depths " + ",".join(str(d) for d in options.depths))
    if options.include_1202:
        parts.append("--include-1202")
    if options.iterations:
        parts.append(f"--iterations {options.iterations}")
    if options.engine != "auto":
        parts.append(f"--engine {options.engine}")
    if options.parallel:
        parts.append(f"--parallel {options.parallel}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------


def _run_config(spec: RunSpec):
    return load_config(spec.recipe, spec.overrides + [f"name={spec.name}"])


def _run_one(spec: RunSpec, run_dir: Path) -> dict:
    from ..engine import NonFiniteLossError, train

    done = run_dir / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = _run_config(spec)
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


def _fast_config(spec: RunSpec, run_dir: Path, options: Options, gpu: bool):
    """The run's config when it goes to the fast path (the engine asks for it, the run allows it, and no loop run is
    under way in its folder: that one resumes from its checkpoint); None when the loop trains it."""
    from ..config import ConfigError
    from ..engine.fast import check_fast_supported

    if options.engine == "loop" or (options.engine == "auto" and not gpu) or not spec.fast:
        return None
    if (run_dir / "summary.json").is_file() or (run_dir / "checkpoints" / "last.pt").exists():
        return None
    config = _run_config(spec)
    try:
        check_fast_supported(config)
    except ConfigError:
        return None
    return config


def _run_fast(runs: list[tuple[RunSpec, Path, object]], options: Options, gpu: bool) -> None:
    """Train ``runs`` (spec, folder, config) on the fast path, ``options.parallel`` processes at a time, largest
    nets first."""
    from ..data import load_dataset
    from ..engine.concurrent import fast_training_job, run_concurrent
    from ..engine.fast import DIVERGED_EXIT

    parallel = options.parallel or (GPU_PARALLEL if gpu else 1)
    jobs, sources = [], set()
    for spec, run_dir, config in runs:
        source = (config.data.source, config.data.data_dir, config.data.cache_dir)
        if source not in sources:  # extract and decode once here: first decodes side by side would race on the cache
            sources.add(source)
            load_dataset(config.data)
        extra = ["--eval-every", str(config.train.test_every), "--log-every", str(config.train.log_every)]
        cost = float(spec.meta.get("depth", 1)) * config.train.iterations
        jobs.append(fast_training_job(spec.name, spec.recipe, spec.overrides + [f"name={spec.name}"], run_dir, cost,
                                      extra))
    print(f"[reproduce] {len(jobs)} runs on the fast path, {parallel} at a time", flush=True)
    failed = [r for r in run_concurrent(jobs, parallel)
              if not (r.returncode in (0, DIVERGED_EXIT) and (r.log.parent / "summary.json").is_file())]
    if failed:
        tails = "\n".join(f"--- {r.name} (exit {r.returncode}), last lines of {r.log}:\n"
                          + "".join(r.log.read_text().splitlines(True)[-15:]) for r in failed)
        raise RuntimeError(f"{len(failed)} fast-path run(s) failed; completed runs are kept and skipped when the "
                           f"command is run again.\n{tails}")


def environment() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"device": device, "torch": torch.__version__, "python": platform.python_version(), "deepres": __version__}


def _engine_line(results: list[RunResult]) -> str:
    fast = sum(1 for r in results if r.summary.get("engine") == "fast")
    if not fast:
        return f"Engine: the training loop (`deepres train`) for all {len(results)} runs."
    modes = sorted({f"{r.summary.get('amp', 'off')} autocast" + (", CUDA graph" if r.summary.get("cuda_graph") else "")
                    + (", channels_last" if r.summary.get("channels_last") else "")
                    for r in results if r.summary.get("engine") == "fast" and not r.summary.get("diverged")})
    return (f"Engine: the fast path (`deepres.engine.fast`: data on the device, {'; '.join(modes) or 'diverged'}) "
            f"for {fast} of {len(results)} runs, the training loop for the rest. Its batches are drawn from its own "
            f"random stream, so its numbers match the loop's in distribution, not bit for bit.")


def run_experiment(name: str, options: Options) -> Path:
    """Train every run of an experiment that is not complete yet, then write ``OUT/<name>/report.md`` and plots."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment '{name}'; known: {', '.join(sorted(EXPERIMENTS))}")
    experiment = EXPERIMENTS[name]
    if options.iterations and not experiment.shortens:
        raise ValueError(f"--iterations applies to the CIFAR paper experiments, not to '{name}'")
    if options.engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}; got {options.engine!r}")
    out = Path(options.out)
    t0 = time.time()
    gpu = torch.cuda.is_available()
    planned = [(spec, out / "runs" / spec.name) for spec in experiment.plan(options)]
    fast = [(spec, run_dir, config) for spec, run_dir in planned
            if (config := _fast_config(spec, run_dir, options, gpu)) is not None]
    if fast:
        _run_fast(fast, options, gpu)
    results = []
    for spec, run_dir in planned:
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
        f"Command: `{command_line(name, options)}`",
        "",
        f"Hardware: {env['device']}; software: deepres {env['deepres']}, torch {env['torch']}, "
        f"Python {env['python']}. Wall time of the runs: {train_seconds / 60:.1f} min "
        f"({len(results)} runs; this invocation {(time.time() - t0) / 60:.1f} min).",
        "",
        _engine_line(results),
        "",
    ]
    if options.scale == "smoke":
        header += ["**Smoke scale**: tiny schedules on data subsets, to exercise the whole path. The numbers below "
                   "say nothing about the paper's claims.", ""]
    elif options.iterations:
        header += [f"**Shortened schedule**: {options.iterations:,} iterations instead of the paper's 64,000 (batch "
                   f"128, learning rate /10 at {options.iterations // 2:,} and {options.iterations * 3 // 4:,}). "
                   "Errors are higher than a full run's; the comparisons between nets are what this run shows.", ""]
    report = report_dir / "report.md"
    report.write_text("\n".join(header) + body.rstrip() + "\n")
    return report
