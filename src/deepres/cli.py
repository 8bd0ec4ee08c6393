"""The ``deepres`` command: parses arguments, builds a Config, calls the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError

EXIT_CONFIG_ERROR = 2

def _natural(name: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _shipped_models(pattern: str) -> list[dict] | None:
    """The shipped models table's rows matching ``pattern`` (no torch import: ``deepres models`` answers at once);
    None when the table is missing."""
    import fnmatch

    try:
        rows = json.loads((Path(__file__).parent / "models" / "table.json").read_text())
    except (OSError, ValueError):
        return None
    rows = sorted((r for r in rows if fnmatch.fnmatch(r["name"], pattern)), key=lambda r: _natural(r["name"]))
    return sorted(rows, key=lambda r: r.get("family", ""))


def cmd_models(args: argparse.Namespace) -> int:
    rows = None if args.pretrained else _shipped_models(args.filter)
    if rows is not None:
        return _print_models(rows, args)
    from .models import describe_models, list_models, model_entry

    # Grouped by family (ImageNet ResNets, CIFAR ResNets, then the zoo), natural order within each.
    names = sorted(list_models(args.filter, pretrained=args.pretrained), key=lambda n: model_entry(n).family)
    if args.pretrained:
        from .models.pretrained import pretrained_cfg

        if not names:
            print(f"no model with pretrained weights matches '{args.filter}'", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps([{k: v for k, v in pretrained_cfg(n).items() if k != "classes"} | {"name": n}
                              for n in names], indent=2))
            return 0
        print(f"{'name':<20} {'source':<12} {'top-1 %':>8} {'top-5 %':>8} {'input':>8}  file")
        for n in names:
            cfg = pretrained_cfg(n)
            print(f"{n:<20} {cfg['source']:<12} {cfg['top1']:>8.2f} {cfg['top5']:>8.2f} {cfg['crop_size']:>8}  "
                  f"{cfg['file_name']}")
        return 0
    return _print_models(describe_models(names), args)


def _print_models(rows: list[dict], args: argparse.Namespace) -> int:
    if not rows:
        print(f"no model matches '{args.filter}'", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<20} {'params':>13} {'params(M)':>10} {'MACs(G)':>9} {'shortcut':>9} {'input':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"])
        print(
            f"{r['name']:<20} {r['params']:>13,} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e9:>9.3f} "
            f"{r['shortcut']:>9} {size:>12}"
        )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import config_reference, load_config, to_yaml

    if args.keys:
        rows = config_reference()
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return 0
        for row in rows:
            print(f"{row['key']}  ({row['type']}; default {row['default']!r})")
            if row["comment"]:
                print(f"    {row['comment']}")
        return 0
    from .runs import check_model

    config = load_config(args.recipe, args.overrides)
    check_model(config.model)  # an unknown model or option, as train refuses it
    if args.fit:  # as a run on this data would start: bounded by train.fit_to_data, or refused naming every misfit
        from .engine.fit import fit_to_data

        config, notices = fit_to_data(config)
        for text in notices:
            print(f"notice: {text}", file=sys.stderr)
    print(to_yaml(config), end="")
    return 0


def add_config_arguments(p: argparse.ArgumentParser, recipe_required: bool = False) -> None:
    p.add_argument("--recipe", required=recipe_required, help="recipe name (e.g. demo, paper/cifar10_resnet56) or path")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set optim.lr=0.05 train.iterations=2000 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import NonFiniteLossError, TrainingInterrupted, train
    from .engine.loop import EXIT_DIVERGED

    config = load_config(args.recipe, args.overrides)
    try:
        summary = train(config, run_dir=args.run_dir, resume=args.resume, quiet=args.quiet)
    except NonFiniteLossError as exc:
        print(f"deepres: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as exc:
        print(f"deepres: {exc}; continue with --resume auto", file=sys.stderr)
        return 128 + int(exc.signum)
    except (RuntimeError, OSError) as exc:  # a run that failed while training (a data worker killed, a full disk)
        from .runs import RunFolderBusy

        if isinstance(exc, (FileExistsError, RunFolderBusy)):  # refused before training: nothing to continue
            raise
        print(f"deepres: error: {_one_line(exc)}", file=sys.stderr)
        _say_resumable(Path(args.run_dir) if args.run_dir else Path("runs") / config.name)
        return 1
    if summary and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone reports
        from .report import plot_run

        curves = plot_run(summary["run_dir"])
        if curves:
            summary["curves"] = str(curves)
        print(_run_result(summary))
    return 0


def _run_result(summary: dict) -> str:
    """The end of ``deepres train``: the test accuracy of the final weights, and where best.pt's are when they are
    another step's (``deepres eval`` of best.pt then gives another number)."""
    text = (f"test accuracy {summary['test_accuracy']:.2f}% (top-1 error {summary['test_top1_error']:.2f}%), "
            f"run folder {summary['run_dir']}" + (f", curves {summary['curves']}" if summary.get("curves") else ""))
    best = summary.get("best_step")
    if best is not None and best != summary["iterations"]:
        text += (f"\nthat is the final weights' (checkpoints/last.pt); checkpoints/best.pt holds step {best:,}'s, "
                 f"of the lowest validation error ({summary['best_val_top1_error']:.2f}%)")
    return text


