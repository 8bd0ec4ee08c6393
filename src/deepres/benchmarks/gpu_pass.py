"""The GPU evidence pass: one prepared command that turns a lent GPU's few minutes into committed results.

On the GPU machine (its own ``python3`` with PyTorch; nothing is installed: the project runs from the tree)::

    make gpu-check ARGS="--data .gpu/cifar10-jpeg.tar.gz --out $OUT"

Items run in priority order, each a subprocess with its own timeout, inside ``--budget-s`` (default 480 s): an item
that will not fit is skipped and recorded, a failing or timed-out one is recorded with its error and the next one
runs. After every item the pass folder is packed again into ``OUT/gpu-pass.tar.gz`` (one archive, under 16 MiB; the
checkpoints that do not fit go into up to six ``gpu-pass-weights-N.tar`` beside it), so a pass killed at its limit
still returns what it finished. A summary table is printed last.

1. ``env``: GPU, driver, clocks, torch / torchvision / CUDA / cuDNN versions, CPU;
2. ``cuda-tests``: ``tests/test_cuda.py`` (captured step against eager steps, bf16 + channels_last, compiled step,
   exact resume, NCCL DDP through torchrun, the loader's batches on the GPU);
   ``cifar-steps``: ResNet-20, 56 and 110 each alone on the GPU for 1,300 steps of the paper's recipe with the fast
   settings: the steady seconds per step, and the recipe's wall time for one run alone projected from them (a
   projection, in case ``cifar-full`` does not get to finish a run alone in this pass);
3. ``imagenet-throughput`` (ResNet-50, ours against torchvision eager AMP) and ``inference``;
4. ``cifar-full``: the paper's CIFAR recipe at full length (64k iterations) for ResNet-20, ResNet-56, plain-20 and
   plain-56 with the fast settings (bf16, captured step, channels_last), ResNet-20 with the paper's fp32 and
   ResNet-56 with a warm-up beside them, as ``deepres train`` processes, test error every 2,000 iterations. The
   reference trainer's step time is measured first; then ResNet-20 and ResNet-56 train each alone on the GPU, and
   each that finishes writes its ``cifar-recipe`` file (the recipe's wall time against the reference: the issue's
   targets); then the other runs train side by side. Run folders resume: a pass cut short returns checkpoints
   (every 2,000 iterations, and at the stop) that the next pass continues from (``--resume-from``, default
   ``docs/results/full/runs``, where ``unpack`` puts them); runs an earlier pass finished are not trained again,
   and a run timed alone that a pass cut short starts again from scratch (twice at most);
5. ``cifar-speedrun``, ``jpeg-pipeline``, ``augment`` (the batched augmentation policies against torchvision's
   per-image transforms);
6. ``cifar-rest``: the other Table 6 depths (32, 44, 110) and their plain nets, with what budget is left (ResNet-110
   alone first, for its ``cifar-recipe`` file).

This is the issue's order. The items before ``cifar-full`` are short and complete in one pass; ``cifar-full`` (six
runs of 64k iterations on one GPU) may not, and continues in the next. An item whose result is already committed
is skipped (its result file for this device in ``benchmarks/results/``, unless marked unfinished, or its runs
finished in ``--resume-from``; the CUDA tests when an earlier pass's record shows all of them passed on this device
with the same Python sources; ``--redo`` runs it again), so a later pass spends its minutes on what is missing.

Back here, ``python -m deepres.benchmarks.gpu_pass unpack gpu-pass.tar.gz`` puts the result files into
``benchmarks/results/``, the runs and the pass's logs into ``docs/results/full/``, and regenerates the Fig. 6 and
Table 6 reports there from the returned runs when they are complete, and ``precision/report.md`` (bf16 against fp32,
the paper's start against a warm-up). ``--smoke`` runs the whole pass on a CPU at tiny sizes (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ARCHIVE = "gpu-pass.tar.gz"
# Checkpoints that did not fit into the archive: up to EXTRA_FILES uncompressed tars beside it, gpu-pass-weights-1.tar
# and on (8 files come back from the GPU machine; one is left spare). Float weights barely compress.
EXTRA = "gpu-pass-weights-{}.tar"
EXTRA_FILES = 6
ARCHIVE_LIMIT = 16 * 2**20  # bytes: the largest file that comes back from the GPU machine
TAR_ENTRY_BYTES = 4096  # a tar member's header, padding and its folders' entries, at most (paths under 100 characters)
SCRATCH = Path(tempfile.gettempdir()) / "deepres-gpu-pass"  # decoded-data cache, smoke data: never packed
PACK_RESERVE_S = 20.0  # kept back from the budget for the last packing
RESUME_FROM = str(Path("docs") / "results" / "full" / "runs")  # where unpack puts the runs, and the next pass reads
FAST = ["train.amp=bf16", "train.cuda_graph=true", "train.channels_last=true"]
FULL_NETS = ["resnet20", "resnet56", "plain20", "plain56"]
REST_NETS = ["resnet32", "resnet44", "resnet110", "plain32", "plain44", "plain110"]
FP32_RUN = "cifar10-resnet20-fp32-s0"
# ResNet-56 once more with a linear lr warm-up (0.01 -> 0.1 over the first 1% of the run, 640 iterations): on the CPU
# the paper's recipe did not start converging at 0.1 for ResNet-56 (4 of 4 seeds stayed at chance for 650 steps; see
# LAPTOP_WARMUP in experiments/base.py). The paper's run (no warm-up) stays the Fig. 6 / Table 6 entry; this one says
# whether the start, not the recipe, decides the final error.
WARMUP_RUN = "cifar10-resnet56-warmup-s0"
WARMUP = ["schedule.warmup_iterations=0.01", "schedule.warmup_lr=0.01"]
# cifar-steps: the nets timed alone, and the steps of each run: untimed (the capture, cuDNN's autotuning), then timed.
STEPS_NETS = ["resnet20", "resnet56", "resnet110"]
STEPS_WARMUP, STEPS_TIMED = 300, 1000
# The CIFAR runs' sizes in smoke mode (the full pass keeps the paper's: 64k iterations, batch 128).
SMOKE_SIZES = ["train.iterations=12", "train.batch_size=8", "train.eval_batch_size=16", "train.test_every=4",
               "train.checkpoint_every=4", "train.log_every=2", "schedule.milestones=6,9", "optim.lr=0.025"]


def precision_overrides(gpu: bool) -> list[str]:
    """The fast settings of the pass's CIFAR runs: bf16, the captured step and channels_last on a GPU; fp32 on a CPU
    (smoke)."""
    return list(FAST) if gpu else ["train.amp=off"]


@dataclass
class Item:
    """One step of the pass: ``argv`` runs as a subprocess for at most ``timeout_s`` (``smoke_s`` in smoke mode);
    it is started only when at least ``min_s`` of the budget is left."""

    name: str
    argv: list[str]
    timeout_s: float
    min_s: float = 10.0
    env: dict[str, str] = field(default_factory=dict)
    # What makes the item unnecessary once committed (an earlier pass brought it back): its result file's name before
    # ``-<device>.json``, or the run folders it trains (each finished: summary.json at full length).
    result: str | None = None
    runs: list[str] = field(default_factory=list)
    # The CUDA tests: unnecessary once an earlier pass's record shows them passed on this device with this code.
    tests_code: bool = False


def _python() -> list[str]:
    return [sys.executable]


def _run_name(net: str) -> str:
    family, depth = ("plain", net[5:]) if net.startswith("plain") else ("resnet", net[6:])
    return f"cifar10-{family}{depth}-s0"


def plan(args, work: Path) -> list[Item]:
    """The items of the pass, in priority order."""
    py, results, smoke = _python(), work / "results", args.smoke
    smoke_args = ["--smoke"] if smoke else []
    data = ["--data", args.data] if args.data else []  # the CIFAR-10 JPEG archive that travelled with the tree
    bench = lambda name, *extra: py + ["-m", "deepres", "benchmark", name, *smoke_args, "--out", str(results),  # noqa
                                       *extra]
    cifar = py + ["-m", "deepres.benchmarks.gpu_pass", "cifar", "--runs", str(work / "runs"), "--results",
                  str(results), "--resume-from", args.resume_from] + data + smoke_args
    tests = py + ["-m", "pytest", "-v", "--durations=0", "-p", "no:cacheprovider", "tests/test_cuda.py", "--junitxml",
                  str(results / "test_cuda.xml")]
    test_env = {}
    if smoke:  # the CPU check of the CUDA tests: the loader test only (the others train; the suite runs them)
        tests += ["-k", "device_loader"]
        test_env = {"DEEPRES_TEST_DEVICE": "cpu"}
    model = "resnet18" if smoke else "resnet50"  # the throughput benchmarks' net
    rest = REST_NETS[:1] if smoke else REST_NETS
    items = [
        Item("env", py + ["-m", "deepres.benchmarks.gpu_pass", "env", "--out", str(results / "env.json")]
             + smoke_args, 60, 5),
        Item("cuda-tests", tests, 120 if smoke else 200, 30, test_env, tests_code=True),
        Item("cifar-steps", py + ["-m", "deepres.benchmarks.gpu_pass", "steps", "--nets",
                                  ",".join(STEPS_NETS[:1] if smoke else STEPS_NETS), "--results", str(results)]
             + data + smoke_args, 120 if smoke else 90, 20,
             result="cifar-steps"),
        Item("imagenet-throughput", bench("imagenet-throughput"), 120 if smoke else 150, 30,
             result=f"imagenet-throughput-{model}"),
        Item("inference", bench("inference"), 120 if smoke else 90, 20, result=f"inference-{model}"),
        Item("cifar-full", cifar + ["--nets", ",".join(FULL_NETS), "--fp32", "--alone", "resnet20,resnet56"],
             300, 60,
             runs=[_run_name(net) for net in FULL_NETS] + [FP32_RUN, WARMUP_RUN]),
        Item("cifar-speedrun", bench("cifar-speedrun", *data), 120 if smoke else 90, 30, result="cifar-speedrun"),
        Item("jpeg-pipeline", bench("jpeg-pipeline"), 120 if smoke else 90, 30, result="jpeg-pipeline"),
        Item("augment", bench("augment", *data), 120 if smoke else 60, 15, result="augment"),
        Item("cifar-rest", cifar + ["--nets", ",".join(rest), "--alone", "resnet110"], 300 if smoke else 600, 60,
             runs=[_run_name(net) for net in rest]),
    ]
    if args.inject_slow:  # the budget logic's own check: an item that outlives its timeout
        items.insert(1, Item("slow", py + ["-c", "import time; time.sleep(600)"], args.inject_slow, 1))
    if args.items:
        wanted = args.items.split(",")
        unknown = sorted(set(wanted) - {item.name for item in items})
        if unknown:
            raise SystemExit(f"--items: unknown {', '.join(unknown)}; the pass has {', '.join(i.name for i in items)}")
        items = [item for item in items if item.name in wanted]
    return items


# ---------------------------------------------------------------------------------------------------------------
# Running items within the budget


def run_item(item: Item, timeout: float, log: Path, cwd: Path) -> tuple[str, str]:
    """(status, error) of running ``item`` for at most ``timeout`` seconds; its whole process group is stopped at the
    timeout. Output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **item.env}
    src = str(cwd / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log, "a") as out:
        out.write(f"$ {' '.join(item.argv)}  (timeout {timeout:.0f} s)\n")
        out.flush()
        proc = subprocess.Popen(item.argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # runs save their checkpoints on SIGTERM
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "timeout", f"stopped after {timeout:.0f} s"
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-6:]
        return "failed", f"exit {code}: " + " | ".join(line.strip() for line in tail)[-600:]
    return "ok", ""


