"""Figures drawn from a run's metrics.jsonl (matplotlib, without a display)."""

from __future__ import annotations

from pathlib import Path

from ..engine.logging import read_metrics

__all__ = ["plot_run"]


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
