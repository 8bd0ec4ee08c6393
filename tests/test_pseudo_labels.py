"""Pseudo-labeling and Noisy Student: thresholds, the labeled/unlabeled division, runs, the commands, and the noise."""

import json

import pytest
import torch

from deepres.cli import main
from deepres.config import ConfigError, load_config
from deepres.data import Dataset, Split
from deepres.engine import train
from deepres.engine.logging import read_metrics
from deepres.models import create_model
from deepres.data import split_labeled
from deepres.tasks import select_pseudo_labels
from deepres.models.noise import add_noise

from .efficient_helpers import _one_thread, idx_data, overrides, teacher  # noqa: F401


def test_the_threshold_keeps_only_confident_images():
    probs = torch.tensor([[0.97, 0.02, 0.01], [0.5, 0.3, 0.2], [0.05, 0.9, 0.05], [0.2, 0.2, 0.6]])
    logits = probs.log()
    hard = select_pseudo_labels(logits, threshold=0.9)
    assert hard.indices.tolist() == [0, 2] and hard.targets.tolist() == [0, 1]
    assert hard.predicted.tolist() == [0, 0, 1, 2]
    assert torch.allclose(hard.confidence, torch.tensor([0.97, 0.5, 0.9, 0.6]))
    soft = select_pseudo_labels(logits, threshold=0.55, mode="soft")
    assert soft.indices.tolist() == [0, 2, 3] and torch.allclose(soft.targets, probs[[0, 2, 3]])
    assert len(select_pseudo_labels(logits, threshold=0.0).indices) == 4
    assert len(select_pseudo_labels(logits, threshold=0.99).indices) == 0
    stats = hard.stats(torch.tensor([0, 1, 2, 2]))  # the second kept label (class 1) is wrong
    assert stats == {"pseudo_labels_kept": 2, "pseudo_label_coverage": 50.0, "pseudo_label_accuracy": 50.0}
    with pytest.raises(ConfigError, match="task.threshold"):
        select_pseudo_labels(logits, threshold=1.5)


def _dataset(labels):
    labels = torch.tensor(labels)
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    split = Split(images, labels)
    return Dataset("toy", ["a", "b", "c"], split, split)


def test_the_first_images_of_each_class_are_labeled_and_the_rest_unlabeled():
    dataset = _dataset([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2])
    out = split_labeled(dataset, 2)
    assert out.train.images[:, 0, 0, 0].tolist() == [0, 1, 3, 4, 6, 7]  # original order kept
    unlabeled = out.extra["unlabeled"]
    assert unlabeled.images[:, 0, 0, 0].tolist() == [2, 5, 8, 9, 10, 11]
    assert unlabeled.labels.tolist() == [0, 1, 2, 0, 1, 2]  # kept aside to score pseudo-labels
    sample = split_labeled(dataset, 2, unlabeled_subset=3).extra["unlabeled"]
    assert len(sample) == 3 and torch.equal(sample.images, split_labeled(dataset, 2, 3).extra["unlabeled"].images)
    with pytest.raises(ConfigError, match="data.labeled_per_class"):
        split_labeled(dataset, 5)


def test_pseudo_label_run_adds_the_confident_unlabeled_images(idx_data, teacher, tmp_path, capsys):
    config = load_config(None, overrides(idx_data, **{"task.name": "pseudo_label", "task.teacher": teacher,
                                                      "task.threshold": 0.5, "data.labeled_per_class": 10}))
    summary = train(config, tmp_path / "hard")
    assert 0 < summary["pseudo_labels_kept"] < 576 - 100  # the unlabeled set: 640 - 64 val - 10 x 10 labeled
    assert f"(train 100 + {summary['pseudo_labels_kept']} pseudo-labeled, val 64," in capsys.readouterr().err
    assert summary["pseudo_label_accuracy"] > 40.0  # of the kept ones; a confident teacher is mostly right
    soft = load_config(None, overrides(idx_data, **{
        "task.name": "pseudo_label", "task.teacher": teacher, "task.pseudo_labels": "soft",
        "data.labeled_per_class": 10, "data.unlabeled_subset": 100, "data.preset": "paper_cifar",
        "model.dropout": 0.5, "model.stochastic_depth": 0.2}))
    summary = train(soft, tmp_path / "soft", quiet=True)
    assert summary["pseudo_labels_kept"] == 100 and summary["pseudo_labels"] == "soft"


def test_pseudo_labeling_needs_an_unlabeled_set(idx_data, teacher, tmp_path):
    with pytest.raises(ConfigError, match="data.labeled_per_class"):
        load_config(None, overrides(idx_data, **{"task.name": "pseudo_label", "task.teacher": teacher}))