def code_fingerprint(root: Path) -> str:
    """A hash of the package's and the tests' Python sources under ``root``: the code the CUDA tests exercised."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*(root / "src" / "deepres").rglob("*.py"), *(root / "tests").glob("*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _tests_passed_on(code: str, device_label: str, records: Path) -> Path | None:
    """The record (``unpack``'s folder of an earlier pass) whose CUDA tests passed on this device with this code."""
    for record in sorted(records.glob("*/items.json")):
        items, env = json.loads(record.read_text()), record.parent / "env.json"
        if items.get("code") != code or not env.is_file() or \
                json.loads(env.read_text()).get("device_label") != device_label:
            continue
        if any(row["item"] == "cuda-tests" and row["status"] == "ok" for row in items.get("items", [])) \
                and _all_ran_and_passed(record.parent / "test_cuda.xml"):
            return record.parent
    return None


def _all_ran_and_passed(junit: Path) -> bool:
    """Whether pytest's JUnit report shows tests run, none skipped (no GPU: every CUDA test skips), none failed."""
    import xml.etree.ElementTree as ElementTree

    if not junit.is_file():
        return False
    root = ElementTree.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    count = lambda key: sum(int(suite.get(key, 0)) for suite in suites)  # noqa: E731
    return count("tests") > 0 and count("skipped") == count("failures") == count("errors") == 0


def already_done(item: Item, device_label: str | None, args, code: str) -> str | None:
    """Why ``item`` need not run again (its result for this device is committed, its runs are finished where
    ``unpack`` put them, or the CUDA tests passed on ``code``, the pass's source hash), or None. Nothing is done before
    ``env`` has named the device, or with ``--redo``."""
    if args.redo or device_label is None:
        return None
    if item.tests_code:
        records = Path(args.resume_from).parent / "gpu-pass"  # where unpack puts each pass's record
        record = _tests_passed_on(code, device_label, records)
        return f"committed: passed with this code on this device ({record})" if record else None
    if item.result:
        path = Path(args.committed) / f"{item.result}-{device_label}.json"
        if not path.is_file():
            return None
        # A result written before its item finished (the item stopped at its timeout) says so: run it again.
        return None if json.loads(path.read_text()).get("unfinished") else f"committed: {path}"
    if item.runs:
        iterations = 12 if args.smoke else 64000
        if all(_finished(Path(args.resume_from) / name, iterations) for name in item.runs):
            return f"committed: {len(item.runs)} finished runs in {args.resume_from}"
    return None


def run_pass(args) -> list[dict]:
    out = Path(args.out)
    work = out / "pass"
    if work.exists():
        shutil.rmtree(work)
    (work / "results").mkdir(parents=True)
    root = Path.cwd()
    if not (root / "tests" / "test_cuda.py").is_file():
        raise SystemExit("run the GPU pass from the root of a deepres source checkout (it runs tests/test_cuda.py)")
    start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # names the pass's folder once unpacked
    code = code_fingerprint(root)  # the CUDA tests need not run again on code they passed on
    deadline = start + args.budget_s
    rows: list[dict] = []
    device_label = None
    for item in plan(args, work):
        left = deadline - time.perf_counter() - PACK_RESERVE_S
        row = {"item": item.name, "timeout_s": item.timeout_s}
        done = already_done(item, device_label, args, code)
        if done:
            row.update(status="skipped", seconds=0.0, error=f"{done} (--redo runs it again)", committed=True)
        elif left < item.min_s:
            row.update(status="skipped", seconds=0.0, error=f"{left:.0f} s of the budget left, needs {item.min_s:.0f}")
        else:
            timeout = min(item.timeout_s, left)
            t0 = time.perf_counter()
            status, error = run_item(item, timeout, work / "logs" / f"{item.name}.log", root)
            row.update(status=status, seconds=time.perf_counter() - t0, error=error, timeout_s=timeout)
            if item.name == "env" and status == "ok":
                device_label = json.loads((work / "results" / "env.json").read_text()).get("device_label")
        rows.append(row)
        print(f"[gpu-pass] {item.name}: {row['status']} ({row['seconds']:.0f} s) {row['error'][:200]}", flush=True)
        (work / "items.json").write_text(json.dumps({"started": started, "budget_s": args.budget_s,
                                                      "smoke": args.smoke, "code": code, "items": rows},
                                                     indent=2) + "\n")
        pack(work, out / ARCHIVE)
    print_table(rows, time.perf_counter() - start, out / ARCHIVE)
    return rows


def print_table(rows: list[dict], seconds: float, archive: Path) -> None:
    print(f"\n{'item':<22}{'status':<10}{'seconds':>9}  error")
    for r in rows:
        print(f"{r['item']:<22}{r['status']:<10}{r['seconds']:>9.1f}  {r['error'][:90]}")
    size = archive.stat().st_size / 2**20 if archive.exists() else 0.0
    print(f"pass: {seconds:.0f} s; archive {archive} ({size:.1f} MiB)", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Packing: what comes back


def _slim_checkpoint(src: Path, dst: Path) -> None:
    """A finished run's checkpoint without its optimizer state (the weights, config, classes and normalisation:
    what eval, export and the layer-response analysis read); an unfinished run's is copied whole, so the next pass
    resumes it."""
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    if (src.parents[1] / "summary.json").is_file():
        state = {k: v for k, v in state.items() if k not in ("optimizer", "step_state")}
        state["optimizer"] = None
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)


def _tar(folder: Path, path: Path, compress: bool) -> int:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) if compress else tarfile.open(tmp, "w") as tar:
        tar.add(folder, arcname="pass")
    os.replace(tmp, path)
    return path.stat().st_size


