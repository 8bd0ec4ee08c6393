"""deepres reproduce at smoke scale: runs, resume-or-skip, and the report with its figures."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from deepres.experiments import Options, run_experiment
from deepres.experiments.base import RunResult, RunSpec
from deepres.experiments.cifar import _warmup_hold

from .helpers import make_image_folder


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """An image folder shaped like the CIFAR-10 JPEG set: 10 classes, 32x32 RGB, 120 train / 50 test each."""

    def paint(img, k):
        img[:, :, k % 3] += np.uint8(40 + 15 * k)

    return make_image_folder(tmp_path_factory.mktemp("tinycifar") / "cifar10-jpeg", {"train": 120, "test": 50}, paint)


# Every depth (ten trainings, two of them 110-layer nets): minutes on 2 cores, so `make test-slow`; the default suite
# runs the same path on depths 20 and 56 below.
@pytest.mark.slow
def test_degradation_smoke_writes_both_panels(tiny_cifar, tmp_path):
    options = Options(scale="smoke", data_dir=str(tiny_cifar), out=tmp_path)
    report = run_experiment("cifar-degradation", options)
    text = report.read_text()
    assert (report.parent / "plots" / "degradation.png").stat().st_size > 10_000
    for net in ["Plain-20", "Plain-56", "Plain-110", "ResNet-20", "ResNet-56", "ResNet-110"]:
        assert f"| {net} |" in text
    assert "plain-56 has higher training error than plain-20" in text
    assert "not bit-identical" in text  # the data is named as the JPEG set
    assert "Hardware:" in text and "torch" in text

    # Complete runs are skipped: a second invocation trains nothing and gives the same table.
    stamp = (tmp_path / "runs" / "cifar10-resnet20-s0" / "summary.json").stat().st_mtime_ns
    again = run_experiment("cifar-degradation", options).read_text()
    assert (tmp_path / "runs" / "cifar10-resnet20-s0" / "summary.json").stat().st_mtime_ns == stamp
    assert again.split("Wall time")[1].split("\n", 1)[1] == text.split("Wall time")[1].split("\n", 1)[1]

    # Table 6 reuses the residual runs of the same --out; Fig. 7 reads their checkpoints.
    table = run_experiment("cifar-table6", options).read_text()
    assert "| ResNet-110 | 1.73M | 1.7M |" in table
    held = json.loads((tmp_path / "runs" / "cifar10-resnet110-s0" / "summary.json").read_text())
    count = held["error_warmup_iterations"]
    assert f"held lr 0.01 for these iterations: cifar10-resnet110-s0 {'never' if count is None else count}" in table
    responses = run_experiment("layer-responses", options).read_text()
    assert "| plain-56 | 55 |" in responses and "| resnet-110 | 109 |" in responses


def test_reports_say_how_long_the_resnet110_warmup_held():
    """Runs with the paper's ResNet-110 rule name how many iterations held lr 0.01 (or that it never ended); runs
    without the rule, or older than the summary's count, add nothing."""
    def result(name, **summary):
        return RunResult(RunSpec(name, "r", []), Path(name), summary, [])

    lines = _warmup_hold([result("cifar10-resnet20-s0"), result("cifar10-resnet110-s0", error_warmup_iterations=1234),
                          result("cifar10-resnet110-s1", error_warmup_iterations=None)])
    assert lines[-1].endswith("held lr 0.01 for these iterations: cifar10-resnet110-s0 1,234; "
                              "cifar10-resnet110-s1 never (the whole run).")
    assert _warmup_hold([result("cifar10-resnet56-s0", test_top1_error=7.0)]) == []


