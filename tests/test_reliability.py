"""Nothing lost, nothing silently wrong: one run per folder, logs that resume exactly, verified checkpoints, image
bombs, refused settings, I/O faults named, finished runs reused only for their own config."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from deepres.config import load_config
from deepres.data import BadImageError, decode_image_bytes
from deepres.engine import load_checkpoint, train
from deepres.engine.logging import read_metrics
from deepres.runs import CheckpointError

from .helpers import make_idx_dataset
from .test_engine import small_overrides

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "src/deepres/recipes/toolkit/demo.yaml")


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    return make_idx_dataset(tmp_path_factory.mktemp("idx-reliability"))


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "deepres", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600, **kw)


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "tensorboard" not in p.parts and p.name != ".lock"}


def _rows(run: Path, key: str = "train_loss") -> list[tuple]:
    return [(r["step"], r[key]) for r in read_metrics(run / "metrics.jsonl") if key in r]


# ---------------------------------------------------------------------------------------------------------------
# One run per folder


def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(idx_data, tmp_path):
    run = tmp_path / "run"
    sets = _sets(small_overrides(idx_data, **{"train.iterations": 400, "train.checkpoint_every": 1000}))
    first = subprocess.Popen([sys.executable, "-m", "deepres", "train", "--recipe", DEMO, "--run-dir", str(run),
                              *sets], cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _rows(run):
            time.sleep(0.05)
        second = _cli(["train", "--recipe", DEMO, "--run-dir", str(run), "--resume", "auto", *sets])
        assert second.returncode == 1
        assert str(run) in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    steps = [s for s, _ in _rows(run)]
    assert steps == sorted(set(steps))  # one writer: every step logged once


def test_earlier_run_files_without_resume_are_refused_and_untouched(idx_data, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, small_overrides(idx_data, **{"train.iterations": 5})), run, quiet=True)
    for leftover in ("last.pt", "best.pt"):
        (run / "checkpoints" / leftover).unlink()  # an earlier run's logs and config, no checkpoint
    before = _digest(run)
    result = _cli(["train", "--recipe", DEMO, "--run-dir", str(run),
                   *_sets(small_overrides(idx_data, **{"train.iterations": 5}))])
    assert result.returncode == 1 and "already holds a run" in result.stderr and "metrics.jsonl" in result.stderr
    assert _digest(run) == before


# ---------------------------------------------------------------------------------------------------------------
# Exact resume covers the logs


def test_a_resume_inside_a_log_window_logs_what_the_uninterrupted_run_logs(idx_data, tmp_path, monkeypatch):
    """log_every=5, SIGTERM after step 31 (the checkpoint it writes lies inside a log window): the resumed run's rows
    at 35 and 40 equal the uninterrupted run's; no row is logged twice."""
    from deepres.engine import TrainingInterrupted
    from deepres.engine import loop

    config = load_config(None, small_overrides(idx_data, **{"train.log_every": 5, "train.checkpoint_every": 50,
                                                             "train.eval_every": 50, "train.iterations": 40}))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, straight, quiet=True)
    build = loop.build_step

    def step_then_signal(*args, **kwargs):  # a real SIGTERM, delivered right after the 31st step
        step = build(*args, **kwargs)
        calls = []

        def call(images, targets):
            out = step(images, targets)
            calls.append(1)
            if len(calls) == 31:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        return _Calling(step, call)

    monkeypatch.setattr(loop, "build_step", step_then_signal)
    with pytest.raises(TrainingInterrupted):
        train(config, resumed, quiet=True)
    monkeypatch.setattr(loop, "build_step", build)
    assert load_checkpoint(resumed / "checkpoints" / "last.pt")["step"] == 31
    train(config, resumed, resume="auto", quiet=True)
    for key in ("train_loss", "train_top1_error"):
        assert _rows(resumed, key) == _rows(straight, key)


class _Calling:
    """A step whose call is replaced (instances' __call__ is not looked up on the instance)."""

    def __init__(self, step, call):
        self._step, self._call = step, call

    def __call__(self, images, targets):
        return self._call(images, targets)

    def __getattr__(self, name):
        return getattr(self._step, name)


