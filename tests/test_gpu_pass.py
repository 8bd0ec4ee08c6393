"""The GPU evidence pass end to end on the CPU (``make gpu-check ARGS=--smoke``): every item at tiny sizes, the budget
(an item past its timeout is recorded and the next one runs; an item that will not fit is skipped), the one archive,
and unpacking it into the tree with the reports regenerated from the returned runs."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from deepres.benchmarks import gpu_pass
from deepres.benchmarks.gpu_pass import ARCHIVE, ARCHIVE_LIMIT, FP32_RUN, WARMUP_RUN, extra_archives, pack, unpack

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"benchmark", "device", "torch", "metric", "ours", "reference", "ratio", "target"}


@pytest.fixture(scope="module")
def smoke_pass(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-pass")
    # cifar-rest runs the same code as cifar-full (other nets), so the suite leaves it out to save its 10 s.
    items = ("env,slow,cuda-tests,cifar-steps,imagenet-throughput,inference,cifar-full,cifar-speedrun,jpeg-pipeline,"
             "augment")
    proc = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}",
                           f"ARGS=--smoke --out {out} --budget-s 600 --inject-slow 3 --items {items} "
                           f"--committed {out / 'nothing-committed'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    return out, proc


def test_every_item_runs_and_a_slow_one_is_stopped(smoke_pass):
    out, proc = smoke_pass
    assert proc.returncode != 0, proc.stderr[-3000:]  # not every item ok: the injected slow one timed out
    items = json.loads((out / "pass" / "items.json").read_text())["items"]
    status = {row["item"]: row["status"] for row in items}
    assert status.pop("slow") == "timeout"
    assert set(status.values()) == {"ok"}, items
    assert list(status) == ["env", "cuda-tests", "cifar-steps", "imagenet-throughput", "inference", "cifar-full",
                            "cifar-speedrun", "jpeg-pipeline", "augment"]
    assert "item" in proc.stdout.splitlines()[-len(items) - 2] and "archive" in proc.stdout.splitlines()[-1]


def test_one_archive_under_the_limit_holding_every_result(smoke_pass):
    out, _ = smoke_pass
    archives = [out / ARCHIVE, *extra_archives(out / ARCHIVE)]
    assert sorted(p for p in out.iterdir() if p.is_file()) == sorted(archives)
    names = set()
    for path in archives:
        assert path.stat().st_size < ARCHIVE_LIMIT
        with tarfile.open(path) as tar:
            names |= set(tar.getnames())
    for name in ("pass/items.json", "pass/results/env.json", "pass/results/test_cuda.xml",
                 f"pass/runs/{FP32_RUN}/summary.json", "pass/runs/cifar10-resnet56-s0/checkpoints/last.pt",
                 "pass/logs/cifar-full.log"):
        assert name in names, name
    assert not any("tensorboard" in n or n.endswith("best.pt") for n in names)


def test_checkpoints_past_the_limit_go_into_weights_archives_and_come_back(tmp_path, monkeypatch):
    """With a 600 kB limit: the main archive holds the full-length runs' checkpoints first, the others go into at most
    EXTRA_FILES weights archives, each under the limit; what fits nowhere is named in a DROPPED note; unpacking
    restores every packed checkpoint bit for bit."""
    monkeypatch.setattr(gpu_pass, "ARCHIVE_LIMIT", 600_000)
    monkeypatch.setattr(gpu_pass, "EXTRA_FILES", 2)
    work, out = tmp_path / "work", tmp_path / "out"
    sizes = {"cifar10-resnet20-s0": 40_000, FP32_RUN: 40_000, "cifar10-resnet56-s0": 60_000,
             "cifar10-resnet110-s0": 120_000, "cifar10-plain110-s0": 120_000, "cifar10-resnet44-s0": 80_000,
             "cifar10-plain44-s0": 80_000, "cifar10-resnet32-s0": 50_000}  # float32 counts: 160-480 kB each
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(n, generator=generator) for name, n in sizes.items()}
    for name, w in weights.items():
        (work / "runs" / name / "checkpoints").mkdir(parents=True)
        torch.save({"model": {"w": w}}, work / "runs" / name / "checkpoints" / "last.pt")
        (work / "runs" / name / "metrics.jsonl").write_text('{"step": 1}\n')
    out.mkdir()
    (out / gpu_pass.EXTRA.format(3)).write_text("a stale weights archive of an earlier packing")
    archive = pack(work, out / ARCHIVE)
    extras = extra_archives(archive)
    assert 1 <= len(extras) <= 2 and all(p.stat().st_size <= 600_000 for p in [archive, *extras])
    packed = {}
    for path in [archive, *extras]:
        with tarfile.open(path) as tar:
            packed[path.name] = {n.split("/")[2] for n in tar.getnames() if n.endswith("last.pt")}
    assert {"cifar10-resnet20-s0", FP32_RUN, "cifar10-resnet56-s0"} <= packed[ARCHIVE]
    everywhere = [name for names in packed.values() for name in names]
    assert len(everywhere) == len(set(everywhere))  # each checkpoint in one archive
    with tarfile.open(archive) as tar:
        dropped = {n.split("/")[2] for n in tar.getnames() if n.endswith("DROPPED")}
    assert dropped and set(everywhere) | dropped == set(sizes) and not set(everywhere) & dropped
    unpack(archive, tmp_path / "tree")
    for name in everywhere:
        state = torch.load(tmp_path / "tree" / "docs" / "results" / "full" / "runs" / name / "checkpoints" / "last.pt",
                           weights_only=True)
        assert torch.equal(state["model"]["w"], weights[name])


def test_unpack_puts_results_runs_and_reports_into_the_tree(smoke_pass, tmp_path):
    out, _ = smoke_pass
    stale = tmp_path / "docs" / "results" / "full" / "runs" / "cifar10-resnet56-s0" / "from-an-earlier-start.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("a returned run folder replaces the tree's copy whole")
    done = unpack(out / ARCHIVE, tmp_path)
    assert not stale.exists()
    results = tmp_path / "benchmarks" / "results"
    # The benchmarks the pass runs, each a complete result file (these are their smoke tests).
    higher_is_better = {"imagenet-throughput-resnet18": True, "inference-resnet18": True, "cifar-speedrun": False,
                        "jpeg-pipeline": True, "cifar-recipe-resnet20": False, "cifar-recipe-resnet56": False,
                        "augment": True}
    for prefix, higher in higher_is_better.items():
        (path,) = results.glob(f"{prefix}-cpu*.json")
        result = json.loads(path.read_text())
        assert KEYS <= set(result) and result["device"].startswith("cpu")
        assert result["ours"] > 0 and result["reference"] > 0
        ratio = result["ours"] / result["reference"] if higher else result["reference"] / result["ours"]
        assert result["ratio"] == pytest.approx(ratio)
        assert result.get("meets_target") in (False, None)  # targets are met only on the GPU at full size
    speedrun = json.loads(next(results.glob("cifar-speedrun-cpu*.json")).read_text())
    assert speedrun["curve_ours"] and all(0 <= p["test_accuracy"] <= 100 for p in speedrun["curve_ours"])
    steps = json.loads(next(results.glob("cifar-steps-cpu*.json")).read_text())
    (alone,) = steps["nets"].values()  # ResNet-20 alone: 3 untimed steps, 4 timed, projected to the 12 of the smoke
    assert alone["seconds_per_step"] > 0 and alone["first_steps_seconds"] > 0
    assert alone["projected_recipe_seconds"] == pytest.approx(alone["first_steps_seconds"]
                                                              + 9 * alone["seconds_per_step"])
    full = json.loads(next(results.glob("cifar-full-cpu*.json")).read_text())
    assert set(full["runs"]) == {"cifar10-resnet20-s0", "cifar10-resnet56-s0", "cifar10-plain20-s0",
                                 "cifar10-plain56-s0", FP32_RUN, WARMUP_RUN}
    assert all(r["iterations"] == 12 for r in full["runs"].values())
    # ResNet-20 and ResNet-56 alone first, after the reference: their cifar-recipe files; the others side by side.
    assert full["alone"] == ["cifar10-resnet20-s0", "cifar10-resnet56-s0"] and set(full["reference"]) == {
        "resnet20", "resnet56"}
    assert [name for name, r in full["runs"].items() if r["alone"]] == full["alone"]
    recipe = json.loads(next(results.glob("cifar-recipe-resnet56-cpu*.json")).read_text())
    assert recipe["concurrent_runs"] == 1 and recipe["ours"] == full["runs"]["cifar10-resnet56-s0"]["train_seconds"]
    assert set(full["resnet20_test_error"]) == {"bf16 (fast settings)", "fp32 (paper)"}
    assert set(full["resnet56_test_error"]) == {"paper start (lr 0.1)", "linear warm-up over 1%"}
    docs = tmp_path / "docs" / "results" / "full"
    (record,) = (docs / "gpu-pass").iterdir()  # the pass's own folder, named by its start (UTC)
    assert record.name.endswith("Z") and record.name[:2] == "20" and done["record"] == str(record)
    assert {"items.json", "env.json", "test_cuda.xml", "logs"} <= {p.name for p in record.iterdir()}
    assert len(done["reports"]) == 3
    precision = (docs / "precision" / "report.md").read_text()
    errors = {name: json.loads((docs / "runs" / name / "summary.json").read_text())["test_top1_error"]
              for name in ("cifar10-resnet20-s0", FP32_RUN, "cifar10-resnet56-s0", WARMUP_RUN)}
    row = f"| ResNet-20 | {FP32_RUN} | eager step, fp32 | the paper's fp32 | {errors[FP32_RUN]:.2f} | 8.75 |"
    assert row in precision
    bf16_vs_fp32 = errors["cifar10-resnet20-s0"] - errors[FP32_RUN]
    assert f"- ResNet-20, the fast settings against the paper's fp32: {bf16_vs_fp32:+.2f} points" in precision
    assert "12 iterations at batch 8" in precision
    degradation = (docs / "cifar-degradation" / "report.md").read_text()
    for net in ("Plain-20", "Plain-56", "ResNet-20", "ResNet-56"):
        assert f"| {net} |" in degradation
    table = (docs / "cifar-table6" / "report.md").read_text()
    assert "6.43 (best of 5); 6.61 +/- 0.16 (mean of 5)" not in table  # ResNet-110 is not among depths 20 and 56
    assert "| ResNet-56 | 0.85M | 0.85M |" in table and "Engine: the training loop" in table


def test_what_an_earlier_pass_brought_back_is_not_run_again(smoke_pass, tmp_path):
    """The first pass's result files and finished runs, put where ``unpack`` puts them, make a second pass skip those
    items (after ``env`` names the device); ``--redo`` runs them again."""
    out, _ = smoke_pass
    root = tmp_path / "tree"
    unpack(out / ARCHIVE, root)
    committed, runs = root / "benchmarks" / "results", root / "docs" / "results" / "full" / "runs"

    def second_pass(items="env,cuda-tests,cifar-steps,inference,cifar-full,jpeg-pipeline", *extra):
        again = tmp_path / f"again-{len(list(tmp_path.iterdir()))}"
        proc = subprocess.run([sys.executable, "-m", "deepres.benchmarks.gpu_pass", "--smoke", "--out", str(again),
                               "--committed", str(committed), "--resume-from", str(runs), "--items", items, *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        return {r["item"]: r for r in json.loads((again / "pass" / "items.json").read_text())["items"]}, proc

    rows, proc = second_pass()
    assert {name: row["status"] for name, row in rows.items()} == {
        "env": "ok", "cuda-tests": "skipped", "cifar-steps": "skipped", "inference": "skipped", "cifar-full": "skipped",
        "jpeg-pipeline": "skipped"}, proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:]  # skipped as done before: nothing failed or was left out
    # The CUDA tests passed on this code in the first pass's record; other code (a changed source) runs them again.
    assert "passed with this code on this device" in rows["cuda-tests"]["error"]
    records, label = root / "docs" / "results" / "full" / "gpu-pass", json.loads(
        next(root.glob("docs/results/full/gpu-pass/*/env.json")).read_text())["device_label"]
    assert gpu_pass._tests_passed_on(gpu_pass.code_fingerprint(ROOT), label, records)
    assert gpu_pass._tests_passed_on("0" * 16, label, records) is None
    junit = next(records.glob("*/test_cuda.xml"))  # a report with skipped tests (no GPU there) is no pass
    junit.write_text(junit.read_text().replace('skipped="0"', 'skipped="1"', 1))
    assert gpu_pass._tests_passed_on(gpu_pass.code_fingerprint(ROOT), label, records) is None
    assert "committed: " in rows["inference"]["error"] and "inference-resnet18-cpu" in rows["inference"]["error"]
    assert "6 finished runs" in rows["cifar-full"]["error"]
    (committed / next(committed.glob("jpeg-pipeline-*.json")).name).unlink()  # no longer committed: it runs
    steps = next(committed.glob("cifar-steps-*.json"))  # an item stopped before it finished: it runs again
    result = json.loads(steps.read_text())
    assert list(result["nets"]) == ["resnet20"] and "unfinished" not in result
    steps.write_text(json.dumps({**result, "unfinished": "not yet timed: resnet56"}))
    rows, _ = second_pass("env,cifar-steps,inference,jpeg-pipeline")
    assert rows["jpeg-pipeline"]["status"] == "ok" and rows["inference"]["status"] == "skipped"
    assert rows["cifar-steps"]["status"] == "ok"
    rows, _ = second_pass("env,inference", "--redo")
    assert rows["inference"]["status"] == "ok"
    # cifar-full again with an --alone run an earlier pass cut short (no summary; started alone once): it starts
    # again from scratch, alone, and the five runs an earlier pass finished are not trained again.
    resnet56 = runs / "cifar10-resnet56-s0"
    (resnet56 / "summary.json").unlink()
    (resnet56 / gpu_pass.ALONE_MARKER).write_text("1\n")
    rows, proc = second_pass("env,cifar-full")
    assert rows["cifar-full"]["status"] == "ok", proc.stdout[-3000:]
    again = max(tmp_path.glob("again-*"), key=lambda p: int(p.name.split("-")[1])) / "pass"
    assert sorted(p.name for p in (again / "runs").iterdir()) == ["cifar10-resnet56-s0"]
    full = json.loads(next((again / "results").glob("cifar-full-*.json")).read_text())
    assert len(full["earlier_pass"]) == 5 and full["runs"][WARMUP_RUN]["earlier_pass"]
    assert full["alone"] == ["cifar10-resnet56-s0"] and set(full["reference"]) == {"resnet56"}
    retried = full["runs"]["cifar10-resnet56-s0"]
    assert retried["iterations"] == 12 and retried["alone"] and not retried["resumed"]
    assert (again / "runs" / "cifar10-resnet56-s0" / gpu_pass.ALONE_MARKER).read_text() == "2\n"
    metrics = (again / "runs" / "cifar10-resnet56-s0" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[0])["step"] < 12  # trained from the start, not continued
    assert next((again / "results").glob("cifar-recipe-resnet56-*.json"))


def test_the_precision_report_compares_each_pair_and_names_a_diverged_run(tmp_path):
    errors = {"cifar10-resnet20-s0": 8.5, FP32_RUN: 8.95, "cifar10-resnet56-s0": None, WARMUP_RUN: 6.9}
    for name, error in errors.items():
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("train:\n  batch_size: 128\n")
        summary = {"iterations": 64000, "splits": {"train": 50000, "test": 10000}, "data": "cifar10-jpeg",
                   "amp": "off" if name == FP32_RUN else "bf16", "tf32": False, "step": "graph",
                   "channels_last": name != FP32_RUN, "train_seconds": 50.0}
        if error is None:
            summary["diverged"] = True
        else:
            summary["test_top1_error"] = error
        (run / "summary.json").write_text(json.dumps(summary))
    text = gpu_pass.precision_report(tmp_path, {"gpu": "NVIDIA H200", "torch": "2.11.0"}).read_text()
    assert "Device: NVIDIA H200; torch 2.11.0" in text and "64,000 iterations at batch 128 on 50,000" in text
    assert f"| ResNet-20 | {FP32_RUN} | graph step, fp32 (no TF32) | the paper's fp32 | 8.95 | 8.75 | 50 |" in text
    assert "| ResNet-20 | cifar10-resnet20-s0 | graph step, bf16, channels_last |" in text
    assert "the fast settings against the paper's fp32: -0.45 points (beyond the seed spread)" in text
    assert "no comparison, cifar10-resnet56-s0 diverged" in text and "| diverged | 6.97 |" in text
    (tmp_path / "runs" / WARMUP_RUN / "summary.json").unlink()
    assert gpu_pass.precision_report(tmp_path, {}) is None  # a pair not complete yet: no report


def test_a_smoke_pass_never_continues_the_committed_full_length_runs(monkeypatch):
    seen = []
    monkeypatch.setattr(gpu_pass, "cifar", lambda args: seen.append(args.resume_from) or 0)
    for smoke in ([], ["--smoke"]):
        gpu_pass.main(["cifar", "--nets", "resnet20", "--runs", "r", "--results", "x", *smoke])
    assert seen[0] == gpu_pass.RESUME_FROM == str(Path("docs/results/full/runs"))
    assert "docs" not in seen[1] and Path(seen[1]).is_relative_to(gpu_pass.SCRATCH)


def test_unpack_refuses_a_member_that_leaves_the_tree(tmp_path):
    """The archive comes from another machine: a member outside the staging folder is an error naming it, and
    nothing lands in the tree (checked by deepres's own extraction, on any Python)."""
    import io

    archive = tmp_path / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        data = b"{}"
        member = tarfile.TarInfo("pass/../../evil.json")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    root = tmp_path / "tree"
    with pytest.raises(ValueError, match=r"evil.json.*escapes"):
        unpack(archive, root)
    assert not (tmp_path / "evil.json").exists() and not (root / "benchmarks").exists()


def test_the_data_archive_reaches_every_item_that_reads_cifar(tmp_path):
    """On the GPU machine the archive travels in a folder of its own (.gpu/): each item that reads CIFAR-10 gets its
    path, none looks for ../shared/data there."""
    import argparse

    args = argparse.Namespace(smoke=False, resume_from="r", data=".gpu/cifar10-jpeg.tar.gz", inject_slow=0,
                              items=None)
    items = {item.name: item.argv for item in gpu_pass.plan(args, tmp_path)}
    for name in ("cifar-steps", "cifar-full", "cifar-speedrun", "augment", "cifar-rest"):
        argv = items[name]
        assert argv[argv.index("--data") + 1] == ".gpu/cifar10-jpeg.tar.gz", name


def test_an_item_that_does_not_fit_is_skipped(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "deepres.benchmarks.gpu_pass", "--smoke", "--out", str(out),
                           "--budget-s", "40", "--items", "cifar-full"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    items = json.loads((out / "pass" / "items.json").read_text())["items"]
    assert [(r["item"], r["status"]) for r in items] == [("cifar-full", "skipped")], proc.stdout
    assert "needs 60" in items[0]["error"] and (out / ARCHIVE).is_file() and proc.returncode == 1
