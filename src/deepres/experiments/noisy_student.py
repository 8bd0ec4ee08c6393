"""Noisy Student self-training (Xie et al. 2020; PAPER.md section 7).

Iteration 0 trains a teacher on the labeled images (the recipe as it is). Iteration i trains a student of equal or
larger size on the labeled images plus the unlabeled ones pseudo-labeled by the previous model (task
``pseudo_label``), with noise the teacher did not have while labeling: RandAugment on the inputs, dropout before the
classifier and stochastic depth. The student then becomes the teacher of the next iteration. The teacher labels
with its final weights (``last.pt``), the model whose test accuracy the report shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config import Config, ConfigError, apply_overrides
from .base import train_or_resume

__all__ = ["Noise", "chain", "noisy_student", "student_overrides"]


@dataclass
class Noise:
    """The student's noise. Xie et al. use RandAugment (N=2), dropout 0.5 on the final layer and stochastic depth
    with survival 0.8 at the last block (drop 0.2); the magnitude here is the toolkit's RandAugment default."""

    randaugment_n: int = 2
    randaugment_m: int = 9
    dropout: float = 0.5
    stochastic_depth: float = 0.2

    def overrides(self) -> list[str]:
        return [f"data.randaugment_n={self.randaugment_n}", f"data.randaugment_m={self.randaugment_m}",
                f"model.dropout={self.dropout}", f"model.stochastic_depth={self.stochastic_depth}"]


def student_overrides(teacher_checkpoint: str | Path, noise: Noise, model: str | None = None) -> list[str]:
    """Overrides turning a labeled-data recipe into one Noisy Student iteration taught by ``teacher_checkpoint``."""
    out = ["task.name=pseudo_label", f"task.teacher={teacher_checkpoint}", *noise.overrides()]
    return out + ([f"model.name={model}"] if model else [])


def chain(iterations: int, name_of: Callable[[int], str], checkpoint_of: Callable[[str], Path], noise: Noise,
          students: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(run name, overrides) of iterations 1..``iterations``: iteration i is a noised student taught by iteration
    i - 1's final weights (``checkpoint_of(name_of(i - 1))``); ``students``: the model of each iteration (the last one
    repeats; default: the recipe's). The one definition of the Noisy Student chain, for ``deepres noisy-student`` and
    the semi-supervised experiment."""
    if iterations < 1:
        raise ConfigError("--iterations", f"must be at least 1; got {iterations}")
    out = []
    for i in range(1, iterations + 1):
        model = students[min(i, len(students)) - 1] if students else None
        out.append((name_of(i), student_overrides(checkpoint_of(name_of(i - 1)), noise, model)))
    return out


def _parameters(config: Config, num_classes: int = 10, in_channels: int = 3) -> int:
    from ..models import count_parameters
    from ..runs import build_model

    return count_parameters(build_model(config.model, num_classes, in_channels))


def noisy_student(config: Config, iterations: int, run_dir: str | Path, students: list[str] | None = None,
                  noise: Noise | None = None, quiet: bool = False) -> tuple[Path, list[dict]]:
    """Train the teacher and ``iterations`` students in ``run_dir/iter<i>``; write ``run_dir/report.md``.

    ``students``: the model of each iteration (the last one repeats; default: the recipe's model). Complete runs are
    skipped and interrupted ones resumed. Returns the report's path and one row per iteration.
    """
    if config.data.labeled_per_class is None:
        raise ConfigError("data.labeled_per_class", "Noisy Student needs an unlabeled set: set data.labeled_per_class "
                                                    "(the rest of each class is unlabeled)")
    noise = noise or Noise()
    run_dir = Path(run_dir)
    configs = [dataclasses.replace(config, name=f"{config.name}-iter0")]
    steps = chain(iterations, lambda i: f"iter{i}", lambda name: run_dir / name / "checkpoints" / "last.pt", noise,
                  students)
    for i, (name, overrides) in enumerate(steps, start=1):
        configs.append(apply_overrides(config, overrides + [f"name={config.name}-{name}"]))
        # Checked before anything trains: each student's config (it pseudo-labels), and at least as large as its
        # teacher.
        try:
            configs[i].validate()
        except ConfigError as exc:
            raise ConfigError(exc.key, f"the student of iteration {i} (task.name=pseudo_label, with noise): "
                                       f"{exc.message}") from None
        if _parameters(configs[i]) < _parameters(configs[i - 1]):
            raise ConfigError("--student", f"the student {configs[i].model.name} is smaller than its teacher "
                                           f"{configs[i - 1].model.name}; Noisy Student needs equal or larger students")
    rows = []
    for i, cfg in enumerate(configs):
        rows.append(_row(i, "teacher" if i == 0 else "student", cfg, train_or_resume(cfg, run_dir / f"iter{i}", quiet)))
    report = run_dir / "report.md"
    report.write_text(format_report(config, noise, rows))
    return report, rows


def _row(iteration: int, role: str, config: Config, summary: dict) -> dict:
    # The trained net's count (its classes' head); a run finished before summaries counted them: a 10-class head.
    parameters = summary.get("parameters") or _parameters(config)
    return {"iteration": iteration, "role": role, "model": config.model.name, "parameters": parameters,
            **{k: summary.get(k) for k in ("test_accuracy", "pseudo_labels_kept", "pseudo_label_coverage",
                                            "pseudo_label_accuracy")}}


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(config: Config, noise: Noise, rows: list[dict]) -> str:
    lines = [
        f"# Noisy Student: {config.name}",
        "",
        f"Data: {config.data.source} `{config.data.data_dir}`, {config.data.labeled_per_class} labeled images per "
        f"class, the rest unlabeled"
        + (f" ({config.data.unlabeled_subset} used)" if config.data.unlabeled_subset is not None else "") + ".",
        f"Student noise: RandAugment N={noise.randaugment_n} M={noise.randaugment_m}, dropout {noise.dropout}, "
        f"stochastic depth {noise.stochastic_depth}; pseudo-labels {config.task.pseudo_labels}, threshold "
        f"{config.task.threshold}. {config.train.iterations} iterations per model.",
        "",
        "| iteration | role | model | parameters | pseudo-labels kept | coverage % | pseudo-label accuracy % | "
        "test accuracy % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['iteration']} | {r['role']} | {r['model']} | {r['parameters']:,} | "
                     f"{_fmt(r['pseudo_labels_kept'], 'd')} | {_fmt(r['pseudo_label_coverage'])} | "
                     f"{_fmt(r['pseudo_label_accuracy'])} | {_fmt(r['test_accuracy'])} |")
    return "\n".join(lines) + "\n"
