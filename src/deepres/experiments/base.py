"""An experiment is a list of training runs plus the analysis that turns their logs into a report.

Runs live in ``OUT/runs/<run name>``; a run with a ``summary.json`` is complete and skipped, an interrupted one resumes
from its ``last.pt``, so a killed reproduction continues where it stopped. Runs are shared between experiments with
the same ``--out`` (Table 6 and Fig. 6 train the same residual nets).

Every run is an ordinary ``deepres train`` run (:func:`deepres.engine.train`). ``--parallel N`` runs N of them at a
time as separate processes (:mod:`deepres.engine.concurrent`; default 5 on a GPU, whose capacity the paper's narrow
CIFAR nets leave mostly idle, and 1 on a CPU, in this process). On a CUDA GPU a run whose settings allow it takes the
captured step (``train.cuda_graph=true``); ``--set`` overrides every run's config last (e.g. ``train.amp=bf16``).
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

from ..config import ConfigError, load_config
from ..engine.logging import read_metrics
from ..version import __version__

__all__ = ["EXPERIMENTS", "Experiment", "Options", "RunResult", "RunSpec", "register_experiment", "run_experiment"]

SCALES = ("smoke", "laptop", "full")


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
    parallel: int | None = None  # runs at once, each its own process; None: 5 on a GPU, 1 on a CPU (in-process)
    # key=value overrides applied to every run's config, after the experiment's own.
    overrides: list[str] = field(default_factory=list)


GPU_PARALLEL = 5  # the paper's CIFAR nets leave most of a large GPU idle: five side by side (benchmark cifar-table)


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
    shortens: bool = False  # takes Options.iterations (the paper's multistep CIFAR schedule)
    scales: tuple[str, ...] = ("smoke", "full")


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(experiment: Experiment) -> Experiment:
    if experiment.name in EXPERIMENTS:
        raise ValueError(f"experiment '{experiment.name}' is already registered")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


# ---------------------------------------------------------------------------------------------------------------
# Data: the CIFAR-10 JPEG folder when we can find it, else the official CIFAR-10 release.

def find_cifar10_jpeg() -> Path | None:
    """The CIFAR-10 JPEG set (``cifar10-jpeg.tar.gz`` or its extracted folder) in $DEEPRES_DATA, ``../shared/data``
    or ``./data`` (relative to the working directory), or None."""
    for root in (os.environ.get("DEEPRES_DATA"), Path.cwd().parent / "shared" / "data", Path("data")):
        for name in ("cifar10-jpeg.tar.gz", "cifar10-jpeg"):
            if root and (Path(root) / name).exists():
                return Path(root) / name
    return None


def _as_seen_from_here(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def cifar_data_overrides(data_dir: str | None) -> tuple[list[str], str]:
    """Overrides selecting the CIFAR-10 data, and a sentence naming it for the report (the path as seen from the
    working directory, so a report does not carry the machine's folder layout)."""
    found = find_cifar10_jpeg() if not data_dir else None
    candidates = [Path(data_dir)] if data_dir else [found] if found else []
    for path in candidates:
        if path.exists():
            shown = _as_seen_from_here(path)
            if (path / "cifar-10-batches-py").exists() or path.name == "cifar-10-python.tar.gz" or \
                    (path / "cifar-10-python.tar.gz").exists():
                return (["data.source=cifar10", f"data.data_dir={path}"],
                        f"official CIFAR-10 (python release) from `{shown}`")
            return (["data.source=imagefolder", f"data.data_dir={path}"],
                    f"the CIFAR-10 JPEG set (`{shown}`): 32x32 JPEG files at quality 75, not bit-identical to the "
                    f"official CIFAR-10 release, so errors here run a few points above the paper's and are not "
                    f"directly comparable with them")
    return ["data.source=cifar10"] + ([f"data.data_dir={data_dir}"] if data_dir else []), "official CIFAR-10"


# Smoke scale: the whole path (train, resume, analysis, report) on a CPU in minutes; numbers mean nothing.
SMOKE = [
    "train.iterations=24", "train.batch_size=32", "train.eval_batch_size=200", "data.train_subset=800",
    "data.test_subset=200", "train.eval_every=12", "train.test_every=12", "train.log_every=4",
    "train.checkpoint_every=12", "schedule.milestones=12,18",
    "optim.lr=0.025",  # the paper's 0.1 at batch 128, scaled linearly to batch 32
]
FULL = ["train.test_every=2000"]
# Laptop: the paper's recipe on all 50k training images, the schedule shortened to LAPTOP_ITERATIONS (lr /10 at 1/2
# and 3/4, as 32k and 48k of 64k), bf16 autocast and channels_last where the CPU computes bf16 natively (fp32
# elsewhere: train.amp=auto). Chosen from measured step times on a 2-core AMD EPYC (Zen 4, AVX512-BF16): ResNet-20
# 0.14 s, ResNet-56 0.37 s, plain-20 0.12 s, plain-56 0.39 s per batch of 128 (deepres benchmark cpu-train), so the
# four nets of Fig. 6 take about an hour; the test curve has twelve points.
LAPTOP_ITERATIONS = 3000


# The laptop scale warms the learning rate up linearly from 0.01 to 0.1 over the first 5% of the run (150 of 3,000
# iterations). Without it ResNet-56 did not start converging at 0.1 on the CIFAR-10 JPEG set: its loss rose to 6-18
# within ten steps and stayed at chance (2.30) for the 650 steps watched, for 4 of 4 seeds, in our loop and in an
# independent 30-line PyTorch loop alike; with it the loss was 1.46 at step 300 (ResNet-20 without: 1.47). The paper
# warms ResNet-110 up for the same reason (section 4.2); every net of a laptop run gets the same warm-up.
LAPTOP_WARMUP = ["schedule.warmup_iterations=0.05", "schedule.warmup_lr=0.01"]


def laptop_schedule(iterations: int = LAPTOP_ITERATIONS) -> list[str]:
    every = max(1, iterations // 12)
    return [f"train.iterations={iterations}", f"schedule.milestones={iterations // 2},{iterations * 3 // 4}",
            *LAPTOP_WARMUP,
            f"train.test_every={every}", f"train.eval_every={every}", f"train.checkpoint_every={every}",
            f"train.log_every={max(1, min(50, every // 5))}", "train.amp=auto", "train.channels_last=true"]


def scale_overrides(options: Options) -> list[str]:
    if options.scale not in SCALES:
        raise ValueError(f"--scale must be one of {', '.join(SCALES)}; got {options.scale!r}")
    return list({"smoke": SMOKE, "laptop": laptop_schedule(), "full": FULL}[options.scale])


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
    if options.parallel:
        parts.append(f"--parallel {options.parallel}")
    parts += [f"--set {item}" for item in options.overrides]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------


def run_overrides(spec: RunSpec, options: Options, gpu: bool) -> list[str]:
    """The overrides a run trains with: the experiment's, the captured step on a GPU when the run allows it, then
    the user's ``--set``."""
    overrides = spec.overrides + [f"name={spec.name}"]
    if gpu:
        try:
            load_config(spec.recipe, overrides + ["train.cuda_graph=true"] + options.overrides)
            overrides.append("train.cuda_graph=true")
        except ConfigError:
            pass  # a setting the captured step refuses: this run stays eager
    return overrides + list(options.overrides)


def _check_same_run(config, run_dir: Path) -> None:
    """A run folder is reused (skipped when finished, resumed when not) only for the config it was trained with;
    anything else (another scale, schedule, seed or recipe under the same --out) is refused, naming the keys."""
    from ..config import config_differences

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    differences = config_differences(load_config(saved), config)
    if differences:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(differences.items())[:5])
        raise ValueError(f"{run_dir} holds a run of another configuration ({shown}); choose another --out for this "
                         f"one, or remove that run folder")


def train_or_resume(config, run_dir: Path, quiet: bool = True) -> dict:
    """Train a run in this process: a complete one (``summary.json``) is skipped, an interrupted one resumed; a run
    whose loss became NaN/inf is a result (plain nets can diverge): its summary says ``diverged``."""
    from ..engine import NonFiniteLossError, train

    done = run_dir / "summary.json"
    _check_same_run(config, run_dir)
    if done.is_file():
        return json.loads(done.read_text())
    resuming = (run_dir / "checkpoints" / "last.pt").exists()
    print(f"[reproduce] {run_dir.name}: {'resuming' if resuming else 'training'} in {run_dir}", flush=True)
    t0 = time.time()
    try:  # auto: a checkpoint continues; without one (killed before it) the run starts afresh in its folder
        summary = train(config, run_dir, resume="auto", quiet=quiet)
    except NonFiniteLossError as exc:
        print(f"[reproduce] {run_dir.name}: diverged ({exc})", flush=True)
        return json.loads(done.read_text())
    print(f"[reproduce] {run_dir.name}: done in {(time.time() - t0) / 60:.1f} min, test error "
          f"{summary['test_top1_error']:.2f}%", flush=True)
    return summary


def measured_step_seconds(config, steps: int = 3) -> float:
    """Seconds per training step of ``config``'s model at its batch size, precision and memory format on the CPU
    (random 32x32 batches): what the expected duration of a laptop-scale reproduction is computed from."""
    from ..engine.optim import build_optimizer
    from ..engine.steps import EagerStep, Precision
    from ..runs import build_model
    from ..tasks import ClassificationTask

    device = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        model = build_model(config.model, 10, 3)
        if config.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        step = EagerStep(model, model.train(), ClassificationTask(), build_optimizer(model, config.optim, device),
                         Precision(config.train.amp, device))
        x = torch.randn(config.train.batch_size, 3, 32, 32)
        if config.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (config.train.batch_size,))
        step(x, y)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        return (time.perf_counter() - t0) / steps


