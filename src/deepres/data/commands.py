"""``deepres data ...`` subcommands (registered by deepres.cli)."""

from __future__ import annotations

import argparse


def add_data_commands(sub) -> None:
    p = sub.add_parser("data", help="inspect and prepare datasets")
    p.set_defaults(func=lambda args: p.print_help() or 0)
