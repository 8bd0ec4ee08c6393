"""The command line explains itself: every argument has help, reproduce names every experiment and scale, config
lists every key, and `deepres models` answers from its shipped table."""

import argparse
import json
import subprocess
import sys

import pytest

from deepres.cli import EXPERIMENT_HELP, build_parser, main
from deepres.config import config_keys


def _actions(parser, prefix="deepres"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prefix, action


def test_every_argument_of_every_command_has_help():
    missing = [f"{command} {action.option_strings or action.dest}" for command, action in _actions(build_parser())
               if not action.help]
    assert not missing, missing


def test_reproduce_help_names_every_experiment_and_scale():
    from deepres.experiments import EXPERIMENTS

    assert set(EXPERIMENT_HELP) == set(EXPERIMENTS)
    out = subprocess.run([sys.executable, "-m", "deepres", "reproduce", "--help"], capture_output=True, text=True)
    text = " ".join(out.stdout.split())
    for name in EXPERIMENTS:
        assert name.replace("-", "- ").split()[0] in text, name
    for scale in ("smoke (default)", "laptop", "full"):
        assert scale in text


def test_config_keys_lists_every_key_with_type_and_default(capsys):
    assert main(["config", "--keys", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == config_keys()
    by_key = {r["key"]: r for r in rows}
    assert by_key["train.iterations"]["default"] == 64000 and by_key["train.iterations"]["type"] == "an integer"
    assert "fraction of the run" in by_key["schedule.milestones"]["comment"]
    assert not [r["key"] for r in rows if not r["comment"]]  # every key says what it means


def test_models_answers_from_the_shipped_table(monkeypatch, capsys):
    import deepres.models.complexity as complexity

    def built(name, **options):
        raise AssertionError(f"{name} was built: the table should answer")

    monkeypatch.setattr(complexity, "describe_model", built)
    assert main(["models", "resnet*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"resnet20", "resnet50", "resnet1202"}
    assert next(r for r in rows if r["name"] == "resnet50")["params"] == 25_557_032
    assert main(["models", "--pretrained"]) == 0
    assert "resnet50-11ad3fa6.pth" in capsys.readouterr().out


def test_deepres_models_answers_without_importing_torch():
    """`deepres models` reads the shipped table (no torch import: it answers in well under 2 s) and lists the models
    in the registry's order."""
    import subprocess
    import sys

    from deepres.models import list_models, model_entry

    code = ("import sys; from deepres.cli import main; main(['models', 'resnet*']); "
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("torch imported: False"), out
    listed = [line.split()[0] for line in out.splitlines()[2:-1]]
    expected = sorted(list_models("resnet*"), key=lambda n: model_entry(n).family)
    assert listed == [n for n in expected if model_entry(n).family != "test"]


def test_one_set_takes_several_overrides(capsys):
    """`--set a=1 b=2` is `--set a=1 --set b=2`; a positional argument after the overrides stays one."""
    from deepres.cli import _one_set_per_override

    assert main(["config", "--recipe", "demo", "--set", "train.iterations=7", "optim.lr=0.3", "--set=train.seed=5",
                 "train.amp=off"]) == 0
    out = capsys.readouterr().out
    assert "iterations: 7\n" in out and "lr: 0.3\n" in out and "seed: 5\n" in out and "amp: 'off'\n" in out, out
    argv = ["pseudo-label", "--recipe", "r", "--set", "a=1", "b=2", "teacher.pt", "c=3", "--", "d=4"]
    assert _one_set_per_override(argv) == ["pseudo-label", "--recipe", "r", "--set", "a=1", "--set", "b=2",
                                           "teacher.pt", "c=3", "--", "d=4"]
    assert _one_set_per_override(["--set", "--x", "a=1"]) == ["--set", "--x", "a=1"]  # argparse names the mistake
    args = build_parser().parse_args(_one_set_per_override(["reproduce", "--set", "a=1", "b=2", "shortcuts"]))
    assert args.overrides == ["a=1", "b=2"] and args.experiment == "shortcuts"


def test_device_is_checked_before_anything_is_read(capsys):
    """--device of predict, eval and pseudo-label: a device this machine lacks, or no device at all, is a usage error
    naming it (exit 2) before the checkpoint is opened."""
    import torch

    cuda = "'cuda:99' but this machine has" if torch.cuda.is_available() else "'cuda:99' but no CUDA device"
    for args in (["predict", "missing.pt", "a.png"], ["eval", "missing.pt"],
                 ["pseudo-label", "missing.pt", "--recipe", "demo"]):
        for device, words in (("tpu", "'tpu': expected cpu, cuda or cuda:N"), ("cuda:99", cuda)):
            try:
                code = main([*args, "--device", device])
            except SystemExit as exc:
                code = exc.code
            err = capsys.readouterr().err
            assert code == 2 and f"argument --device: {words}" in err, (args, device, err)
    parsed = build_parser().parse_args(["predict", "m.pt", "a.png", "--device", "auto"])
    assert parsed.device == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_counts_and_sizes_out_of_range_are_usage_errors(capsys):
    """A count below 1 (or a size below 0) is refused by the parser, naming the argument (exit 2), before anything
    runs: it used to be taken (--seeds 0 wrote an empty report, --size 0 meant no resize)."""
    cases = [(["reproduce", "cifar-degradation", "--seeds", "0"], "--seeds: must be >= 1; got 0"),
             (["noisy-student", "--recipe", "demo", "--iterations", "0"], "--iterations: must be >= 1; got 0"),
             (["data", "prepare", "a", "b", "--size", "0"], "--size: must be >= 1; got 0"),
             (["data", "prepare", "a", "b", "--workers", "-1"], "--workers: must be >= 1; got -1"),
             (["data", "preview", "--rows", "0"], "--rows: must be >= 1; got 0"),
             (["data", "info", "mnist", "--val-size", "-5"], "--val-size: a count (0, 1, 2, ...) or a fraction"),
             (["data", "info", "mnist", "--val-size", "2.5"], "--val-size: a count (0, 1, 2, ...) or a fraction"),
             (["pseudo-label", "t.pt", "--recipe", "demo", "--threshold", "-0.1"], "--threshold: must be in [0, 1]")]
    for args, words in cases:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and words in err, (args, err)
    assert build_parser().parse_args(["data", "info", "mnist", "--val-size", "0.1"]).val_size == 0.1
    assert build_parser().parse_args(["data", "info", "mnist", "--val-size", "300"]).val_size == 300


def test_the_train_result_says_whose_weights_were_tested():
    """The final line's accuracy is the final weights'; when best.pt holds an earlier step's, the line says so (its
    `deepres eval` gives another number)."""
    from deepres.cli import _run_result

    summary = {"test_accuracy": 60.42, "test_top1_error": 39.58, "run_dir": "runs/m", "iterations": 60,
               "best_step": 18, "best_val_top1_error": 31.579}
    assert _run_result(summary).splitlines() == [
        "test accuracy 60.42% (top-1 error 39.58%), run folder runs/m",
        "that is the final weights' (checkpoints/last.pt); checkpoints/best.pt holds step 18's, of the lowest "
        "validation error (31.58%)"]
    for best in (60, None):  # best.pt is the final weights, or the run has no validation row to say
        assert _run_result({**summary, "best_step": best}).count("\n") == 0


def test_class_tables_line_up_whatever_the_script(capsys):
    """Class names in wide (CJK) or combining characters: the columns after them start at one terminal column."""
    from deepres.cli import _columns, _print_per_class

    assert (_columns("日本"), _columns("crème"), _columns("cre\u0300me"), _columns("hot dog")) == (4, 5, 5, 7)
    rows = [{"class": name, "count": 8, "top1_error": 50.0, "mistaken_for": None, "mistaken_share": 0.0}
            for name in ("日本", "cre\u0300me brûlée", "hot dog")]
    _print_per_class(rows)
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len({_columns(line.split("     8")[0]) for line in lines}) == 1, lines