def test_pseudo_label_command(idx_data, teacher, tmp_path, capsys):
    args = ["pseudo-label", str(teacher), "--recipe", "demo", "--threshold", "0.6", "--out", str(tmp_path / "l.pt"),
            "--json"] + [f"--set={o}" for o in overrides(idx_data, **{"data.labeled_per_class": 10})]
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    saved = torch.load(tmp_path / "l.pt", weights_only=True)
    assert len(saved["indices"]) == stats["pseudo_labels_kept"] == sum(stats["kept_per_class"].values())
    assert bool((saved["confidence"][saved["indices"]] >= 0.6).all())
    assert main(["pseudo-label", str(teacher), "--recipe", "demo", *[f"--set={o}" for o in overrides(idx_data)]]) == 2
    assert "data.labeled_per_class" in capsys.readouterr().err
    crops = overrides(idx_data, **{"data.labeled_per_class": 10, "data.preset": "paper_imagenet",
                                   "data.loader": "auto"})
    assert main(["pseudo-label", str(teacher), "--recipe", "demo", *[f"--set={o}" for o in crops]]) == 2
    assert "'data.preset': the teacher labels the unlabeled images whole" in capsys.readouterr().err
    # A recipe that fits itself to its data (imagefolder_fast) carves the validation split its run carves: a tenth of
    # the 640 images here, so 640 - 64 - 10 x 10 images wait unlabeled, where the recipe's 10,000 would leave none
    fitted = overrides(idx_data, **{"data.labeled_per_class": 10, "data.val_size": 10000, "train.fit_to_data": "true"})
    assert main(["pseudo-label", str(teacher), "--recipe", "demo", "--json", *[f"--set={o}" for o in fitted]]) == 0
    out, err = capsys.readouterr()
    assert "notice: data.val_size 10000 -> 64" in err and "train.batch_size" not in err
    assert json.loads(out)["pseudo_labels_kept"] == 640 - 64 - 100
    with pytest.raises(SystemExit) as exit_:
        main(["pseudo-label", str(teacher), "--recipe", "demo", "--threshold", "1.5"])
    assert exit_.value.code == 2 and "--threshold: must be in [0, 1]; got 1.5" in capsys.readouterr().err


def test_noisy_student_command_reports_every_iteration(idx_data, tmp_path, capsys):
    sets = [f"--set={o}" for o in overrides(idx_data, **{"data.labeled_per_class": 10, "data.unlabeled_subset": 200})]
    args = ["noisy-student", "--recipe", "demo", *sets, "--iterations", "2", "--run-dir", str(tmp_path / "ns")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "iteration 2 (student, resnet20)" in out
    report = (tmp_path / "ns" / "report.md").read_text()
    assert report.count("| student | resnet20 |") == 2 and "| 0 | teacher | resnet20 |" in report
    second = json.loads((tmp_path / "ns" / "iter2" / "summary.json").read_text())
    assert second["teacher"].endswith("iter1/checkpoints/last.pt") and second["pseudo_labels_kept"] == 200
    assert (tmp_path / "ns" / "iter2" / "config.yaml").read_text().count("stochastic_depth: 0.2") == 1
    # A smaller student is refused, before anything trains.
    assert main(args[:-2] + ["--run-dir", str(tmp_path / "small"), "--set=model.name=resnet32", "--student",
                             "resnet20"]) == 2
    assert "smaller than its teacher" in capsys.readouterr().err and not (tmp_path / "small").exists()
    # The report counts the trained nets' parameters (Fashion-MNIST: one input channel)
    from deepres.api import load_model

    trained = sum(p.numel() for p in load_model(tmp_path / "ns" / "iter2" / "checkpoints" / "last.pt").parameters())
    assert second["parameters"] == trained and f"| 2 | student | resnet20 | {trained:,} |" in report
    # A student config the pseudo-labeling task refuses is refused before the teacher trains
    assert main(args[:-2] + ["--run-dir", str(tmp_path / "crops"), "--set=data.preset=paper_imagenet",
                             "--set=data.loader=auto"]) == 2
    err = capsys.readouterr().err
    assert "'data.preset': the student of iteration 1" in err and not (tmp_path / "crops").exists()


def test_noise_acts_only_in_training_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    plain = create_model("resnet20").eval()
    noisy = create_model("resnet20")
    noisy.load_state_dict(plain.state_dict())
    add_noise(noisy, dropout=0.5, stochastic_depth=0.5)
    assert noisy.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(noisy.eval()(x), plain(x))
        noisy.train()
        torch.manual_seed(1)
        a = noisy(x)
        torch.manual_seed(2)
        b = noisy(x)
    assert not torch.allclose(a, b)
    with pytest.raises(ConfigError, match="model.stochastic_depth"):
        add_noise(create_model("vgg11"), stochastic_depth=0.1)


def test_a_resumed_noisy_student_run_equals_an_uninterrupted_one(idx_data, teacher, tmp_path):
    # Soft pseudo-labels, RandAugment, dropout and stochastic depth: every random stream a student has.
    common = {"task.name": "pseudo_label", "task.teacher": teacher, "task.pseudo_labels": "soft",
              "data.labeled_per_class": 10, "data.unlabeled_subset": 100, "data.randaugment_n": 2,
              "model.dropout": 0.5, "model.stochastic_depth": 0.3, "train.deterministic": True,
              "train.log_every": 1}
    whole = train(load_config(None, overrides(idx_data, **common, **{"train.iterations": 10})), tmp_path / "a",
                  quiet=True)
    train(load_config(None, overrides(idx_data, **common, **{"train.iterations": 5})), tmp_path / "b", quiet=True)
    resumed = train(load_config(None, overrides(idx_data, **common, **{"train.iterations": 10})), tmp_path / "b",
                    resume="auto", quiet=True)
    rows = [[r["train_loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "train_loss" in r]
            for run in ("a", "b")]
    assert rows[0] == rows[1] and len(rows[0]) == 10
    assert resumed["test_top1_error"] == whole["test_top1_error"]