def test_degradation_table6_and_responses_on_two_depths(tiny_cifar, tmp_path):
    """The default suite's path through the CIFAR experiments: depths 20 and 56 only (4 trainings)."""
    options = Options(scale="smoke", data_dir=str(tiny_cifar), out=tmp_path, depths=[20, 56])
    report = run_experiment("cifar-degradation", options)
    text = report.read_text()
    assert (report.parent / "plots" / "degradation.png").stat().st_size > 10_000
    for net in ["Plain-20", "Plain-56", "ResNet-20", "ResNet-56"]:
        assert f"| {net} |" in text
    assert "| Plain-110 |" not in text and not (tmp_path / "runs" / "cifar10-resnet110-s0").exists()
    assert "ResNet-56 has lower test error than ResNet-20" in text
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["cifar10-plain20-s0", "cifar10-plain56-s0", "cifar10-resnet20-s0", "cifar10-resnet56-s0"]
    # Every run the report used, with its scale and length.
    used = text.split("## Runs used", 1)[1]
    for run in runs:
        assert f"| {run} | smoke | 24 | 32 | 800 | 0 |" in used

    # Interrupted runs resume: drop a run's summary so it counts as unfinished; its last.pt is at the final step,
    # so the run finishes without training and the report is rebuilt.
    (tmp_path / "runs" / "cifar10-resnet20-s0" / "summary.json").unlink()
    table = run_experiment("cifar-table6", options).read_text()
    assert "| ResNet-20 | 0.27M | 0.27M |" in table and "| ResNet-56 | 0.85M | 0.85M |" in table
    findings = table.split("## The paper's findings on our runs", 1)[1]
    assert "- ResNet-56 has lower test error than ResNet-20: " in findings and "ResNet-32" not in findings
    assert (tmp_path / "runs" / "cifar10-resnet20-s0" / "summary.json").is_file()
    responses = run_experiment("layer-responses", options).read_text()
    assert "| plain-56 | 55 |" in responses and "| resnet-20 | 19 |" in responses
    assert "(4 runs, 4 of them finished by an earlier invocation;" in responses
    for claim in ("ResNet-20's responses are smaller than plain-20's (mean std",
                  "ResNet-56's responses are smaller than ResNet-20's (mean std"):
        assert claim in responses
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs  # nothing new trained


def test_shortcuts_table_and_findings(tiny_cifar, tmp_path):
    """Table 3 at CIFAR scale on 20-layer nets: plain and options A, B, C, each with its parameter count, and the
    paper's three findings judged on the runs."""
    options = Options(scale="smoke", data_dir=str(tiny_cifar), out=tmp_path, depths=[20])
    text = run_experiment("shortcuts", options).read_text()
    for row in ("| plain-20 | plain | 269,722 |", "| ResNet-20 | A | 269,722 |", "| ResNet-20 | B | 272,474 |",
                "| ResNet-20 | C | 283,962 |"):
        assert row in text, row
    findings = text.split("## The paper's findings on our runs", 1)[1]
    for claim in ("option A has lower test error than plain-20", "option C has lower test error than plain-20",
                  "option B has lower test error than option A (20 layers)"):
        assert f"- {claim}: " in findings and "one seed)" in findings


def test_a_finding_says_holds_by_how_much_and_against_the_seed_spread():
    from deepres.experiments.cifar import lower

    assert lower("B below A", [8.0], [7.5]) == "- B below A: holds (by 0.50 points, one seed)"
    assert lower("B below A", [7.0, 7.2], [7.5, 7.3]) == \
        "- B below A: does not hold (0.30 points the other way; seed spread 0.14: beyond it)"
    assert lower("B below A", [7.0, 8.0], [6.9, 7.5]) == \
        "- B below A: holds (by 0.30 points; seed spread 0.71: within it)"
    assert lower("B below A", [21.08, 20.76], [20.31, 21.53]) == \
        "- B below A: does not hold (equal means; seed spread 0.86: within it)"
    assert lower("B below A", [7.0], [float("nan")]).endswith("not measured (a run missing or diverged)")
    assert lower("B below A", [], [7.0]).endswith("not measured (a run missing or diverged)")


