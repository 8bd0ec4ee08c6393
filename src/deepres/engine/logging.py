"""Run logs: metrics.jsonl (one JSON object per logged step or evaluation), TensorBoard, progress on the terminal."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["MetricsWriter", "Progress", "read_metrics", "tensorboard_tag"]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: everything after it is unreliable
    return rows


def tensorboard_tag(key: str) -> str:
    """A metrics.jsonl key as a grouped TensorBoard tag: ``train_loss`` -> ``train/loss``, ``lr`` -> ``train/lr``."""
    for group in ("train", "val", "test"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1:]}"
    return f"train/{key}" if key in ("lr", "images_per_s") else f"run/{key}"


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` (flushed each row) and mirrors scalars to TensorBoard. Rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self._tb = None

    def truncate_after(self, step: int, drop=None) -> None:
        """On resume: keep rows up to ``step`` (the checkpoint), except those ``drop(row)`` is true for; later ones
        are recomputed identically."""
        if not self.enabled:
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step and not (drop and drop(r))]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(tensorboard_tag(k), v, step)

    def hparams(self, params: dict, metrics: dict) -> None:
        """The run's settings beside its final metrics (TensorBoard's HPARAMS tab compares runs by them)."""
        if self._tb is None:
            return
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        final = {f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._tb.add_hparams(flat, final, run_name=".")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar with ETA on a terminal; plain log lines when not a TTY (CI, files)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.total, self.start_step = total, start
        self.t0 = time.time()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def update(self, step: int, row: dict | None = None) -> None:
        if not self.enabled or (self.bar is None and not row):
            return
        if self.bar is not None:
            self.bar.n = step
            if row:
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if isinstance(v, float)}, refresh=False)
            self.bar.refresh()
        elif row:
            done = step - self.start_step
            elapsed = time.time() - self.t0
            eta = elapsed / done * (self.total - step) if done else float("nan")
            fields = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "elapsed_s")
            print(f"step {step}/{self.total} {fields} eta={eta:.0f}s", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
