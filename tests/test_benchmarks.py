"""Every speed benchmark runs end to end at a tiny size on the CPU and writes a complete result file.
(Speed itself is measured on the GPU machine and committed under benchmarks/results/, never asserted here.)"""

import json
import os
import subprocess
import sys

import pytest

from deepres.benchmarks.common import cpu_label, measure_ours

KEYS = {"benchmark", "device", "torch", "metric", "ours", "reference", "ratio", "target"}


def test_unknown_benchmark_exits_2():
    out = subprocess.run([sys.executable, "-m", "deepres", "benchmark", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "imagenet-throughput" in out.stderr


# Each --smoke builds its own tiny JPEG folder, trains or decodes a few steps on the CPU and writes its result file;
# the GPU numbers come from the same commands without --smoke. imagenet-throughput, inference, cifar-speedrun and
# jpeg-pipeline run in the GPU pass's smoke test (tests/test_gpu_pass.py), which checks their files the same way.
SMOKE_FILES = {
    "cifar-recipe": "cifar-recipe-resnet20-cpu-*.json",
    "cifar-table": "cifar-table-cpu-*.json",
}


@pytest.mark.parametrize("name", sorted(SMOKE_FILES))
def test_benchmark_smoke_writes_a_result(name, tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepres", "benchmark", name, "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob(SMOKE_FILES[name])
    result = json.loads(path.read_text())
    assert KEYS <= set(result) and result["device"].startswith("cpu")
    assert result["ours"] > 0 and result["reference"] > 0 and result["target"]
    assert result["meets_target"] is False  # a target is met only on the GPU at full size
    assert result["ratio"] == pytest.approx(result["reference"] / result["ours"])
    if name == "cifar-table":
        assert set(result["table"]) == {"plain20", "resnet20"}
        assert all(0 <= row["test_top1_error"] <= 100 for row in result["table"].values())


def test_a_diverged_run_exits_3_and_keeps_a_summary(tmp_path):
    """A loss that turns inf/NaN: `deepres train` exits 3 with a {"diverged": true} summary (a result the reports
    show), and no checkpoint is written from the broken state."""
    from deepres.benchmarks.common import tiny_image_folder

    data = tiny_image_folder(tmp_path / "data", classes=2, per_class=16, test_per_class=4)
    args = [sys.executable, "-m", "deepres", "train", "--recipe", "paper/cifar10_resnet20", "--quiet",
            "--set", "data.source=imagefolder", "--set", f"data.data_dir={data}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.device=cpu",
            "--set", "train.iterations=6", "--set", "train.batch_size=8", "--set", "train.eval_batch_size=8",
            "--set", "train.log_every=2", "--set", "optim.lr=1e30"]
    run = tmp_path / "run"
    out = subprocess.run(args + ["--run-dir", str(run)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"] is True and "NaN/inf" in summary["message"]
    assert not (run / "checkpoints" / "last.pt").exists()


def test_concurrent_runs_longest_first_and_reports_failures(tmp_path):
    from deepres.engine.concurrent import Job, run_concurrent

    order = tmp_path / "order.txt"

    def job(name, cost, code=0):
        script = f"open({str(order)!r}, 'a').write({name!r} + '\\n'); raise SystemExit({code})"
        return Job(name, [sys.executable, "-c", script], tmp_path / f"{name}.log", cost)

    results = run_concurrent([job("short", 1), job("long", 5), job("bad", 3, code=4)], parallel=1, echo=False)
    assert [r.name for r in results] == ["short", "long", "bad"]
    assert [r.returncode for r in results] == [0, 0, 4]
    assert order.read_text().split() == ["long", "bad", "short"]
    with pytest.raises(ValueError, match="unique"):
        run_concurrent([job("a", 1), job("a", 2)], parallel=2)


def test_concurrent_jobs_take_omp_num_threads_else_share_the_cores(tmp_path, monkeypatch):
    from deepres.config import available_cores
    from deepres.engine.concurrent import Job, job_threads, run_concurrent

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert job_threads(1) == available_cores() and job_threads(10 * available_cores()) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "bad")
    assert job_threads(1) == available_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert job_threads(1) == job_threads(4) == 3
    script = "import os; print('threads', os.environ['OMP_NUM_THREADS'])"
    jobs = [Job(name, [sys.executable, "-c", script], tmp_path / f"{name}.log") for name in ("a", "b")]
    run_concurrent(jobs, parallel=2, echo=False)
    run_concurrent(jobs[1:], parallel=1, threads_per_job=5, echo=False)
    assert (tmp_path / "a.log").read_text() == "threads 3\n"
    assert (tmp_path / "b.log").read_text() == "threads 3\nthreads 5\n"  # a log is appended to, never lost


def test_cpu_train_names_the_cpu_and_its_flags(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deepres", "benchmark", "cpu-train", "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("cpu-train-resnet20-cpu-*.json")
    result = json.loads(path.read_text())
    assert KEYS <= set(result) and result["ratio"] == pytest.approx(result["ours"] / result["reference"])
    assert result["cpu_model"] and isinstance(result["cpu_flags"], list) and result["amp"] in ("bf16", "off")
    assert result["amp"] == ("bf16" if result["native_bf16"] else "off")
    assert result["meets_target"] is None  # a smoke run claims nothing
    assert path.name == f"cpu-train-resnet20-{result['device']}.json"
    assert result["device"] == f"cpu-{os.cpu_count()}core-" + cpu_label(result["cpu_model"], result["cpu_flags"])


def test_deform_cpu_times_both_kernels_on_every_stage_shape(tmp_path):
    from deepres.benchmarks.deform_cpu import main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("deform-cpu-cpu-*.json")
    result = json.loads(path.read_text())
    assert KEYS <= set(result) and result["ratio"] == pytest.approx(result["reference"] / result["ours"])
    assert [(r["side"], r["blocks"]) for r in result["stages"]] == [(16, 4), (8, 6), (4, 3)]
    assert result["ours"] == pytest.approx(sum(r["seconds_ours"] * r["blocks"] for r in result["stages"]))
    assert result["meets_target"] is None and result["cpu_model"]  # a smoke run claims nothing


def test_train_memory_measures_each_setting_in_a_process_of_its_own(tmp_path, capsys):
    """The whole batch (the reference) and the checkpointed step, each in a child process: both rows, the same first
    loss (the benchmark checks it too), the ratio as reference / ours; an unknown setting is a usage error."""
    from deepres.benchmarks.train_memory import main

    assert main(["--smoke", "--steps", "1", "--settings", "grad_checkpointing", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("train-memory-cpu-*.json")
    result = json.loads(path.read_text())
    whole, checkpointed = result["settings"]
    assert (whole["setting"], checkpointed["setting"]) == ("whole", "grad_checkpointing")
    assert checkpointed["grad_checkpointing"] and not whole["grad_checkpointing"]
    assert checkpointed["first_loss"] == pytest.approx(whole["first_loss"], rel=1e-5)
    assert KEYS <= set(result) and result["ratio"] == pytest.approx(result["reference"] / result["ours"])
    assert result["ours"] == max(checkpointed["peak_mib_above_model"], 1 / 1024) and whole["seconds_per_step"] > 0
    assert "resnet20, batch 8 at 32" in result["metric"] and result["cpu_model"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--smoke", "--settings", "grad_checkpointing,half"])
    assert exit_info.value.code == 2 and "unknown half" in capsys.readouterr().err


def test_augment_times_the_same_operations_both_ways(tmp_path, capsys):
    """The reference is the same six operations as torchvision transforms: at p=1 both change every image, at p=0
    neither; the smoke run writes a complete result."""
    import torch

    from deepres.benchmarks.augment import OPS, main, torchvision_policy
    from deepres.config import augment_ops
    from deepres.data.policies import RandomSubset

    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for p, changed in ((1.0, True), (0.0, False)):
        ours = RandomSubset(augment_ops(OPS), p)(images, torch.Generator().manual_seed(1))
        theirs = torch.stack([torchvision_policy(p)(image) for image in images])
        for out in (ours, theirs):
            assert bool((out != images).flatten(1).any(1).all()) is changed
    assert main(["--smoke", "--batch-size", "16", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("augment-cpu-*.json")
    result = json.loads(path.read_text())
    assert KEYS <= set(result) and result["ours"] > 0 and result["reference"] > 0
    assert result["ratio"] == pytest.approx(result["ours"] / result["reference"])


def test_imagenet_throughput_records_the_resnet50_bars(tmp_path):
    # ResNet-50 at a tiny size on the CPU: the file carries the two bars, and a CPU run meets neither.
    out = subprocess.run([sys.executable, "-m", "deepres", "benchmark", "imagenet-throughput", "--smoke", "--model",
                          "resnet50", "--size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("imagenet-throughput-resnet50-cpu-*.json")
    result = json.loads(path.read_text())
    assert result["target"] == {"ratio_min": 1.5, "images_per_s_min": 4500.0}
    assert result["meets_target"] is False and result["image_size"] == 32


def test_ours_is_recorded_eager_first_and_kept_when_compilation_fails():
    """The GPU benchmarks write ours eager before compiling, so a compiler that fails or is stopped mid-way leaves a
    result; a finished compiled measurement replaces it."""
    written = []

    def measure(compiled):
        if compiled and fail:
            raise RuntimeError("inductor: no working C compiler")
        return (300.0, 10.0) if compiled else (200.0, 12.0)

    fail = False
    fields = measure_ours(measure, True, written.append)
    assert written[0] == {"ours": 200.0, "peak_memory_mib_ours": 12.0, "ours_eager": 200.0, "compiled": False,
                          "unfinished": "the compiled measurement was still running"}
    assert written[1] == fields == {"ours": 300.0, "peak_memory_mib_ours": 10.0, "ours_eager": 200.0,
                                    "compiled": True}
    written.clear()
    fail = True
    fields = measure_ours(measure, True, written.append)
    assert fields["ours"] == 200.0 and not fields["compiled"] and "unfinished" not in written[-1]
    assert fields["compile_error"] == "RuntimeError: inductor: no working C compiler" == written[-1]["compile_error"]
    written.clear()
    assert measure_ours(measure, False, written.append)["compiled"] is False and len(written) == 1  # the CPU: eager


@pytest.mark.parametrize("model, flags, label", [
    ("Intel(R) Xeon(R) Platinum 8488C", ["amx_bf16", "avx512_bf16"], "intel-xeon-amx"),
    ("AMD EPYC 9R14 96-Core Processor", ["avx2", "avx512_bf16"], "amd-epyc-bf16"),
    ("Intel(R) Core(TM) i7-10700 CPU @ 2.90GHz", ["avx2"], "intel-core"),
    ("unknown CPU", [], "unknown"),
])
def test_cpu_results_are_named_by_the_cpu(model, flags, label):
    assert cpu_label(model, flags) == label