def print_expected_duration(configs: list) -> float:
    """Measure each model's step time once and print how long training the runs should take (minutes)."""
    seconds, measured = 0.0, {}
    for config in configs:
        key = (config.model.name, config.train.batch_size, config.train.amp, config.train.channels_last)
        if key not in measured:
            measured[key] = measured_step_seconds(config)
        seconds += measured[key] * config.train.iterations * 1.1  # + evaluation and logging, measured at about 10%
    times = ", ".join(f"{k[0]} {v:.2f} s" for k, v in measured.items())
    print(f"[reproduce] {len(configs)} runs to train; measured seconds per step: {times}; expected about "
          f"{seconds / 60:.0f} min", flush=True)
    return seconds / 60


def _run_concurrently(runs: list[tuple[RunSpec, Path, list[str]]], parallel: int) -> None:
    """Train ``runs`` (spec, folder, overrides) as ``deepres train`` processes, ``parallel`` at a time, largest
    first. Each data source is decoded here once before they start: first decodes side by side would race on the
    extraction cache."""
    from ..data import load_dataset
    from ..engine.concurrent import run_concurrent, training_job
    from ..engine.loop import EXIT_DIVERGED

    jobs, sources = [], set()
    for spec, run_dir, overrides in runs:
        config = load_config(spec.recipe, overrides)
        source = (config.data.source, config.data.data_dir, config.data.cache_dir)
        if source not in sources:
            sources.add(source)
            load_dataset(config.data)
        cost = float(spec.meta.get("depth", 1)) * config.train.iterations
        jobs.append(training_job(spec.name, spec.recipe, overrides, run_dir, cost))
    print(f"[reproduce] {len(jobs)} runs as `deepres train` processes, {parallel} at a time", flush=True)
    failed = [r for r in run_concurrent(jobs, parallel)
              if not (r.returncode in (0, EXIT_DIVERGED) and (r.log.parent / "summary.json").is_file())]
    if failed:
        tails = "\n".join(f"--- {r.name} (exit {r.returncode}), last lines of {r.log}:\n"
                          + "".join(r.log.read_text().splitlines(True)[-15:]) for r in failed)
        raise RuntimeError(f"{len(failed)} run(s) failed; completed runs are kept and skipped when the command is "
                           f"run again.\n{tails}")


