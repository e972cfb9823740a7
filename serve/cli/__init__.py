"""The `slotserve` command line.

Each command group lives beside the part it drives and exposes
`register(subparsers)`; this file only wires them together, importing lazily so
`slotserve bundle list` does not pay for importing torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib

# (module, description) for each command group; each module has register(subparsers).
_GROUPS = [
    "slotserve.bundles.commands",  # bundle publish|list|show|verify|diff, demo-bundle, ledger
    "slotserve.cli.serve",         # serve
    "slotserve.cli.admin",         # load, rollout ..., rollback, state (talk to a running server)
    "slotserve.drill.command",     # drill
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slotserve",
        description="Inference server with hot-swappable model slots and instant rollback.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _GROUPS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not an absent group
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from slotserve.cli import openmp
    openmp.configure()   # before any command imports torch (and before Ray workers inherit the env)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130