def extra_archives(archive: Path) -> list[Path]:
    """The weights archives written beside ``archive``, in order."""
    return sorted(archive.parent.glob(EXTRA.format("*")), key=lambda p: (len(p.name), p.name))


def _pack_extras(staging: Path, moved: dict[Path, Path], archive: Path) -> bool:
    """The checkpoints in ``moved`` (archive path -> file) into up to EXTRA_FILES tars beside ``archive``, each under
    ARCHIVE_LIMIT, largest first into the first one with room; one that fits in none is left out, with a note in its
    run folder of the main archive's staging copy. True when one was left out."""
    bins: list[list[tuple[Path, Path]]] = []
    used: list[int] = []
    dropped = False
    for rel, path in sorted(moved.items(), key=lambda kv: -kv[1].stat().st_size):
        need = path.stat().st_size + TAR_ENTRY_BYTES
        room = next((i for i, u in enumerate(used) if u + need <= ARCHIVE_LIMIT), None)
        if room is None and len(bins) < EXTRA_FILES and need + 2 * TAR_ENTRY_BYTES <= ARCHIVE_LIMIT:
            bins.append([])
            used.append(2 * TAR_ENTRY_BYTES)  # the end-of-archive blocks and the record's padding
            room = len(bins) - 1
        if room is None:
            (staging / rel.parent).mkdir(parents=True, exist_ok=True)
            (staging / rel.parent / "DROPPED").write_text(f"{rel.name} left out: the archives passed "
                                                          f"{1 + EXTRA_FILES} x 16 MiB\n")
            dropped = True
            continue
        bins[room].append((rel, path))
        used[room] += need
    for n, members in enumerate(bins, start=1):
        tmp = archive.with_name(EXTRA.format(n) + ".tmp")
        with tarfile.open(tmp, "w") as tar:
            for rel, path in members:
                tar.add(path, arcname=f"pass/{rel.as_posix()}")
        os.replace(tmp, archive.with_name(EXTRA.format(n)))
    return dropped


