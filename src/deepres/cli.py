"""The ``deepres`` command: parses arguments, builds a Config, calls the library. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .config import ConfigError

EXIT_CONFIG_ERROR = 2

_COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def _format_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def cmd_models(args: argparse.Namespace) -> int:
    from .models import describe_model, list_models, model_entry

    # Grouped by family (ImageNet ResNets, CIFAR ResNets, then the zoo), natural order within each.
    names = sorted(list_models(args.filter), key=lambda n: model_entry(n).family)
    if not names:
        print(f"no model matches '{args.filter}'", file=sys.stderr)
        return 1
    rows = [describe_model(name) for name in names]
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
    from .config import load_config, to_yaml

    print(to_yaml(load_config(args.recipe, args.overrides)), end="")
    return 0


def add_config_arguments(p: argparse.ArgumentParser, recipe_required: bool = False) -> None:
    p.add_argument("--recipe", required=recipe_required, help="recipe name (e.g. demo, paper/cifar10_resnet56) or path")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optim.lr=0.05 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import NonFiniteLossError, TrainingInterrupted, train

    config = load_config(args.recipe, args.overrides)
    try:
        summary = train(config, run_dir=args.run_dir, resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"deepres: error: {exc}", file=sys.stderr)
        return 3
    except TrainingInterrupted as exc:
        print(f"deepres: {exc}; continue with --resume auto", file=sys.stderr)
        return 128 + int(exc.signum)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"deepres: error: {exc}", file=sys.stderr)
        return 1
    if summary:
        print(f"test accuracy {summary['test_accuracy']:.2f}% (top-1 error {summary['test_top1_error']:.2f}%), "
              f"run folder {summary['run_dir']}")
    return 0


BENCHMARK_ALIASES = {"data": "data_pipeline"}


def benchmarks_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "benchmarks"


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Run benchmarks/<name>.py's ``main(argv)``; benchmarks live beside the package, not inside it."""
    import importlib.util

    name = BENCHMARK_ALIASES.get(args.name, args.name).replace("-", "_")
    path = benchmarks_dir() / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in benchmarks_dir().glob("*.py") if not p.stem.startswith("_"))
        print(f"deepres: error: unknown benchmark '{args.name}'; known: {', '.join(known)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    spec = importlib.util.spec_from_file_location(f"deepres_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args.args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepres",
        description="Deep residual learning: the ResNet paper's models, recipes and experiments, and a fast trainer.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"deepres {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", help="list registered models with parameters and multiply-adds")
    p.add_argument("filter", nargs="?", default="*", help="shell-style name pattern, e.g. 'resnet*' (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a model from a recipe")
    add_config_arguments(p, recipe_required=True)
    p.add_argument("--run-dir", help="run folder (default: runs/<name>)")
    p.add_argument("--resume", metavar="auto|PATH", help="continue from the run folder's last.pt (auto) or a checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the resolved config of a recipe with overrides, as YAML")
    add_config_arguments(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("benchmark", help="run a benchmark of benchmarks/ (ours against a reference, same run)")
    p.add_argument("name", help="benchmark name, e.g. data")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=cmd_benchmark)

    from .data.commands import add_data_commands

    add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"deepres: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
