"""Figures drawn from a run's metrics.jsonl, and a run's training images as it sees them (matplotlib, without a
display)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..engine.logging import read_metrics

__all__ = ["plot_run", "plot_training_images", "training_batch_images"]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Training error (thin, dashed) and validation/test error (bold) against iterations, as the paper's figures,
    and the training loss; written to ``run_dir/curves.png``. Returns the path, or None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["train_top1_error"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_top1_error"]) for r in rows if r.get("val_top1_error") is not None]
    test = [(r["step"], r["test_top1_error"]) for r in rows if r.get("test_top1_error") is not None]
    if not train:
        return None
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    steps, errors, losses = zip(*train)
    ax_err.plot(steps, errors, "--", lw=1, label="train error")
    if val:
        ax_err.plot(*zip(*val), "-", lw=2.5, label="val error")
    if test:
        ax_err.plot(*zip(*test), "o", ms=7, label=f"test error {test[-1][1]:.2f}%")
    ax_err.set(xlabel="iteration", ylabel="top-1 error (%)", title=run_dir.name)
    ax_err.set_ylim(0, min(100.0, max(list(errors) + [e for _, e in val + test]) * 1.05))
    ax_err.grid(alpha=0.3)
    ax_err.legend()
    ax_loss.plot(steps, losses, lw=1)
    ax_loss.set(xlabel="iteration", ylabel="training loss", yscale="log")
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def training_batch_images(config, rows: int = 4, columns: int = 8, notice: Callable[[str], object] | None = None
                          ) -> tuple[torch.Tensor, list[list[str]]]:
    """The first ``columns`` images of the first ``rows`` training batches of ``config`` as its run would train on
    them (the run's seed, batch size, loader and every augmentation, CutMix and erasing included), the normalisation
    undone: float (rows, columns, C, H, W) in [0, 1], and each image's label ("cat", or "cat 0.62 / dog 0.38" for a
    mixed one). The config is fitted to its data as the run fits it (``train.fit_to_data``), each change passed to
    ``notice``; a recipe that does not fit is an error naming the keys."""
    from ..data import build_data
    from ..engine.fit import fit_to_data

    config, notices = fit_to_data(config)
    for text in notices if notice is not None else []:
        notice(text)
    tc = config.train
    bundle = build_data(config.data, batch_size=tc.batch_size, eval_batch_size=tc.eval_batch_size, seed=tc.seed)
    classes = bundle.dataset.classes
    if columns > bundle.train.batch_size:
        raise ValueError(f"--columns {columns} is more than the batch size ({bundle.train.batch_size})")
    grid, labels = [], []
    for step in range(rows):
        x, y = bundle.train.batch(step)
        x = x[:columns].float().cpu()
        norm = bundle.normalizer
        grid.append((x * norm.std.float() + norm.mean.float()).clamp(0, 1))
        labels.append([_label(t, classes) for t in y[:columns].cpu()])
    return torch.stack(grid), labels


def _label(target: torch.Tensor, classes: list[str]) -> str:
    if not target.dtype.is_floating_point:
        return classes[int(target)]
    weights, top = target.topk(min(2, len(target)))
    if weights[0] > 0.995:
        return classes[int(top[0])]
    return " / ".join(f"{classes[int(k)]} {float(w):.2f}" for w, k in zip(weights, top) if w > 0.005)


def plot_training_images(config, out: str | Path, rows: int = 4, columns: int = 8,
                         notice: Callable[[str], object] | None = None) -> Path:
    """:func:`training_batch_images` as a grid (a row per batch) written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = training_batch_images(config, rows, columns, notice)
    side = 1.6 if images.shape[-1] < 64 else 2.2
    fig, axes = plt.subplots(rows, columns, figsize=(side * columns, side * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c in range(columns):
            ax = axes[r][c]
            image = images[r, c].permute(1, 2, 0).numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(labels[r][c], fontsize=7)
            ax.axis("off")
    d = config.data
    batches = "batch 0" if rows == 1 else f"batches 0-{rows - 1}"
    fig.suptitle(f"{config.name or 'run'}: {d.source}, preset {d.preset}; training {batches}, seed "
                 f"{config.train.seed}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
