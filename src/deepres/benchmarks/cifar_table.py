"""The whole of the paper's Table 6 and Fig. 6 (plain and residual nets of 20, 32, 44, 56 and 110 layers, the paper's
CIFAR-10 recipe, one seed each) on one GPU, by running the independent trainings concurrently
(``deepres.engine.concurrent``: one ``deepres train`` process each, longest first, ``--parallel`` at a time), each
with the GPU settings (captured CUDA-graph step, bf16 autocast, channels_last, the split held on the device) and the
test error every ``--eval-every`` steps for the curves.

Ours: wall seconds from the first launch to the last run's end (process start-up, reading the cached decoded data,
graph capture and the curves' evaluations all included). Reference: the same ten runs one after another with the
reference trainer (``_reference.py``: DataLoader + PIL workers, eager fp32), each measured on its first
``--reference-steps`` steps and extrapolated to the whole schedule, summed.

    deepres benchmark cifar-table                         # GPU: writes cifar-table-<device>.json, runs under --runs
    deepres benchmark cifar-table --parallel 10 --runs runs/table6-fast
    deepres benchmark cifar-table --smoke --out /tmp/r    # CPU: two tiny runs side by side
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import load_config
from ..data import load_dataset
from ..data.folders import resolve_image_source
from ..engine.concurrent import run_concurrent, training_job
from ._reference import train_reference
from .common import default_cifar_data, gpu_or_cpu, tiny_image_folder, write_result

DEPTHS = (20, 32, 44, 56, 110)
PAPER_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}  # Table 6, residual nets (plain: Fig. 6 only)
TARGET_SECONDS = 20 * 60.0  # one H100 (issue 8); the H200 we measure on has its compute rates


def depth_of(net: str) -> int:
    return int("".join(ch for ch in net if ch.isdigit()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deepres benchmark cifar-table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default=None, help="comma-separated (default plain and resnet 20..110; smoke "
                        "plain20,resnet20)")
    parser.add_argument("--data", default=None, help="CIFAR-10 image folder or .tar.gz (default the shared JPEG set)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--parallel", type=int, default=None, help="runs at once (default 5; smoke 2)")
    parser.add_argument("--iterations", type=int, default=None, help="default 64000 (smoke 4)")
    parser.add_argument("--eval-every", type=int, default=None, help="test error every N steps (default 2000)")
    parser.add_argument("--reference-steps", type=int, default=None, help="default 200 (smoke 2)")
    parser.add_argument("--workers", type=int, default=None, help="reference DataLoader workers")
    parser.add_argument("--runs", default=None, help="folder of the run folders, new (default "
                        "runs/bench-cifar-table-<date>-<time>)")
    parser.add_argument("--compile", dest="compile_mode", default=None, help="torch.compile mode for every run")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run (CI)")
    parser.add_argument("--out", default=None, help="folder for the result file (default benchmarks/results)")
    args = parser.parse_args(argv)

    device = gpu_or_cpu(args.smoke)
    nets = (args.nets or ("plain20,resnet20" if args.smoke else
                          ",".join(f"{kind}{d}" for kind in ("plain", "resnet") for d in DEPTHS))).split(",")
    iterations = args.iterations or (4 if args.smoke else 64000)
    eval_every = args.eval_every or (2 if args.smoke else 2000)
    parallel = args.parallel or (2 if args.smoke else 5)
    ref_steps = args.reference_steps or (2 if args.smoke else 200)
    workers = args.workers if args.workers is not None else (1 if args.smoke else min(16, os.cpu_count() or 1))
    tmp = tempfile.TemporaryDirectory(prefix="deepres-bench-") if args.smoke else None
    data = args.data or (str(tiny_image_folder(Path(tmp.name) / "data")) if tmp else default_cifar_data())
    cache_dir = args.cache_dir or (str(Path(tmp.name) / "cache") if tmp else None)
    runs = Path(args.runs) if args.runs else (Path(tmp.name) / "runs" if tmp else
                                              Path(f"runs/bench-cifar-table-{time.strftime('%Y%m%d-%H%M%S')}"))
    if any((runs / net).exists() for net in nets):
        parser.error(f"{runs} already holds runs of these nets; a timed benchmark starts from scratch: choose --runs")
    batch_size, val_size = (8, 0) if args.smoke else (128, 0)  # the paper's recipe: all 50k training images
    gpu = str(device.type == "cuda").lower()
    overrides = ["data.source=imagefolder", f"data.data_dir={data}", f"train.device={device}",
                 f"train.iterations={iterations}", f"train.batch_size={batch_size}", f"data.val_size={val_size}",
                 f"train.channels_last={gpu}", f"train.cuda_graph={gpu}", "train.amp=auto",
                 f"train.test_every={eval_every}", f"train.checkpoint_every={max(eval_every, iterations // 4)}"]
    if cache_dir:
        overrides.append(f"data.cache_dir={cache_dir}")
    if args.smoke:
        overrides.append("train.eval_batch_size=16")
    # Decode (or find cached) once before the launch, so the runs only read the cache.
    load_dataset(load_config(f"paper/cifar10_{nets[0]}", overrides).data)

    if args.compile_mode:
        overrides.append(f"train.compile={args.compile_mode}")
    jobs = [training_job(net, f"paper/cifar10_{net}", overrides, runs / net, cost=depth_of(net)) for net in nets]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = run_concurrent(jobs, parallel)
    ours = time.perf_counter() - start
    failed = [r for r in results if r.returncode != 0]
    if failed:
        for r in failed:
            print(f"{r.name} failed; last lines of {r.log}:\n" + "".join(r.log.read_text().splitlines(True)[-20:]),
                  file=sys.stderr)
        return 1

    table = {}
    for r in results:
        summary = json.loads((runs / r.name / "summary.json").read_text())
        depth = depth_of(r.name)
        table[r.name] = {"test_top1_error": summary["test_top1_error"], "process_seconds": r.seconds,
                         "train_seconds": summary["train_seconds"], "peak_memory_mib": summary["peak_memory_mib"],
                         "step": summary["step"], "amp": summary["amp"],
                         "paper_test_error": PAPER_ERROR.get(depth) if r.name.startswith("resnet") else None}

    root = resolve_image_source(data, cache_dir)
    reference, ref_rows = 0.0, {}
    for net in nets:
        ref = train_reference(net, root, device, iterations=iterations, timed_steps=ref_steps, batch_size=batch_size,
                              workers=workers, val_size=val_size)
        reference += ref["seconds"]
        ref_rows[net] = {"seconds": ref["seconds"], "seconds_per_step": ref["seconds_per_step"]}

    metric = (f"wall seconds for {len(nets)} trainings of the paper's CIFAR-10 recipe ({iterations} iterations, "
              f"batch {batch_size}, test error every {eval_every} steps); ours: {parallel} concurrent deepres train "
              f"processes on one device ({table[nets[0]]['step']} step, {table[nets[0]]['amp']} autocast); reference: "
              f"the same runs one after another, DataLoader + PIL workers, eager "
              f"fp32, each measured on {ref_steps} steps and extrapolated; lower is better, ratio = reference / ours")
    write_result("cifar-table", device, metric, ours, reference, higher_is_better=False,
                 target={"seconds_max": TARGET_SECONDS}, out=args.out,
                 meets_target=device.type == "cuda" and iterations == 64000 and len(nets) == 10
                 and ours <= TARGET_SECONDS,
                 parallel=parallel, iterations=iterations, runs_dir=str(runs), table=table, reference_runs=ref_rows,
                 reference_extrapolated=ref_steps < iterations,
                 peak_memory_mib_ours=max((row["peak_memory_mib"] or 0) for row in table.values()) or None)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