def test_a_run_killed_before_its_first_checkpoint_starts_its_log_afresh(idx_data, tmp_path):
    overrides = small_overrides(idx_data, **{"train.iterations": 12, "train.checkpoint_every": 50})
    straight = tmp_path / "straight"
    train(load_config(None, overrides), straight, quiet=True)
    killed = tmp_path / "killed"
    train(load_config(None, small_overrides(idx_data, **{"train.iterations": 7, "train.checkpoint_every": 50})),
          killed, quiet=True)
    for name in ("last.pt", "best.pt"):
        (killed / "checkpoints" / name).unlink()  # as if killed at step 7, before any checkpoint
    (killed / "summary.json").unlink()
    train(load_config(None, overrides), killed, resume="auto", quiet=True)
    assert _rows(killed) == _rows(straight)  # steps 1-7 once, from the new start


def test_resuming_with_another_batch_size_or_seed_is_refused(idx_data, tmp_path):
    train(load_config(None, small_overrides(idx_data, **{"train.iterations": 6})), tmp_path / "run", quiet=True)
    for key, value in (("train.batch_size", 16), ("train.seed", 3)):
        config = load_config(None, small_overrides(idx_data, **{"train.iterations": 12, key: value}))
        with pytest.raises(ValueError, match=f"cannot resume .*{key}.*model.init"):
            train(config, tmp_path / "run", resume="auto", quiet=True)




