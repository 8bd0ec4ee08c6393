"""Knowledge distillation: the loss against a hand computation, the teacher frozen, cached teacher logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from deepres.config import ConfigError, load_config
from deepres.data import build_data
from deepres.engine import load_checkpoint, train
from deepres.runs import build_model, load_teacher
from deepres.tasks import build_task, kd_loss
from deepres.tasks.distillation import masked_cross_entropy

from .efficient_helpers import _one_thread, idx_data, overrides, teacher  # noqa: F401


def _softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 3, 4, 1])
    t, alpha = 3.0, 0.7
    kl = ce = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        p, q = _softmax(t_row, t), _softmax(s_row, t)
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) / 4
        ce += -math.log(_softmax(s_row, 1.0)[y]) / 4
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert kd_loss(student, teacher, t, alpha, labels).item() == pytest.approx(expected, rel=1e-5)
    # Labels-free mode: the KL term alone, labels or not.
    assert kd_loss(student, teacher, t, 1.0, labels).item() == pytest.approx(t * t * kl, rel=1e-5)


def test_at_temperature_one_the_kl_term_is_soft_label_cross_entropy_up_to_a_constant():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 10, generator=g, requires_grad=True)
    teacher = torch.randn(6, 10, generator=g)
    p = F.softmax(teacher, dim=1)
    soft_ce = -(p * F.log_softmax(student, dim=1)).sum(dim=1).mean()
    entropy = -(p * p.log()).sum(dim=1).mean()  # the constant: the teacher's entropy
    kd = kd_loss(student, teacher, 1.0, 1.0)
    assert kd.item() == pytest.approx((soft_ce - entropy).item(), abs=1e-6)
    (grad_kd,) = torch.autograd.grad(kd, student)
    (grad_ce,) = torch.autograd.grad(soft_ce, student)
    assert torch.allclose(grad_kd, grad_ce, atol=1e-7)


def test_unlabeled_rows_take_only_the_kl_term():
    logits = torch.randn(4, 3)
    labels = torch.tensor([2, -1, 0, -1])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert masked_cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    none = masked_cross_entropy(logits, torch.full((4,), -1))
    assert torch.isfinite(none) and none.item() == 0.0


def test_bad_settings_name_their_key(tmp_path):
    with pytest.raises(ConfigError, match="task.teacher"):
        load_config(None, ["task.name=distillation"])
    with pytest.raises(ConfigError, match="task.alpha"):
        load_config(None, ["task.name=distillation", "task.teacher=t.pt", "task.alpha=1.5"])
    with pytest.raises(ConfigError, match="task.temperature"):
        load_config(None, ["task.name=distillation", "task.teacher=t.pt", "task.temperature=0"])
    # A missing teacher file is found before any data is read (the data directory does not exist either).
    config = load_config(None, ["task.name=distillation", "task.teacher=missing.pt", f"data.data_dir={tmp_path}/x"])
    with pytest.raises(ConfigError, match="task.teacher.*not found: missing.pt"):
        train(config, tmp_path / "run", quiet=True)


def _prepared(idx_data, teacher, **extra):
    config = load_config(None, overrides(idx_data, **{"task.name": "distillation", "task.teacher": teacher}, **extra))
    data = build_data(config.data, batch_size=32, eval_batch_size=128, seed=0)
    original = data.train
    model = build_model(config.model, data.dataset.num_classes, data.dataset.channels)
    task = build_task(config.task)
    task.prepare(model, data, config, torch.device("cpu"), load_teacher(teacher, data.dataset.classes, "cpu"))
    return task, data, original, model


def test_cached_teacher_logits_equal_the_teachers_outputs(idx_data, teacher):
    task, data, original, _ = _prepared(idx_data, teacher)
    assert task.cached_logits is not None  # no augmentation: cached
    images, labels = original.batch(3)
    indices = data.train.batch(3)[1]  # the same step of the same order, as image indices
    cached_labels, cached_logits = task.targets(images, indices)
    assert torch.equal(cached_labels, labels)
    with torch.no_grad():
        live = task.teacher(images)
    assert torch.allclose(cached_logits, live, atol=1e-5)


def test_teacher_is_frozen_in_eval_mode(idx_data, teacher):
    task, data, _, model = _prepared(idx_data, teacher, **{"data.preset": "paper_cifar"})
    assert task.cached_logits is None  # augmented batches: the teacher runs on each
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    model.train()
    images, targets = data.train.batch(0)
    targets = task.targets(images, targets)
    loss, _ = task.loss(model(images), targets)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in task.teacher.state_dict().items())  # BN statistics too


def test_distillation_run_learns_and_records_its_teacher(idx_data, teacher, tmp_path, capsys):
    config = load_config(None, overrides(idx_data, **{"task.name": "distillation", "task.teacher": teacher,
                                                      "train.iterations": 20, "data.labeled_per_class": 20}))
    summary = train(config, tmp_path / "kd")
    assert "(train 200 + 376 unlabeled, val 64," in capsys.readouterr().err  # 640 - 64 val - 20 x 10 labeled
    assert summary["teacher_logits_cached"] and summary["teacher"] == str(teacher)
    assert summary["test_accuracy"] > 30.0  # chance is 10%
    assert load_checkpoint(tmp_path / "kd" / "checkpoints" / "last.pt")["config"]["task"]["name"] == "distillation"


def test_distillation_on_the_worker_loader_runs_its_teacher_on_each_batch(idx_data, teacher, tmp_path, capsys):
    """Batches decoded by workers (the loader of large folders): the teacher's logits are computed per batch."""
    config = load_config(None, overrides(idx_data, **{"task.name": "distillation", "task.teacher": teacher,
                                                      "train.iterations": 20, "data.loader": "workers",
                                                      "data.num_workers": 0}))
    summary = train(config, tmp_path / "kd")
    assert "workers loader" in capsys.readouterr().err
    assert not summary["teacher_logits_cached"] and summary["test_accuracy"] > 30.0  # chance is 10%