def _waves(planned: list[tuple[RunSpec, Path, list[str]]]) -> list[list]:
    """The planned runs in waves that can train side by side: a run that starts from another's checkpoint (a
    teacher, ``model.init``) goes in a wave after that run's (plans list a run's dependencies before it)."""
    waves: list[list] = []
    for item in planned:
        needs = [o.split("=", 1)[1] for o in item[2] if o.split("=", 1)[0] in ("task.teacher", "model.init")]
        wave = 0
        for i, previous in enumerate(waves):
            if any(str(p[1] / "checkpoints") in path for p in previous for path in needs):
                wave = i + 1
        while len(waves) <= wave:
            waves.append([])
        waves[wave].append(item)
    return waves


def environment() -> dict:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        from ..engine.steps import cpu_description

        cpu = cpu_description()
        device = (f"{cpu['cpu_model']}, {cpu['cores']} cores (flags: {', '.join(cpu['cpu_flags']) or 'none of note'}; "
                  f"native bf16: {'yes' if cpu['native_bf16'] else 'no'})")
    return {"device": device, "torch": torch.__version__, "python": platform.python_version(), "deepres": __version__}


def _precision(summary: dict) -> str:
    fp32 = "fp32 (no TF32)" if summary.get("tf32") is False else "fp32"  # tf32 is recorded on CUDA only
    return {"off": fp32, None: fp32}.get(summary.get("amp"), summary.get("amp"))


def run_settings(summary: dict) -> str:
    """What one run computed with, from its summary: step kind, precision, memory format."""
    return f"{summary.get('step', 'eager')} step, {_precision(summary)}" + (
        ", channels_last" if summary.get("channels_last") else "")


def engine_line(results: list[RunResult], parallel: int) -> str:
    """How the runs trained: the step kinds, precisions and memory formats their summaries record."""
    settings: dict[str, int] = {}
    for r in results:
        s = r.summary
        if s.get("diverged"):
            key = "diverged"
        else:
            key = run_settings(s)
        settings[key] = settings.get(key, 0) + 1
    how = "one after another in this process" if parallel == 1 else f"{parallel} processes at a time"
    return (f"Engine: the training loop (`deepres train`), {len(results)} runs, {how}: "
            + "; ".join(f"{key} ({count})" for key, count in settings.items()) + ".")