def test_a_run_that_fails_while_training_says_where_it_can_continue(idx_data, tmp_path, monkeypatch, capsys):
    import deepres.engine
    from deepres.cli import main

    run, sets = tmp_path / "run", _sets(small_overrides(idx_data, **{"train.iterations": 4}))
    train(load_config(None, small_overrides(idx_data, **{"train.iterations": 4})), run, quiet=True)

    def killed(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")

    monkeypatch.setattr(deepres.engine, "train", killed)
    assert main(["train", "--recipe", DEMO, "--run-dir", str(run), "--resume", "auto", *sets]) == 1
    err = capsys.readouterr().err
    assert "pid 4242" in err and f"{run} keeps its last checkpoint (step 4)" in err and "--resume auto" in err, err
    assert main(["train", "--recipe", DEMO, "--run-dir", str(tmp_path / "new"), *sets]) == 1
    assert "keeps its last checkpoint" not in capsys.readouterr().err  # no checkpoint: nothing to continue from


def test_a_bad_image_met_while_training_keeps_the_steps_before_it(tmp_path):
    """data.on_bad_image=error on the worker loader: the file is named when a batch draws it, last.pt holds every
    step before that one, and the run resumes from there with the file skipped."""
    from .test_data_common import make_image_folder

    root = make_image_folder(tmp_path / "folder", n_train=40)  # 120 images: 30 steps of 4 draw each once
    (root / "train" / "bee" / "0009.png").write_bytes(b"truncated")  # imagenet normalisation: nothing sampled
    sets = [f"data.data_dir={root}", "data.source=imagefolder", "data.loader=workers", "data.num_workers=0",
            "data.normalize=imagenet", "data.val_size=0", "train.batch_size=4", "train.eval_batch_size=16",
            "train.checkpoint_every=100", "model.options.widths=[4, 8, 16]"]
    run = tmp_path / "run"
    failed = _cli(["train", "--recipe", DEMO, "--run-dir", str(run), *_sets(sets + ["train.iterations=30"])])
    assert failed.returncode == 1, failed.stderr
    message = failed.stderr.strip().splitlines()[-1]
    step = int(message.split("drawn for step ")[1].split(";")[0])
    assert "cannot decode image" in message and "0009.png" in message and "data.on_bad_image=skip" in message
    assert step > 1 and f"holds the {step - 1} steps before it: --resume auto continues there" in message
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == step - 1
    resumed = _cli(["train", "--recipe", DEMO, "--run-dir", str(run), "--resume", "auto",
                    *_sets(sets + ["train.iterations=30", "data.on_bad_image=skip"])])
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {step - 1} of 30" in resumed.stderr and "0009.png" in resumed.stderr
    assert json.loads((run / "summary.json").read_text())["iterations"] == 30


def test_a_resume_with_changed_settings_says_which_and_from_when(idx_data, tmp_path):
    train(load_config(None, small_overrides(idx_data, **{"train.iterations": 4})), tmp_path / "run", quiet=True,
          on_step=lambda step, info: step < 2)  # stopped at step 2
    cadence = load_config(None, small_overrides(idx_data, **{"train.iterations": 4, "train.log_every": 2}))
    summary = train(cadence, tmp_path / "run", resume="auto", quiet=True)
    assert summary["iterations"] == 4 and not [n for n in summary["notices"] if "resumed" in n], summary["notices"]
    longer = load_config(None, small_overrides(idx_data, **{"train.iterations": 6, "optim.lr": 0.02}))
    notices = [n for n in train(longer, tmp_path / "run", resume="auto", quiet=True)["notices"] if "resumed" in n]
    assert len(notices) == 1 and "at step 4" in notices[0], notices
    assert "train.iterations 4 -> 6" in notices[0] and "optim.lr 0.05 -> 0.02" in notices[0], notices
# ---------------------------------------------------------------------------------------------------------------
# Checkpoint integrity


def _flip_inside_a_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = record.header_offset + 30  # the local header, then its name and extra field
    name_len, extra_len = int.from_bytes(data[start - 4:start - 2], "little"), int.from_bytes(data[start - 2:start],
                                                                                                "little")
    middle = start + name_len + extra_len + record.file_size // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_an_error_naming_it(idx_data, tmp_path):
    train(load_config(None, small_overrides(idx_data, **{"train.iterations": 4})), tmp_path / "run", quiet=True)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    _flip_inside_a_tensor(last)
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        load_checkpoint(last)
    result = _cli(["eval", str(last)])
    assert result.returncode == 1 and str(last) in result.stderr and "Traceback" not in result.stderr


def test_checkpoints_follow_the_umask_and_partial_writes_are_removed(idx_data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # a crash mid-write
    old = os.umask(0o022)
    try:
        train(load_config(None, small_overrides(idx_data, **{"train.iterations": 3})), run, resume="auto", quiet=True)
    finally:
        os.umask(old)
    assert not list((run / "checkpoints").glob("*.tmp"))
    for path in (run / "checkpoints" / "last.pt", run / "metrics.jsonl"):
        assert path.stat().st_mode & 0o777 == 0o644, path


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def _huge_png(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width`` x ``height`` (its data is one row: the header check comes first)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _huge_jpeg(width: int, height: int) -> bytes:
    """A real 16x16 JPEG with its frame header's size rewritten."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("make", [_huge_png, _huge_jpeg], ids=["png", "jpeg"])
def test_a_decompression_bomb_is_a_named_bad_image(make):
    with pytest.raises(BadImageError, match=r"bomb\.img: 30000 x 30000 = 900,000,000 pixels, more than "
                                            r"data.max_image_pixels"):
        decode_image_bytes(make(30000, 30000), "bomb.img")


def test_a_bomb_in_a_folder_is_skipped_with_on_bad_image_skip(tmp_path):
    from PIL import Image

    from deepres.data import load_dataset

    for split, count in (("train", 6), ("test", 2)):
        for k in range(2):
            folder = tmp_path / "f" / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8, 3), 40 * k + i, np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "f" / "train" / "c0" / "bomb.png").write_bytes(_huge_png(30000, 30000))
    base = ["data.source=imagefolder", f"data.data_dir={tmp_path / 'f'}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.val_size=0"]
    with pytest.raises(BadImageError, match="bomb.png"):
        load_dataset(load_config(None, base).data)
    dataset = load_dataset(load_config(None, base + ["data.on_bad_image=skip"]).data)
    assert len(dataset.train) == 12 and any("bomb.png" in s and "pixels" in s for s in dataset.extra["skipped"])


def test_predict_decodes_as_training_does(tmp_path, idx_data):
    """An RGBA PNG is composited over white and a 16-bit PNG scaled, in `deepres predict` as in training."""
    from PIL import Image

    from deepres.data import read_image
    from deepres.engine.inference import load_image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent: white once composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(wide).save(tmp_path / "b.png")
    for name, channels in (("a.png", 3), ("b.png", 1)):
        trained = read_image(tmp_path / name)
        assert torch.equal(load_image(tmp_path / name, channels, (8, 8)), trained)
    assert (int(read_image(tmp_path / "a.png").min()) == 255
            and int(read_image(tmp_path / "b.png").max()) == round(63000 * 255 / 65535))


# ---------------------------------------------------------------------------------------------------------------
# Config errors and I/O faults


def test_every_config_error_exits_2(tmp_path):
    for args in (["config", "--recipe", "no_such_recipe"], ["config", "--set", "train.iterations=0"],
                 ["train", "--recipe", "demo", "--set", "optim.lr=nan"],
                 ["config", "--set", "train.batch_size=-4"], ["config", "--set", "optim.momentum=2"]):
        result = _cli(args)
        assert result.returncode == 2, (args, result.stderr)
        assert "config key" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_model_is_named_before_any_data_is_read(tmp_path):
    """The model is built on the meta device first: an unknown name or a refused option is a config error, not a
    wait for the data (or its download) that ends in one."""
    missing = tmp_path / "no-data-here"
    for settings, key, fragment in (
            (["model.name=resnet57"], "model.name", "close matches: resnet56"),
            (["model.options.widen=2"], "model.options", "unexpected keyword argument 'widen'"),
            (["model.name=googlenet", "model.stochastic_depth=0.1"], "model.stochastic_depth", "no residual blocks")):
        result = _cli(["train", "--recipe", "demo", *[a for s in settings for a in ("--set", s)],
                       "--set", f"data.data_dir={missing}", "--run-dir", str(tmp_path / "run")])
        assert result.returncode == 2, result.stderr
        assert f"config key '{key}'" in result.stderr and fragment in result.stderr, result.stderr
        assert "fashion_mnist" not in result.stderr and not missing.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_one_line_naming_it(idx_data, tmp_path):
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o555)
    try:
        result = _cli(["train", "--recipe", DEMO, "--run-dir", str(run),
                       *_sets(small_overrides(idx_data, **{"train.iterations": 3}))])
    finally:
        run.chmod(0o755)
    assert result.returncode == 1 and str(run) in result.stderr and "Traceback" not in result.stderr


def test_an_export_that_cannot_be_written_names_the_path(idx_data, tmp_path):
    train(load_config(None, small_overrides(idx_data, **{"train.iterations": 2})), tmp_path / "run", quiet=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    out = tmp_path / "missing" / "model.pt"
    result = _cli(["export", str(ckpt), "--format", "torchscript", "--out", str(out)])
    assert result.returncode == 1 and str(out) in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# Reproduce reuses a finished run only for its own config


def test_reproduce_refuses_a_finished_run_of_another_configuration(tmp_path):
    from deepres.experiments import Options, run_experiment

    from .helpers import make_image_folder

    def paint(img, k):
        img[:, :, k % 3] += np.uint8(40 + 15 * k)

    data = make_image_folder(tmp_path / "cifar10-jpeg", {"train": 12, "test": 6}, paint)
    run_experiment("cifar-table6", Options(scale="smoke", data_dir=str(data), out=tmp_path / "out", depths=[20]))
    summary = tmp_path / "out" / "runs" / "cifar10-resnet20-s0" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    with pytest.raises(ValueError, match="another configuration .*train.iterations"):
        run_experiment("cifar-table6", Options(scale="smoke", data_dir=str(data), out=tmp_path / "out",
                                               depths=[20], iterations=16))
    assert summary.stat().st_mtime_ns == stamp
    report = (tmp_path / "out" / "cifar-table6" / "report.md").read_text()
    assert json.loads(summary.read_text())["iterations"] == 24 and "| ResNet-20 |" in report


def test_a_failed_write_names_the_file_once():
    """A full disk under a checkpoint: one line, the file named once (it was "PATH: cannot write PATH: ...")."""
    import errno

    from deepres.cli import _one_line
    from deepres.runs import _write_failure

    best = Path("run") / "checkpoints" / "best.pt"
    full = _write_failure(best, OSError(errno.ENOSPC, "No space left on device"))
    assert _one_line(full) == f"cannot write {best}: No space left on device"
    assert _one_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "x.pt")) == \
        "x.pt: No such file or directory"