def pack(work: Path, archive: Path) -> Path:
    """``work`` (results, logs, run folders: metrics, summaries, configs, last.pt) into ``archive``, under
    ARCHIVE_LIMIT: checkpoints go in while they fit (the full-length runs first), the rest into the weights archives
    beside it (``_pack_extras``)."""
    staging = Path(tempfile.mkdtemp(prefix="gpu-pass-"))
    extra = Path(tempfile.mkdtemp(prefix="gpu-pass-extra-"))
    moved: dict[Path, Path] = {}  # archive path -> a checkpoint not (yet) in the main archive's staging folder
    try:
        for path in sorted(work.rglob("*")):
            rel = path.relative_to(work)
            if path.is_dir() or "tensorboard" in rel.parts or rel.name == "best.pt" or rel.suffix == ".tmp":
                continue
            # Checkpoints (float weights) barely compress: they wait in ``extra`` while the rest is packed once,
            # then go back in while their size fits the room left (the full-length runs first, smallest first).
            dst = (extra if rel.name == "last.pt" else staging) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel.name == "last.pt":
                _slim_checkpoint(path, dst)
                moved[rel] = dst
            else:
                shutil.copy2(path, dst)
        full = {_run_name(net) for net in FULL_NETS} | {FP32_RUN, WARMUP_RUN}
        room = ARCHIVE_LIMIT - _tar(staging, archive, compress=True)
        back = []
        for rel in sorted(moved, key=lambda r: (r.parents[1].name not in full, moved[r].stat().st_size)):
            need = moved[rel].stat().st_size + TAR_ENTRY_BYTES
            if need <= room:
                room -= need
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(moved.pop(rel), staging / rel)
                back.append(rel)
        while _tar(staging, archive, compress=True) > ARCHIVE_LIMIT and back:
            rel = back.pop()
            moved[rel] = extra / rel
            shutil.move(staging / rel, moved[rel])
        for old in extra_archives(archive):
            old.unlink()
        if moved and _pack_extras(staging, moved, archive):
            _tar(staging, archive, compress=True)  # with the DROPPED notes
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(extra, ignore_errors=True)
    return archive


# ---------------------------------------------------------------------------------------------------------------
# Items implemented here: env, cifar


def env_info(out: Path, smoke: bool = False) -> dict:
    import platform

    import torch
    import torchvision

    from .common import device_name, gpu_or_cpu

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cpu_cores": os.cpu_count(),
            "cuda_available": torch.cuda.is_available(), "tf32_convolutions": torch.backends.cudnn.allow_tf32,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "device_label": device_name(gpu_or_cpu(smoke))}  # the result files' device, as the benchmarks name it
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                    memory_gib=p.total_memory / 2**30, multiprocessors=p.multi_processor_count)
        query = ("driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
                 "temperature.gpu")
        try:
            smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                                 text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