def _say_resumable(run_dir: Path) -> None:
    """After a failure, where the run can continue from (its last checkpoint), if it has one."""
    last = run_dir / "checkpoints" / "last.pt"
    try:
        import torch

        step = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001 - no checkpoint, or one that cannot say: nothing to add
        return
    print(f"deepres: {run_dir} keeps its last checkpoint (step {step:,}): once the cause is fixed, continue with "
          f"--resume auto", file=sys.stderr)


def _parse_scales(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError("--scales", f"{text!r} is not a comma-separated list of integers, e.g. 224,256,384") from None


def _device(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N, checked against this machine's devices before anything is read."""
    from .distributed import resolve_device

    try:
        return str(resolve_device(text, key="--device"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device=")) from None


def _parsed(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _int_at_least(low: int):
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        value = _parsed(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
        return value

    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _probability(text: str) -> float:
    value = _parsed(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {text}")
    return value


def _split_size(text: str) -> float:
    """A split's size as the config takes it: a count (a whole number) or, below 1, a fraction."""
    value = _parsed(text, float)
    if not (value >= 0 and (value < 1 or value.is_integer())):
        raise argparse.ArgumentTypeError(f"a count (0, 1, 2, ...) or a fraction in (0, 1); got {text}")
    return int(value) if value.is_integer() else value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 20,56") from None
    if not values:
        raise argparse.ArgumentTypeError("an empty list")
    return values


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine.inference import evaluate_checkpoint, pretrained_name

    import warnings

    if pretrained_name(args.checkpoint) is not None:
        return _eval_pretrained(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, split=args.split,
                                     ten_crop=args.ten_crop, scales=_parse_scales(args.scales),
                                     batch_size=args.batch_size, device=args.device, workers=args.workers,
                                     precision=args.precision, per_class=args.per_class,
                                     on_bad_image=args.on_bad_image)
    _print_skipped(result.get("skipped_images", []), result["split"])
    if args.data_dir and result.get("carved"):  # a folder of class folders given here: say what part was tested
        print(f"deepres: {args.data_dir} holds class folders: tested its {result['carved']}, as a run on it carves "
              f"it; --split all tests every image", file=sys.stderr)
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            print(f"deepres: warning: {warning.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        # With 5 classes or fewer every image's top 5 holds its class: the top-5 error says nothing
        top5 = f"{result['top5_error']:.2f}%" if result["num_classes"] > 5 else f"- ({result['num_classes']} classes)"
        print(f"{result['split']} ({result['mode']}, {result['count']:,} images, {result['precision']}): accuracy "
              f"{100 - result['top1_error']:.2f}%, top-1 error {result['top1_error']:.2f}%, top-5 error {top5}, "
              f"loss {result['loss']:.4f}")
        if args.per_class:
            _print_per_class(result["per_class"])
    return 0


def _print_skipped(skipped: list[str], of: str) -> None:
    """One stderr line naming the skipped image files (the first five)."""
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"deepres: skipped {len(skipped)} bad image(s) of {of}: {shown}", file=sys.stderr)


def _columns(text: str) -> int:
    """Terminal columns of ``text``: wide (East Asian) characters take two, combining marks none."""
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _padded(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` terminal columns (class names of any script line up)."""
    return text + " " * max(0, width - _columns(text))


def _print_per_class(rows: list[dict]) -> None:
    width = max([len("class")] + [_columns(r["class"]) for r in rows])
    print(f"{'class':<{width}}   images  top-1 error  most often mistaken for")
    for r in rows:
        error = "-" if r["top1_error"] is None else f"{r['top1_error']:.2f}%"
        mistaken = f"{r['mistaken_for']} ({r['mistaken_share']:.1f}%)" if r["mistaken_for"] else "-"
        print(f"{_padded(r['class'], width)} {r['count']:>8,} {error:>12}  {mistaken}")


def _eval_pretrained(args: argparse.Namespace) -> int:
    from .engine.inference import evaluate_pretrained

    if not args.data_dir:
        raise ConfigError("--data-dir", f"{args.checkpoint}'s pretrained weights are tested on ImageNet's validation "
                                        f"images: give their folder (ROOT/val/<wnid>/ or ROOT/<wnid>/)")
    if args.scales:
        raise ConfigError("--scales", "the pretrained weights are tested as they were published: a centre crop or "
                                      "--ten-crop")
    result = evaluate_pretrained(args.checkpoint, args.data_dir, ten_crop=args.ten_crop,
                                 batch_size=args.batch_size or 256, device=args.device, workers=args.workers,
                                 precision=args.precision, per_class=args.per_class,
                                 on_bad_image=args.on_bad_image or "error")
    _print_skipped(result.get("skipped_images", []), result["split"])
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.checkpoint} ({result['weights']}) on {result['split']} ({result['mode']}, {result['count']:,} "
          f"images, {result['precision']}; {result['preprocessing']}): top-1 error {result['top1_error']:.2f}%, "
          f"top-5 error {result['top5_error']:.2f}%, loss {result['loss']:.4f}")
    if result["published_top1_error"] is not None:
        print(f"published (torchvision, single centre crop, fp32): top-1 error {result['published_top1_error']:.2f}%, "
              f"top-5 error {result['published_top5_error']:.2f}%")
    if args.per_class:
        _print_per_class(result["per_class"])
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .engine.inference import predict_images

    results = predict_images(args.checkpoint, args.images, top_k=args.top_k, device=args.device,
                             batch_size=args.batch_size, on_bad_image=args.on_bad_image)
    _print_skipped([f"{r['image']} ({r['skipped']})" for r in results if "skipped" in r], f"{len(results)}")
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"] + (f"\n  skipped: {r['skipped']}" if "skipped" in r else ""))
        for t in r["top"]:
            print(f"  {t['probability']:7.2%}  {t['class']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .engine.inference import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"wrote {result['path']} ({result['format']}; input float [0,1] of shape {result['input']}); "
          f"max |exported - PyTorch| = {result['max_abs_diff']:.2e}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments import Options, run_experiment

    options = Options(scale=args.scale, seeds=args.seeds, data_dir=args.data_dir, out=Path(args.out),
                      include_1202=args.include_1202, depths=args.depths, iterations=args.iterations,
                      parallel=args.parallel, overrides=args.overrides)
    report = run_experiment(args.experiment, options)
    print(f"report: {report}")
    return 0


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    import torch

    from .config import load_config
    from .data import load_run_dataset
    from .engine.fit import fit_to_data
    from .runs import load_teacher
    from .tasks import label_unlabeled

    config = load_config(args.recipe, args.overrides)
    if config.data.preset == "paper_imagenet":  # as the pseudo-label task refuses it (before any data is read)
        raise ConfigError("data.preset", "the teacher labels the unlabeled images whole, as held in memory; the "
                                         "paper_imagenet preset tests crops of a larger resize instead: use "
                                         "data.preset=paper_cifar or none")
    config, notices = fit_to_data(config)  # the validation split the recipe's run carves, so the same images wait
    for text in notices:
        if text.startswith("data."):  # the training's changes (batch, cadences) do not touch the labeling
            print(f"notice: {text}", file=sys.stderr)
    dataset = load_run_dataset(config.data)
    if dataset is None:
        raise ConfigError("data.labeled_per_class", "set it to divide the training images into labeled (the first N "
                                                    "of each class) and unlabeled ones")
    device = torch.device(args.device)
    teacher = load_teacher(args.teacher, dataset.classes, device)
    labels = label_unlabeled(teacher, dataset, device, args.threshold, "soft" if args.soft else "hard")
    stats = labels.stats(dataset.extra["unlabeled"].labels)
    kept_per_class = torch.bincount(labels.predicted[labels.indices].cpu(), minlength=dataset.num_classes)
    stats["kept_per_class"] = dict(zip(dataset.classes, kept_per_class.tolist()))
    if args.out:
        torch.save({"classes": dataset.classes, "teacher": args.teacher, "threshold": args.threshold,
                    "indices": labels.indices.cpu(), "targets": labels.targets.cpu(),
                    "confidence": labels.confidence.cpu()}, args.out)
        stats["out"] = args.out
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    accuracy = stats.get("pseudo_label_accuracy")
    print(f"kept {stats['pseudo_labels_kept']} of {len(labels.confidence)} unlabeled images "
          f"({stats['pseudo_label_coverage']:.1f}%) at confidence >= {args.threshold}"
          + (f"; {accuracy:.2f}% of them match the held-back labels" if accuracy is not None else "")
          + (f"; wrote {args.out}" if args.out else ""))
    return 0


def cmd_noisy_student(args: argparse.Namespace) -> int:
    from .config import load_config
    from .experiments.noisy_student import Noise, noisy_student

    config = load_config(args.recipe, args.overrides)
    noise = Noise(args.randaugment_n, args.randaugment_m, args.dropout, args.stochastic_depth)
    students = [s for s in (args.student or "").split(",") if s]
    run_dir = args.run_dir or f"runs/{config.name}-noisy-student"
    report, rows = noisy_student(config, args.iterations, run_dir, students or None, noise)
    for r in rows:
        acc = r["test_accuracy"]
        print(f"iteration {r['iteration']} ({r['role']}, {r['model']}): test accuracy "
              + ("-" if acc is None else f"{acc:.2f}%"))
    print(f"report: {report}")
    return 0


BENCHMARK_ALIASES = {"data": "data-pipeline"}
# What `deepres reproduce --help` says of each experiment (tests/test_cli.py checks it names every registered one;
# importing the experiments here would slow every command).
EXPERIMENT_HELP = {
    "cifar-table6": "Table 6, CIFAR-10 ResNets 20-110 (1202 with --include-1202)",
    "cifar-degradation": "Fig. 6, plain vs residual nets' training and test error",
    "layer-responses": "Fig. 7, std of each layer's response",
    "shortcuts": "Table 3's options A, B, C at CIFAR scale",
    "imagenet": "Tables 2-4 on an ImageNet-layout folder (single, 10-crop, multi-scale)",
    "zoo-cifar": "every architecture family at CIFAR size",
    "semi-supervised": "pseudo-labels and Noisy Student with 4,000 labels",
    "distillation": "ResNet-56 into ResNet-20",
    "transfer": "CIFAR-10 to Fashion-MNIST with 1,000 labels",
    "augmentation": "CutMix, RandAugment, TrivialAugment, erasing, a random subset against pad-crop-flip",
}


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Run ``deepres.benchmarks.<name>``'s ``main(argv)``."""
    import importlib

    from .benchmarks import available

    name = BENCHMARK_ALIASES.get(args.name, args.name).replace("_", "-")
    if name not in available():
        print(f"deepres: error: unknown benchmark '{args.name}'; known: {', '.join(available())}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    module = importlib.import_module(f"deepres.benchmarks.{name.replace('-', '_')}")
    return int(module.main(args.args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepres",
        description="Deep residual learning: the ResNet paper's models, recipes and experiments, and a fast trainer.",
    )
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"deepres {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="list registered models with parameters and multiply-adds")
    p.add_argument("filter", nargs="?", default="*", help="shell-style name pattern, e.g. 'resnet*' (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--pretrained", action="store_true",
                   help="only models with pretrained weights (create_model(name, pretrained=True)): their source, "
                        "published accuracy and file")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a model from a recipe")
    add_config_arguments(p, recipe_required=True)
    p.add_argument("--run-dir", help="run folder (default: runs/<name>)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue from the run folder's last.pt (auto) or a checkpoint")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines (the run folder's files are written as usual)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 error of a checkpoint")
    p.add_argument("checkpoint", help="a run's checkpoint (RUN/checkpoints/best.pt or last.pt), or a model with "
                   "pretrained weights (resnet50) with --data-dir an ImageNet folder: its validation images, "
                   "prepared as the weights were evaluated, the published error beside ours")
    p.add_argument("--data-dir", help="where the data is (default: the one the run used)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="the split to test (default test); all: every image of the data (a new folder tested whole)")
    p.add_argument("--ten-crop", action="store_true", help="the standard 10-crop test (corners, centre, flips)")
    p.add_argument("--scales", help="fully-convolutional multi-scale test, shorter sides e.g. 224,256,384,480,640")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward pass (default: the run's train.eval_batch_size; 256 for pretrained "
                        "weights)")
    p.add_argument("--workers", type=_nonnegative_int, default=None,
                   help="decoding processes for image folders (default: the run's data.num_workers, at most the "
                        "cores)")
    p.add_argument("--device", default="cpu", type=_device, help="cpu (default), cuda or cuda:N")
    p.add_argument("--precision", choices=("run", "fp32", "bf16", "fp16"), default="run",
                   help="arithmetic of the test: run (default) as the run tested during training (its train.amp, "
                        "e.g. bf16), so the number repeats its summary; fp32 (pretrained weights: run means fp32, as "
                        "they were published), bf16, or fp16 (GPU only)")
    p.add_argument("--per-class", action="store_true",
                   help="also each class's images, top-1 error and the class it is most often mistaken for (JSON: "
                        "per_class and the confusion matrix, rows the true class)")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default=None,
                   help="an image file that cannot be decoded: error naming it, or skip it (listed on stderr; JSON: "
                        "skipped_images). Default: the run's data.on_bad_image; error for pretrained weights")
    p.add_argument("--json", action="store_true", help="print JSON (full precision) instead of a line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("checkpoint", help="a run's checkpoint (RUN/checkpoints/best.pt or last.pt), or a model with "
                   "pretrained weights (resnet50; deepres models --pretrained): its ImageNet classes")
    p.add_argument("images", nargs="+", help="image files (any format the training decoder reads), or folders of "
                                             "them (searched with their subfolders, in name order)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images classified at a time (default 64)")
    p.add_argument("--device", default="cpu", type=_device, help="cpu (default), cuda or cuda:N")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="an image file that cannot be decoded: error naming it (default), or skip it (listed on "
                        "stderr; JSON: its entry has an empty top and skipped the reason)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX, TorchScript, torch.export (.pt2) or safetensors "
                                      "(checked against PyTorch; class names and normalisation as metadata)")
    p.add_argument("checkpoint", help="a run's checkpoint (RUN/checkpoints/best.pt or last.pt)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "export", "safetensors"],
                   help="onnx (needs the onnx and onnxruntime packages), torchscript, export (torch.export's .pt2: "
                        "torch.export.load(path).module()); these three take [0, 1] images of any batch size and "
                        "normalise inside; or safetensors (the weights)")
    p.add_argument("--out", help="output file (default: beside the checkpoint)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reproduce", help="reproduce a table or figure of the paper (runs + report)")
    p.add_argument("experiment", help="; ".join(f"{name}: {what}" for name, what in EXPERIMENT_HELP.items()))
    p.add_argument("--scale", default="smoke", choices=["smoke", "laptop", "full"],
                   help="smoke (default): minutes on a CPU, tiny schedules, numbers meaningless; laptop: the paper's "
                        "recipe shortened (CIFAR: 3,000 iterations on all training images, bf16 where the CPU has it), "
                        "about an hour per seed on 2 CPU cores for cifar-degradation, hours for the deeper or larger "
                        "nets (measured and printed before training starts); full: the paper's schedule (GPU)")
    p.add_argument("--seeds", type=_positive_int, default=1, help="runs per configuration (mean +/- std in the report)")
    p.add_argument("--data-dir", help="CIFAR-10 data (default: the CIFAR-10 JPEG set if found, else official CIFAR-10)")
    p.add_argument("--out", default="runs/reproduce", help="folder for runs and reports (shared between experiments)")
    p.add_argument("--include-1202", action="store_true", help="cifar-table6: also ResNet-1202")
    p.add_argument("--depths", type=_int_list, default=None,
                   help="CIFAR experiments: only these depths, e.g. 20,56 (default: 20,32,44,56,110)")
    p.add_argument("--iterations", type=_positive_int, default=None,
                   help="CIFAR paper experiments: a shortened schedule of N iterations, learning-rate drops at N/2 "
                        "and 3N/4 (default: the scale's; 64000 at full scale)")
    p.add_argument("--parallel", type=_positive_int, default=None,
                   help="runs at once, each a `deepres train` process (default: 5 on a GPU, where runs that allow it "
                        "take the captured CUDA-graph step; 1 on a CPU, in this process)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override config keys of every run, e.g. --set train.amp=bf16 (repeatable; several "
                        "KEY=VALUE after one --set also work)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("pseudo-label", help="label the unlabeled images (data.labeled_per_class) with a teacher")
    p.add_argument("teacher", help="the teacher checkpoint (.pt of a run)")
    add_config_arguments(p, recipe_required=True)
    p.add_argument("--threshold", type=_probability, default=0.0,
                   help="keep images whose top probability is at least this")
    p.add_argument("--soft", action="store_true", help="soft labels (the teacher's softmax) instead of its top class")
    p.add_argument("--out", help="write the kept indices, targets and confidences to this .pt file")
    p.add_argument("--device", default="cpu", type=_device, help="cpu (default), cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON instead of a line")
    p.set_defaults(func=cmd_pseudo_label)

    p = sub.add_parser("noisy-student", help="Noisy Student self-training: teacher, then noised students (report)")
    add_config_arguments(p, recipe_required=True)
    p.add_argument("--iterations", type=_positive_int, default=2,
                   help="students trained, each teaching the next (default 2)")
    p.add_argument("--student", help="student model(s), comma-separated per iteration (default: the recipe's model)")
    p.add_argument("--randaugment-n", type=int, default=2, help="student noise: RandAugment operations (default 2)")
    p.add_argument("--randaugment-m", type=int, default=9, help="student noise: RandAugment magnitude (default 9)")
    p.add_argument("--dropout", type=float, default=0.5, help="student noise: dropout before the classifier")
    p.add_argument("--stochastic-depth", type=float, default=0.2, help="student noise: drop rate of the last block")
    p.add_argument("--run-dir", help="folder of the runs and report.md (default: runs/<name>-noisy-student)")
    p.set_defaults(func=cmd_noisy_student)

    p = sub.add_parser("config", help="print the resolved config of a recipe with overrides, as YAML")
    add_config_arguments(p)
    p.add_argument("--keys", action="store_true", help="list every config key with its type, default and meaning")
    p.add_argument("--json", action="store_true", help="with --keys: print JSON")
    p.add_argument("--fit", action="store_true",
                   help="read the data and print the config a run on it would use: train.fit_to_data's changes (each "
                        "as a notice on stderr), or an error naming every value the data cannot satisfy")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("benchmark", help="run a benchmark of benchmarks/ (ours against a reference, same run)")
    from .benchmarks import available

    p.add_argument("name", help="one of: " + ", ".join(available()) + " (data: data-pipeline)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=cmd_benchmark)

    add_data_commands(sub)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# deepres data

DATA_DESCRIPTION = """\
- deepres data preview --recipe R [--set KEY=VALUE ...] [--rows 4] [--columns 8] [--out preview.png]: the first
  images of the first training batches as the run would train on them (its seed, loader, crop and flip,
  RandAugment/TrivialAugment/data.augment, erasing, CutMix/Mixup), normalisation undone, each titled with its label
  (a mixed one with its classes' shares): look at an augmentation before a long run.
- deepres data info SOURCE [--data-dir DIR] [--val-size N] [--json]: images per split and per class of a source
  (cifar10, ..., or an image folder / its .tar.gz / a prepared file given as its path). --val-size
  defaults to 0 here, so train shows the official training count; pass --val-size 5000 to see the split a run uses
  (the recipe default). Image folders are counted from their files, without decoding.
- deepres data prepare SRC DST [--size N] [--channels 1|3] [--on-bad-image skip] [--workers N]: decode an image
  folder (or a .tar.gz of one) once into a prepared file, which data.source=imagefolder data.data_dir=DST loads in
  about a second.
"""


def _print_summary(summary: dict) -> None:
    splits = list(summary["splits"])
    shape = "x".join(str(s) for s in summary["image_shape"]) if summary["image_shape"] else "as stored"
    print(f"{summary['source']}: {summary['num_classes']} classes, images {shape}, from {summary['origin']}")
    width = max([len("class"), len("total")] + [_columns(c["name"]) for c in summary["classes"]])
    print(f"{'class':<{width}} " + " ".join(f"{s:>8}" for s in splits))
    print("-" * (width + 9 * len(splits)))
    for c in summary["classes"]:
        print(f"{_padded(c['name'], width)} " + " ".join(f"{c[s]:>8,}" for s in splits))
    print("-" * (width + 9 * len(splits)))
    print(f"{'total':<{width}} " + " ".join(f"{summary['splits'][s]:>8,}" for s in splits))
    skipped = summary.get("skipped", [])
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} file(s), not counted: {shown}")


def cmd_data_info(args: argparse.Namespace) -> int:
    from .data.sources import IMAGE_FOLDER_HINT
    from .data.summary import dataset_summary

    if args.source not in args.source_names:  # a folder, archive or prepared file stands for imagefolder
        if not Path(args.source).exists():
            raise ValueError(f"{args.source!r} is neither a data source ({', '.join(args.source_names)}) nor an "
                             f"existing folder, archive or prepared file")
        if args.data_dir:
            raise ValueError(f"give the image folder once: {args.source} or --data-dir {args.data_dir}")
        args.source, args.data_dir = "imagefolder", args.source
    try:
        summary = dataset_summary(args.source, args.data_dir, args.val_size, args.cache_dir, args.on_bad_image)
    except (OSError, ValueError) as exc:  # the sources' hint, in this command's words
        if IMAGE_FOLDER_HINT not in str(exc):
            raise
        here = f"ask for it as: deepres data info {args.data_dir}"
        raise type(exc)(str(exc).replace(IMAGE_FOLDER_HINT, f"for an image folder (or an archive of one) {here}")) \
            from None
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import time

    from .config import available_cores
    from .data import prepare_image_folder

    start = time.perf_counter()
    workers = args.workers if args.workers is not None else available_cores()
    dataset = prepare_image_folder(args.src, args.dst, image_size=args.size, channels=args.channels,
                                   on_bad_image=args.on_bad_image, workers=workers, cache_dir=args.cache_dir)
    seconds = time.perf_counter() - start
    shape = "x".join(str(s) for s in dataset.train.images.shape[1:])
    skipped = len(dataset.extra.get("skipped", []))
    print(f"wrote {args.dst}: {len(dataset.train):,} train / {len(dataset.test):,} test images ({shape}), "
          f"{dataset.num_classes} classes, {skipped} skipped, in {seconds:.1f} s")
    print(f"use it with: --set data.source=imagefolder --set data.data_dir={args.dst}")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from .config import load_config
    from .report.plots import plot_training_images

    config = load_config(args.recipe, args.overrides)
    out = plot_training_images(config, args.out, rows=args.rows, columns=args.columns,
                               notice=lambda text: print(f"notice: {text}", file=sys.stderr))  # as the run prints
    batches = "batch 0" if args.rows == 1 else f"batches 0-{args.rows - 1}"
    print(f"wrote {out}: the first {args.columns} images of training {batches} of "
          f"{args.recipe or 'the default config'} as the run would train on them")
    return 0


def _data_guarded(fn):
    """Library errors (bad input, missing files) become one line on stderr and exit status 1 (a config error: 2)."""

    def run(args):
        import logging

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(args)
        except ConfigError:
            raise  # exit status 2, as for every command
        except (ValueError, FileNotFoundError, TypeError) as exc:
            print(f"deepres data: error: {exc}{_bad_image_hint(exc, args)}", file=sys.stderr)
            return 1

    return run


def add_data_commands(sub) -> None:
    import typing

    from .config import DataConfig

    SOURCE_NAMES = typing.get_args(typing.get_type_hints(DataConfig)["source"])  # no torch import for the parser

    p = sub.add_parser("data", help="inspect and prepare datasets", description=DATA_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: p.print_help() or 0)
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    q = data_sub.add_parser("info", help="images per split and per class of a data source")
    q.add_argument("source", metavar="SOURCE",
                   help=f"a data source ({', '.join(SOURCE_NAMES)}), or an image folder, its .tar.gz or a prepared "
                   f"file (as imagefolder --data-dir PATH)")
    q.add_argument("--data-dir", help="where the data is (imagefolder: the folder, .tar.gz or prepared file)")
    q.add_argument("--val-size", type=_split_size, default=0,
                   help="images carved from train for validation, a count or below 1 a fraction, as data.val_size "
                        "(default 0: the official train count)")
    q.add_argument("--cache-dir",
                   help="cache for extracted archives (default: $DEEPRES_DATA/cache or ~/.cache/deepres)")
    q.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="an image folder's file that is not an image (by its extension; nothing is decoded): an "
                        "error naming it (default), or skip it (listed, not counted)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_data_guarded(cmd_data_info), source_names=SOURCE_NAMES)

    q = data_sub.add_parser("prepare", help="decode an image folder once into a file the imagefolder source loads fast")
    q.add_argument("src", help="image folder root/<split>/<class>/<image>, or a .tar.gz of one")
    q.add_argument("dst", help="the prepared file to write (e.g. data/cifar10-jpeg.pt)")
    q.add_argument("--size", type=_positive_int, default=None,
                   help="resize: shorter side to SIZE, centre square (default: keep; all images must share a size)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 or 3 (default: 1 when every image is grayscale, else 3)")
    q.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="a bad file is an error (default) or is skipped and logged")
    q.add_argument("--workers", type=_positive_int, default=None,
                   help="decoding processes (default: every core this process may use)")
    q.add_argument("--cache-dir", help="where a .tar.gz source is extracted (default: $DEEPRES_DATA/cache or "
                   "~/.cache/deepres)")
    q.set_defaults(func=_data_guarded(cmd_data_prepare))

    q = data_sub.add_parser("preview", help="a grid of training images as a recipe's run would see them (augmented)")
    add_config_arguments(q)
    q.add_argument("--rows", type=_positive_int, default=4, help="training batches, one per row (default 4)")
    q.add_argument("--columns", type=_positive_int, default=8, help="images of each batch (default 8)")
    q.add_argument("--out", default="preview.png", help="the PNG to write (default preview.png)")
    q.set_defaults(func=_data_guarded(cmd_data_preview))


def _threads_within_quota() -> None:
    """PyTorch's threads bounded by the process's CPU quota for the whole command (config.threads_within_quota)."""
    from .config import threads_within_quota

    bounded = threads_within_quota()
    if bounded is not None:
        print(f"deepres: {bounded[1]}", file=sys.stderr)


def _one_set_per_override(argv: list[str]) -> list[str]:
    """``--set a=1 b=2`` as ``--set a=1 --set b=2``: the words after a ``--set`` value that hold ``=`` and do not
    start with ``-`` are further overrides (up to ``--``)."""
    out: list[str] = []
    state = ""  # "value": the next word is --set's value; "more": words with "=" are further overrides
    for i, word in enumerate(argv):
        if word == "--":
            return out + argv[i:]
        if state == "more" and "=" in word and not word.startswith("-"):
            out += ["--set", word]
            continue
        out.append(word)
        given = (state == "value" and not word.startswith("-")) or word.startswith("--set=")
        state = "value" if word == "--set" else "more" if given else ""
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_one_set_per_override(sys.argv[1:] if argv is None else list(argv)))
    _threads_within_quota()
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (deepres models | head): nothing more to say
        sys.stderr.close()
        return 0
    except ConfigError as exc:
        print(f"deepres: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        print(f"deepres: error: {_one_line(exc)}{_bad_image_hint(exc, args)}", file=sys.stderr)
        return 1


def _bad_image_hint(exc: BaseException, args: argparse.Namespace) -> str:
    """How this command skips a file that is not a readable image, for an error naming one."""
    from .data.images import BadImageError

    if not isinstance(exc, BadImageError):
        return ""
    if hasattr(args, "on_bad_image"):
        return " (--on-bad-image skip leaves such files out, each named)"
    if hasattr(args, "overrides"):
        return " (--set data.on_bad_image=skip leaves such files out, each named)"
    return ""


def _one_line(exc: BaseException) -> str:
    """An error without a traceback; a system error as one line naming the file and the cause."""
    if isinstance(exc, OSError) and str(exc).startswith("[Errno") and exc.filename:
        # deepres's own write errors name the file in their message already ("cannot write PATH: ...")
        return exc.strerror if str(exc.filename) in str(exc.strerror) else f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