def test_depths_outside_an_experiment_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--depths \\[21\\]"):
        run_experiment("cifar-table6", Options(scale="smoke", out=tmp_path, depths=[21]))


@pytest.mark.slow
def test_zoo_and_imagenet_smoke(tiny_cifar, tmp_path):
    options = Options(scale="smoke", data_dir=str(tiny_cifar), out=tmp_path)
    zoo = run_experiment("zoo-cifar", options).read_text()
    for label in ["AlexNet", "VGG-16 (BN)", "GoogLeNet", "DenseNet-BC-100 (k=12)", "SE-ResNet-18", "EfficientNet-B0",
                  "Deformable ResNet-50", "ResNeXt-50 (32x4d)", "Wide ResNet-50-2"]:
        assert f"| {label} |" in zoo
    imagenet = run_experiment("imagenet", options).read_text()
    for key in ["plain18", "plain34", "resnet18-A", "resnet34-A", "resnet34-B", "resnet34-C", "resnet50-B"]:
        assert f"| {key} |" in imagenet
    assert "| resnet34-C | 22.7M | 3.83 |" in imagenet  # option C: projections on every shortcut


# About 40 s here: in the slow suite. The default suite keeps the concurrency itself (tests/test_benchmarks.py's
# run_concurrent tests) and the GPU pass's concurrent deepres-train runs (tests/test_gpu_pass.py).
@pytest.mark.slow
def test_parallel_runs_are_deepres_train_processes_that_feed_every_report(tiny_cifar, tmp_path):
    """--parallel 2 on the CPU: two `deepres train` processes side by side; their run folders (metrics, summaries,
    last.pt and best.pt) serve the degradation report, Table 6 and the layer responses, and `deepres eval` reads the
    checkpoint. A second invocation trains nothing."""
    import json
    import subprocess
    import sys

    options = Options(scale="smoke", data_dir=str(tiny_cifar), out=tmp_path, depths=[20], parallel=2)
    text = run_experiment("cifar-degradation", options).read_text()
    assert "| Plain-20 |" in text and "| ResNet-20 |" in text
    assert "Engine: the training loop (`deepres train`), 2 runs, 2 processes at a time: eager step, fp32 (2)" in text
    assert "Training on every training image, no validation split" in text
    for net in ["plain20", "resnet20"]:
        run = tmp_path / "runs" / f"cifar10-{net}-s0"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["iterations"] == 24 and summary["step"] == "eager" and summary["amp"] == "off"
        assert {"last.pt", "best.pt"} <= {p.name for p in (run / "checkpoints").iterdir()}
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "test_top1_error" in r] == [12, 24]
        assert [r["step"] for r in rows if "train_top1_error" in r] == list(range(4, 25, 4))
        assert "deepres train: " in (run / "train.log").read_text()
    stamp = (tmp_path / "runs" / "cifar10-resnet20-s0" / "summary.json").stat().st_mtime_ns
    responses = run_experiment("layer-responses", options).read_text()
    assert "| plain-20 | 19 |" in responses and "| resnet-20 | 19 |" in responses
    assert (tmp_path / "runs" / "cifar10-resnet20-s0" / "summary.json").stat().st_mtime_ns == stamp

    ckpt = tmp_path / "runs" / "cifar10-resnet20-s0" / "checkpoints" / "last.pt"
    out = subprocess.run([sys.executable, "-m", "deepres", "eval", str(ckpt), "--split", "test"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((ckpt.parents[1] / "summary.json").read_text())
    assert f"{summary['test_top1_error']:.2f}" in out.stdout  # the same 200 test images, the same weights

    # A run with a checkpoint and no summary (killed) resumes from its last.pt in its process; its final checkpoint
    # was at step 24, so nothing retrains and the final test row is written once.
    run = ckpt.parents[1]

    def rows():  # without the timings
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "elapsed_s")}
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    before = rows()
    (run / "summary.json").unlink()
    run_experiment("cifar-table6", options)
    assert json.loads((run / "summary.json").read_text())["iterations"] == 24 and rows() == before

    # Fig. 7 over seeds: a second seed at depth 20 trains two more runs; each net's mean std over the seeds, and the
    # findings weigh the difference against the seeds' spread.
    responses = run_experiment("layer-responses", dataclasses.replace(options, seeds=2, depths=[20])).read_text()
    assert re.search(r"\| resnet-20 \| 19 \| \d\.\d{3} \+/- \d\.\d{3} \(n=2\) \|", responses)
    assert re.search(r"\| plain-20 \| 19 \| \d\.\d{3} \+/- \d\.\d{3} \(n=2\) \|", responses)
    finding = responses.split("## The paper's findings on our runs", 1)[1]
    assert re.search(r"- ResNet-20's responses are smaller than plain-20's \(mean std \d\.\d{3} vs \d\.\d{3}\): "
                     r"(holds \(by|does not hold \()\d\.\d{3}.*; seed spread \d\.\d{3}: (beyond|within) it\)", finding)
    assert "ResNet-56" not in finding and (tmp_path / "runs" / "cifar10-plain20-s1" / "summary.json").is_file()
    # Table 6 over the same two seeds (nothing trains): mean +/- std, the plot with the seeds' spread
    stamp = (tmp_path / "runs" / "cifar10-resnet20-s1" / "summary.json").stat().st_mtime_ns
    plot = tmp_path / "cifar-table6" / "plots" / "table6.png"
    plot.unlink()
    table = run_experiment("cifar-table6", dataclasses.replace(options, seeds=2, depths=[20])).read_text()
    assert re.search(r"\| ResNet-20 \| 0\.27M \| 0\.27M \| \d+\.\d\d \+/- \d+\.\d\d \(n=2\) \|", table)
    assert plot.stat().st_size > 0
    assert (tmp_path / "runs" / "cifar10-resnet20-s1" / "summary.json").stat().st_mtime_ns == stamp