def _cifar_settings(args) -> tuple[list[str], int, int, str]:
    """(overrides every run shares, iterations, reference steps timed, the data)."""
    from ..experiments.base import FULL
    from .common import default_cifar_data, tiny_image_folder

    if args.smoke:
        tiny = SCRATCH / "tiny-data"
        if not tiny.is_dir():  # written aside, then renamed: a pass running beside this one never sees half of it
            part = Path(tempfile.mkdtemp(prefix="tiny-data-", dir=SCRATCH.parent))
            tiny_image_folder(part, classes=4, per_class=16, test_per_class=8)
            SCRATCH.mkdir(parents=True, exist_ok=True)
            try:
                part.rename(tiny)
            except OSError:  # the other one was first
                shutil.rmtree(part, ignore_errors=True)
        data = args.data or str(tiny)
        sizes, iterations, reference_steps = list(SMOKE_SIZES), 12, 2
    else:
        data = args.data or default_cifar_data()
        sizes, iterations, reference_steps = list(FULL), 64000, 200
    shared = ["data.source=imagefolder", f"data.data_dir={data}", f"data.cache_dir={SCRATCH / 'cache'}"]
    return shared + sizes, iterations, reference_steps, data


def step_times(args) -> dict:
    """Each of ``args.nets`` alone on the device, the paper's recipe with the pass's fast settings, stopped after
    STEPS_WARMUP + STEPS_TIMED steps: the steady seconds per step over the timed ones, and the recipe's wall time for
    one run alone projected as (its first steps, capture included) + (the remaining steps at the timed rate). Written
    to ``cifar-steps-<device>.json`` after each net, so an item stopped at its timeout keeps the nets it finished."""
    import torch

    from ..config import load_config
    from ..engine import train
    from .cifar_recipe import TARGET_SECONDS
    from .common import device_name, gpu_or_cpu

    device = gpu_or_cpu(args.smoke)
    gpu = device.type == "cuda"
    base, iterations, _, _ = _cifar_settings(args)
    warm, timed = (3, 4) if args.smoke else (STEPS_WARMUP, STEPS_TIMED)
    nets = {}
    for net in args.nets.split(","):
        marks: dict[int, float] = {}

        def on_step(step, info, marks=marks):
            if step in (warm, warm + timed):
                info["loss"].item()  # waits for the device's queue
                marks[step] = time.perf_counter()
            return step < warm + timed

        config = load_config(f"paper/cifar10_{net}", base + precision_overrides(gpu) + [f"name=steps-{net}"])
        with tempfile.TemporaryDirectory(prefix="deepres-steps-") as run_dir:
            summary = train(config, run_dir, quiet=True, on_step=on_step)
        per_step = (marks[warm + timed] - marks[warm]) / timed
        first = summary["train_seconds"] - (marks[warm + timed] - marks[warm])
        nets[net] = {"seconds_per_step": per_step, "first_steps_seconds": first,
                     "projected_recipe_seconds": first + (iterations - warm) * per_step,
                     "target_seconds": TARGET_SECONDS.get(net), "setup_seconds": summary["setup_seconds"],
                     "step": summary["step"], "amp": summary["amp"], "channels_last": summary["channels_last"],
                     "peak_memory_mib": summary["peak_memory_mib"]}
        print(f"[cifar-steps] {net}: {per_step * 1e3:.3f} ms/step alone, recipe projected "
              f"{nets[net]['projected_recipe_seconds']:.1f} s", flush=True)
        out = {"benchmark": "cifar-steps", "device": device_name(device), "torch": torch.__version__,
               "metric": f"one run alone on the device: seconds per step over {timed} steps after {warm} (the capture "
                         f"and cuDNN's autotuning among them), batch {config.train.batch_size}; projected wall time of "
                         f"the {iterations}-iteration recipe = the first {warm} steps as measured + the rest at that "
                         f"rate (a projection, not a measured run: cifar-recipe-* are the measured wall times)",
               "iterations": iterations, "warmup_steps": warm, "timed_steps": timed,
               "settings": precision_overrides(gpu), "nets": nets}
        left = [n for n in args.nets.split(",") if n not in nets]
        if left:
            out["unfinished"] = f"not yet timed: {', '.join(left)}"
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        (results / f"cifar-steps-{device_name(device)}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _finished(run: Path, iterations: int) -> dict | None:
    """The summary of the run in ``run`` if it finished at ``iterations``, else None."""
    path = run / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("iterations") == iterations:
            return summary
    return None


def _resume_left_runs(names: list[str], source: Path, runs: Path) -> list[str]:
    """Copy the run folders an earlier, cut-short pass left unfinished (a checkpoint, no summary) from ``source``."""
    resumed = []
    for name in names:
        old = source / name
        if (old / "checkpoints" / "last.pt").is_file() and not (old / "summary.json").is_file() \
                and not (runs / name).exists():
            shutil.copytree(old, runs / name)
            resumed.append(name)
    return resumed


ALONE_MARKER, ALONE_TRIES = "alone-starts", 2  # in an --alone run's folder: how many passes started it alone
RUN_KEYS = ("iterations", "test_top1_error", "train_seconds", "setup_seconds", "step", "amp", "tf32", "channels_last",
            "peak_memory_mib", "diverged")


def cifar(args) -> int:
    """Train the nets with the paper's recipe as ``deepres train`` runs (the fast settings on a GPU; with ``--fp32``
    also ResNet-20 with the paper's fp32 and ResNet-56 with a warm-up) and write the ``cifar-full`` (or
    ``cifar-rest``) result file. The ``--alone`` nets train first, one at a time with the device to themselves,
    after the reference trainer is timed: each that runs start to end writes its ``cifar-recipe`` file (the recipe's
    wall time against the reference, the issue's targets) as soon as it finishes. The other runs then train side by
    side. Runs finished by an earlier pass (in ``--resume-from``) are not trained again; unfinished ones continue."""
    import torch

    from ..config import load_config
    from ..data import load_dataset
    from ..data.folders import resolve_image_source
    from ..engine.concurrent import run_concurrent, training_job
    from ._reference import train_reference
    from .cifar_recipe import TARGET_RATIO, TARGET_SECONDS
    from .common import device_name, gpu_or_cpu, write_result

    device = gpu_or_cpu(args.smoke)
    runs, results, source = Path(args.runs), Path(args.results), Path(args.resume_from)
    runs.mkdir(parents=True, exist_ok=True)
    base, iterations, reference_steps, data = _cifar_settings(args)
    gpu = device.type == "cuda"
    nets = args.nets.split(",")
    settings = {_run_name(net): (f"paper/cifar10_{net}", precision_overrides(gpu)) for net in nets}
    if args.fp32:  # the paper's numerics beside the fast ones (the captured step changes launches, not arithmetic)
        settings[FP32_RUN] = ("paper/cifar10_resnet20", ["train.amp=off", "train.tf32=false"]
                              + (["train.cuda_graph=true"] if gpu else []))
        settings[WARMUP_RUN] = ("paper/cifar10_resnet56", precision_overrides(gpu) + WARMUP)
    earlier = {name: summary for name in settings if (summary := _finished(source / name, iterations))}
    todo = [name for name in settings if name not in earlier]
    # An --alone run trains start to end in one pass (its wall time is the point): one an earlier pass cut short
    # starts again from scratch, up to ALONE_TRIES starts; after that it continues side by side with the others.
    tries = {}
    for net in (args.alone.split(",") if args.alone else []):
        name = _run_name(net)
        marker = source / name / ALONE_MARKER
        started = int(marker.read_text()) if marker.is_file() else 0
        if net in nets and name in todo and started < ALONE_TRIES:
            tries[net] = started + 1
    alone = list(tries)
    alone_runs = {_run_name(net) for net in alone}
    resumed = _resume_left_runs([name for name in todo if name not in alone_runs], source, runs)
    jobs = {name: training_job(name, recipe, base + extra + [f"name={name}"], runs / name,
                               cost=float("".join(ch for ch in name.split("-")[1] if ch.isdigit())))
            for name, (recipe, extra) in settings.items() if name in todo}
    if jobs:
        load_dataset(load_config(settings[todo[0]][0], base).data)  # decoded once, before the processes
    batch = 8 if args.smoke else 128
    reference = {}
    if alone:  # timed before the runs it is held against, so a pass cut short still has both
        image_root = resolve_image_source(data, str(SCRATCH / "cache"))
        for net in alone:
            ref = train_reference(net, image_root, device, iterations=iterations, timed_steps=reference_steps,
                                  batch_size=batch, workers=0 if args.smoke else min(16, os.cpu_count() or 1),
                                  val_size=0)
            reference[net] = {k: ref[k] for k in ("seconds", "seconds_per_step", "measured_steps", "extrapolated")}
            # eager fp32 with PyTorch's CUDA default: convolutions on the TF32 tensor cores (a faster reference)
            reference[net]["tf32_convolutions"] = torch.backends.cudnn.allow_tf32 if gpu else None

    def row(name: str, result) -> dict:  # a run trained here: how its process ended, and its summary
        path = runs / name / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        return {"returncode": result.returncode, "process_seconds": result.seconds, "resumed": name in resumed,
                "alone": name in alone_runs, **{k: summary.get(k) for k in RUN_KEYS}}

    t0 = time.perf_counter()
    outcome, table = [], {}
    for net in alone:
        name = _run_name(net)
        (runs / name).mkdir(parents=True, exist_ok=True)
        (runs / name / ALONE_MARKER).write_text(f"{tries[net]}\n")  # travels back with the run folder
        (result,) = run_concurrent([jobs.pop(name)], 1)
        outcome.append(result)
        table[name] = r = row(name, result)
        if r["iterations"] != iterations or not r["train_seconds"]:
            continue  # stopped or failed: no wall time
        ref, limit = reference[net], TARGET_SECONDS[net]
        write_result(f"cifar-recipe-{net}", device,
                     f"wall seconds of the paper's CIFAR-10 recipe ({iterations} iterations, batch {batch}, all "
                     f"training images); ours: deepres train ({r['step']} step, {r['amp']}, channels_last "
                     f"{r['channels_last']}) alone on the device, from its first step to its last (capture included, "
                     f"evaluation excluded); reference: ImageFolder + PIL in a DataLoader, eager fp32, "
                     f"{ref['measured_steps']} steps extrapolated; lower is better, ratio = reference / ours",
                     r["train_seconds"], ref["seconds"], higher_is_better=False,
                     target={"seconds_max": limit, "ratio_min": TARGET_RATIO}, out=results,
                     meets_target=(gpu and iterations == 64000 and r["train_seconds"] <= limit
                                   and ref["seconds"] / r["train_seconds"] >= TARGET_RATIO),
                     iterations=iterations, concurrent_runs=1, test_top1_error_ours=r["test_top1_error"],
                     reference_seconds_per_step=ref["seconds_per_step"], reference_extrapolated=ref["extrapolated"],
                     reference_tf32_convolutions=ref["tf32_convolutions"])
    parallel = min(len(jobs), args.parallel)
    t1 = time.perf_counter()
    if jobs:
        for result in run_concurrent(list(jobs.values()), parallel):
            outcome.append(result)
            table[result.name] = row(result.name, result)
    side_by_side = time.perf_counter() - t1
    for name, summary in earlier.items():
        table[name] = {"returncode": None, "earlier_pass": True, **{k: summary.get(k) for k in RUN_KEYS}}
    table = {name: table[name] for name in settings}
    name = "cifar-full" if args.fp32 else "cifar-rest"
    out = {"benchmark": name, "device": device_name(device), "torch": torch.__version__, "iterations": iterations,
           "wall_seconds": time.perf_counter() - t0, "side_by_side_seconds": side_by_side, "parallel": parallel,
           "alone": [_run_name(net) for net in alone], "earlier_pass": list(earlier), "runs": table,
           "reference": reference}
    if args.fp32:
        out["resnet20_test_error"] = {"bf16 (fast settings)": table[_run_name("resnet20")].get("test_top1_error"),
                                      "fp32 (paper)": table[FP32_RUN].get("test_top1_error")}
        out["resnet56_test_error"] = {"paper start (lr 0.1)": table[_run_name("resnet56")].get("test_top1_error"),
                                      "linear warm-up over 1%": table[WARMUP_RUN].get("test_top1_error")}
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}-{device_name(device)}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if all(r.returncode in (0, 3) for r in outcome) else 1


