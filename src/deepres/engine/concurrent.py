"""Independent trainings run side by side on one machine, one process each.

The paper's CIFAR nets leave most of a large GPU idle (narrow layers, batch 128), so the ten runs of Table 6 and
Fig. 6 finish sooner together than one after another. Each run is its own process with its own CUDA context: the
GPU interleaves their work (time slicing; with the CUDA MPS daemon running, their kernels also overlap), and each
process's host-side launching runs on its own core. Jobs start longest first, at most ``parallel`` at a time, so the
longest run does not start last.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import available_cores

__all__ = ["Job", "JobResult", "run_concurrent", "training_job"]


@dataclass
class Job:
    """One process: ``argv`` (run as given), its combined output written to ``log``."""

    name: str
    argv: list[str]
    log: Path
    cost: float = 1.0  # expected duration, any unit: the order of starting (largest first)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class JobResult:
    name: str
    returncode: int
    seconds: float
    log: Path


def job_threads(processes: int) -> int:
    """Intra-op threads for each of ``processes`` concurrent jobs: OMP_NUM_THREADS when set to a positive number (the
    caller's choice per process), else this process's cores shared out."""
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        threads = 0
    return threads if threads > 0 else max(1, available_cores() // max(1, processes))


def run_concurrent(jobs: list[Job], parallel: int, threads_per_job: int | None = None,
                   poll_seconds: float = 0.1, echo: bool = True) -> list[JobResult]:
    """Run ``jobs``, at most ``parallel`` at once, largest ``cost`` first; returns their results in ``jobs`` order.

    A failed job does not stop the others (its return code and log are in its result). ``threads_per_job`` sets
    OMP_NUM_THREADS for each process; by default an OMP_NUM_THREADS already set here is each job's (as torchrun
    reads it), else the cores this process may use are shared out, so CPU thread pools do not oversubscribe.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1; got {parallel}")
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique; got {names}")
    threads = threads_per_job or job_threads(min(parallel, max(1, len(jobs))))
    waiting = sorted(jobs, key=lambda job: -job.cost)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    results: dict[str, JobResult] = {}
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                job = waiting.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.log, "a")  # a resumed run appends: no log is lost
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), **job.env}
                proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[job.name] = (proc, time.perf_counter(), log)
            for name, (proc, start, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                job = next(j for j in jobs if j.name == name)
                results[name] = JobResult(name, code, time.perf_counter() - start, job.log)
                del running[name]
                if echo:
                    status = "done" if code == 0 else f"FAILED (exit {code}, see {job.log})"
                    print(f"{name}: {status} in {results[name].seconds:.1f} s", flush=True)
            if running:
                time.sleep(poll_seconds)
    finally:
        for proc, _, log in running.values():  # interrupted: stop what this call started
            proc.terminate()
            proc.wait()
            log.close()
    return [results[name] for name in names]


def training_job(name: str, recipe: str, overrides: list[str], run_dir: Path, cost: float = 1.0) -> Job:
    """``deepres train`` of ``recipe`` with ``overrides`` in ``run_dir`` as a Job, resuming the folder's checkpoint
    if it has one (log: ``run_dir/train.log``)."""
    argv = [sys.executable, "-m", "deepres", "train", "--recipe", recipe, "--run-dir", str(run_dir), "--resume", "auto"]
    for item in overrides:
        argv += ["--set", item]
    return Job(name, argv, Path(run_dir) / "train.log", cost)