def run_experiment(name: str, options: Options) -> Path:
    """Train every run of an experiment that is not complete yet, then write ``OUT/<name>/report.md`` and plots."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment '{name}'; known: {', '.join(sorted(EXPERIMENTS))}")
    experiment = EXPERIMENTS[name]
    if options.scale not in experiment.scales:
        raise ValueError(f"--scale {options.scale}: '{name}' runs at {', '.join(experiment.scales)}")
    if options.iterations and not experiment.shortens:
        raise ValueError(f"--iterations applies to the CIFAR paper experiments, not to '{name}'")
    out = Path(options.out)
    t0 = time.time()
    gpu = torch.cuda.is_available()
    parallel = options.parallel or (GPU_PARALLEL if gpu else 1)
    planned = [(spec, out / "runs" / spec.name, run_overrides(spec, options, gpu))
               for spec in experiment.plan(options)]
    configs = {spec.name: load_config(spec.recipe, overrides) for spec, _, overrides in planned}  # checked first
    for spec, run_dir, _ in planned:
        _check_same_run(configs[spec.name], run_dir)
    todo = [configs[spec.name] for spec, run_dir, _ in planned if not (run_dir / "summary.json").is_file()]
    earlier = len(planned) - len(todo)  # runs an earlier invocation finished
    if options.scale == "laptop" and todo and not gpu:
        print_expected_duration(todo)
    if parallel > 1:
        for wave in _waves(planned):
            todo = [item for item in wave if not (item[1] / "summary.json").is_file()]
            if todo:
                _run_concurrently(todo, parallel)
    results = []
    for spec, run_dir, overrides in planned:
        summary = train_or_resume(configs[spec.name], run_dir)
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
        f"({len(results)} runs{f', {earlier} of them finished by an earlier invocation' if earlier else ''}; "
        f"this invocation {(time.time() - t0) / 60:.1f} min).",
        "",
        engine_line(results, parallel),
        "",
    ]
    if options.scale == "smoke":
        header += ["**Smoke scale**: tiny schedules on data subsets, to exercise the whole path. The numbers below "
                   "say nothing about the paper's claims.", ""]
    elif options.iterations or (options.scale == "laptop" and experiment.shortens):
        n = options.iterations or LAPTOP_ITERATIONS
        warmup = (f", after a linear warm-up from 0.01 over the first {n // 20:,} iterations (without it ResNet-56 "
                  "did not start converging at lr 0.1: see `laptop_schedule`)") if options.scale == "laptop" else ""
        header += [f"**{'Laptop scale' if options.scale == 'laptop' else 'Shortened schedule'}**: {n:,} iterations "
                   f"instead of the paper's 64,000 (batch 128, learning rate /10 at {n // 2:,} and {n * 3 // 4:,}"
                   f"{warmup}). Errors are higher than a full run's; the comparisons between nets are what this run "
                   "shows.", ""]
    elif options.scale == "laptop":
        counts = sorted({int(r.summary.get("iterations") or 0) for r in results if not r.summary.get("diverged")})
        header += [f"**Laptop scale**: runs of {' or '.join(f'{n:,}' for n in counts)} iterations on a CPU (see each "
                   "method's runs below), far shorter than the full scale; the comparisons, with their seed spread, "
                   "are what these runs show.", ""]
    report = report_dir / "report.md"
    report.write_text("\n".join(header) + "\n" + body.strip() + "\n\n" + runs_section(results, options.scale) + "\n")
    return report


def runs_section(results: list[RunResult], scale: str) -> str:
    """The runs a report used, each with its scale, iterations, batch, training images, seed, precision, wall time
    and test error: what the numbers above come from."""
    def number(value) -> str:
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["## Runs used", "", "| run | scale | iterations | batch | training images | seed | precision | "
             "wall time | test error % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary
        try:
            config = load_config(r.run_dir / "config.yaml")
            batch, seed = config.train.batch_size, config.train.seed
            images = (s.get("splits") or {}).get("train", config.data.train_subset or "all")
        except (OSError, ValueError):
            batch = seed = images = "?"
        error = "diverged" if s.get("diverged") else f"{s['test_top1_error']:.2f}"
        lines.append(f"| {r.run_dir.name} | {scale} | {number(s.get('iterations', '?'))} | {batch} | {number(images)} "
                     f"| {seed} | {_precision(s)} | {s.get('elapsed_s', 0.0) / 60:.1f} min | {error} |")
    return "\n".join(lines)