def test_waves_put_a_student_after_its_teacher(tmp_path):
    from deepres.experiments.base import EXPERIMENTS, Options as O, _waves, run_overrides

    options = O(scale="smoke", out=tmp_path, seeds=1)
    planned = [(s, tmp_path / "runs" / s.name, run_overrides(s, options, gpu=False))
               for s in EXPERIMENTS["semi-supervised"].plan(options)]
    waves = [[spec.name for spec, _, _ in wave] for wave in _waves(planned)]
    assert waves == [["eff-semi-labeled-s0"], ["eff-semi-pseudo-s0", "eff-semi-noisy1-s0"], ["eff-semi-noisy2-s0"]]


def test_shortened_schedule_keeps_the_paper_fractions(tmp_path):
    from deepres.config import load_config
    from deepres.experiments.base import EXPERIMENTS, command_line

    options = Options(scale="full", out=tmp_path, depths=[56], iterations=1600, parallel=3,
                      overrides=["train.amp=bf16"])
    (spec,) = [s for s in EXPERIMENTS["cifar-table6"].plan(options)]
    config = load_config(spec.recipe, spec.overrides)
    assert config.train.iterations == 1600 and list(config.schedule.milestones) == [800, 1200]
    assert config.train.test_every == 200 and config.train.checkpoint_every == 200
    assert config.optim.lr == 0.1 and config.train.batch_size == 128  # the paper's, unscaled at full scale
    assert config.data.val_size == 0 and config.train.amp == "off"  # all 50k images, fp32: the paper
    assert command_line("cifar-table6", options) == \
        "deepres reproduce cifar-table6 --scale full --seeds 1 --depths 56 --iterations 1600 --parallel 3 " \
        "--set train.amp=bf16"
    with pytest.raises(ValueError, match="CIFAR paper experiments"):
        run_experiment("zoo-cifar", Options(scale="smoke", out=tmp_path, iterations=1600))