# ---------------------------------------------------------------------------------------------------------------
# Unpacking here

# (run, the net's label, what differs) of the precision report, in pairs: the fast run, then the one it is held to.
PRECISION_PAIRS = [
    (("cifar10-resnet20-s0", "ResNet-20", "the fast settings"), (FP32_RUN, "ResNet-20", "the paper's fp32")),
    (("cifar10-resnet56-s0", "ResNet-56", "the paper's start (lr 0.1)"),
     (WARMUP_RUN, "ResNet-56", "lr warm-up 0.01 -> 0.1 over the first 1%")),
]


def precision_report(full: Path, env: dict) -> Path | None:
    """``full/precision/report.md``: the fast settings against the paper's fp32 (ResNet-20), and the paper's start
    against a warm-up (ResNet-56), one seed each, from the returned runs; None when a pair is incomplete."""
    import yaml

    from ..experiments.base import run_settings
    from ..experiments.cifar import PAPER_110_MEAN, PAPER_TABLE6

    # The paper's seed spread on CIFAR-10 (ResNet-110 over 5 runs): two of its standard deviations are what one seed
    # against one seed can tell apart.
    mean, std = PAPER_110_MEAN

    summaries = {}
    for pair in PRECISION_PAIRS:
        for name, _, _ in pair:
            path = full / "runs" / name / "summary.json"
            if not path.is_file():
                return None
            summaries[name] = json.loads(path.read_text())

    def error(name: str) -> float | None:  # None: the run diverged
        return summaries[name].get("test_top1_error")

    device = env.get("gpu") or env.get("cpu") or "unknown device"
    name = PRECISION_PAIRS[0][0][0]
    first = summaries[name]
    batch = yaml.safe_load((full / "runs" / name / "config.yaml").read_text())["train"]["batch_size"]
    lines = ["# The fast settings against the paper's numerics (CIFAR-10)", "",
             f"Device: {device}; torch {env.get('torch', '?')}. Each run: the paper's recipe, {first['iterations']:,} "
             f"iterations at batch {batch} on {first['splits']['train']:,} training images ({first['data']}), seed 0, "
             f"tested on {first['splits']['test']:,}; the GPU pass (`make gpu-check`) trained them side by side.", "",
             "| net | run | computed with | what differs | test error % | paper % | training seconds |",
             "|---|---|---|---|---|---|---|"]
    for pair in PRECISION_PAIRS:
        for name, net, what in pair:
            s = summaries[name]
            depth = int(net.split("-")[1])
            shown = "diverged" if error(name) is None else f"{error(name):.2f}"
            seconds = f"{s['train_seconds']:.0f}" if s.get("train_seconds") is not None else "-"
            lines.append(f"| {net} | {name} | {run_settings(s)} | {what} | {shown} | {PAPER_TABLE6[depth][1]} | "
                         f"{seconds} |")
    lines += ["", "## Findings", "",
              f"One seed each. The paper's seed spread: ResNet-110 over 5 runs, standard deviation {std} "
              f"({mean} +/- {std}); a difference under two of them ({2 * std:.2f} points) is within what "
              f"seeds alone move. Each difference is the first run's test error minus the second's.", ""]
    for (fast, net, what), (ref, _, ref_what) in PRECISION_PAIRS:
        if error(fast) is None or error(ref) is None:
            lines.append(f"- {net}, {what} against {ref_what}: no comparison, "
                         f"{' and '.join(n for n in (fast, ref) if error(n) is None)} diverged")
            continue
        diff = error(fast) - error(ref)
        within = abs(diff) < 2 * std
        lines.append(f"- {net}, {what} against {ref_what}: {diff:+.2f} points "
                     f"({'within' if within else 'beyond'} the seed spread)")
    out = full / "precision" / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def unpack(archive: Path, root: Path) -> dict:
    """Put a pass's archive (and the weights archive beside it, if any) into the tree: result files into
    ``benchmarks/results/``, runs, logs and the item table into ``docs/results/full/``; regenerate the Fig. 6 and
    Table 6 reports (depths 20 and 56) and the precision report from the runs when they are complete (no training
    happens here)."""
    from ..data.archives import extract_into
    from ..experiments import Options, run_experiment

    staging = Path(tempfile.mkdtemp(prefix="gpu-pass-unpack-"))
    try:
        for path in [archive, *extra_archives(archive)]:
            if path.is_file():
                extract_into(path, staging)  # members checked: no absolute names, no "..", no links
        src = staging / "pass"
        full = root / "docs" / "results" / "full"
        results = root / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        copied = []
        for path in sorted((src / "results").glob("*.json")):
            if path.name != "env.json":
                shutil.copy2(path, results / path.name)
                copied.append(path.name)
        # Each pass's own record (items, environment, test report, logs) in a folder named by its start (UTC): a
        # later pass, which skips what is committed, does not overwrite the one that ran it.
        items = json.loads((src / "items.json").read_text()) if (src / "items.json").is_file() else {}
        record = full / "gpu-pass" / items.get("started", "undated").replace(":", "")
        record.mkdir(parents=True, exist_ok=True)
        for name in ("items.json", "results/env.json", "results/test_cuda.xml"):
            if (src / name).is_file():
                shutil.copy2(src / name, record / Path(name).name)
        if (src / "logs").is_dir():
            shutil.copytree(src / "logs", record / "logs", dirs_exist_ok=True)
        # Each returned run folder replaces the tree's copy whole (a run restarted from scratch leaves nothing stale).
        for run in sorted((src / "runs").iterdir()) if (src / "runs").is_dir() else []:
            shutil.rmtree(full / "runs" / run.name, ignore_errors=True)
            shutil.copytree(run, full / "runs" / run.name)
        env = json.loads((src / "results" / "env.json").read_text()) if (src / "results" / "env.json").is_file() \
            else {}
        reports = []
        precision = precision_report(full, env)
        if precision is not None:
            reports.append(str(precision))
        complete = lambda nets: all((full / "runs" / _run_name(n) / "summary.json").is_file() for n in nets)  # noqa
        if complete(FULL_NETS):
            # The reports ask for exactly what the pass trained (reproduce reuses a run only for its own config).
            overrides = precision_overrides(bool(env.get("cuda_available"))) + \
                (list(SMOKE_SIZES) if items.get("smoke") else [])
            options = Options(scale="full", depths=[20, 56], out=full, parallel=1, overrides=overrides)
            reports.append(str(run_experiment("cifar-degradation", options)))
            reports.append(str(run_experiment("cifar-table6", options)))
        runs = sorted(p.name for p in (full / "runs").glob("*")) if (full / "runs").is_dir() else []
        return {"results": copied, "record": str(record), "runs": runs, "reports": reports}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepres.benchmarks.gpu_pass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="the pass (the default)")
    for q in (parser, p):
        q.add_argument("--data", default=None, help="the CIFAR-10 JPEG archive (default: found as the benchmarks do)")
        q.add_argument("--out", default=None, help="folder for the archive (default: $OUT, else ./gpu-pass-out)")
        q.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole pass (default 480)")
        q.add_argument("--smoke", action="store_true", help="the whole pass on a CPU at tiny sizes")
        q.add_argument("--items", default=None, help="only these items, comma-separated")
        q.add_argument("--resume-from", default=None, help="where the runs of earlier passes are (default "
                       "docs/results/full/runs; with --smoke none: a smoke pass never continues full-length runs)")
        q.add_argument("--redo", action="store_true",
                       help="run items whose results are committed already (by default they are skipped)")
        q.add_argument("--committed", default=str(Path("benchmarks") / "results"),
                       help="where committed result files are looked for (default benchmarks/results)")
        q.add_argument("--inject-slow", type=float, default=0.0, help=argparse.SUPPRESS)
    p = sub.add_parser("env", help="item 1 alone")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("cifar", help="the CIFAR runs of items 4 and 6")
    p.add_argument("--nets", required=True)
    p.add_argument("--runs", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--fp32", action="store_true", help="also ResNet-20 with the paper's fp32")
    p.add_argument("--resume-from", default=None, help="run folders an earlier pass left (as the pass's)")
    p.add_argument("--parallel", type=int, default=6)
    p.add_argument("--alone", default=None, help="nets trained first, one at a time, for their cifar-recipe wall time")
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("steps", help="the nets timed alone (item cifar-steps)")
    p.add_argument("--nets", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("unpack", help="put a returned archive into the tree")
    p.add_argument("archive")
    p.add_argument("--root", default=".", help="the source checkout (default: here)")
    args = parser.parse_args(argv)
    if getattr(args, "resume_from", "") is None:
        args.resume_from = str(SCRATCH / "no-earlier-runs") if args.smoke else RESUME_FROM
    if args.command == "env":
        env_info(Path(args.out), args.smoke)
        return 0
    if args.command == "cifar":
        return cifar(args)
    if args.command == "steps":
        step_times(args)
        return 0
    if args.command == "unpack":
        print(json.dumps(unpack(Path(args.archive), Path(args.root)), indent=2))
        return 0
    args.out = args.out or os.environ.get("OUT") or "gpu-pass-out"
    rows = run_pass(args)
    # exit 0 when every item ran or an earlier pass's results made it unnecessary
    return 0 if rows and all(r["status"] == "ok" or r.get("committed") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
