"""The ``timeprest`` command line.

Each sub-command lives in its own module with ``register(subparsers)``; the
function it sets as ``func`` takes the parsed arguments and returns an exit
code. Any :class:`~timeprest.errors.TimeprestError`, and any error of the file
system (a path that is a file, a folder without write permission, a full
disk), becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from timeprest.errors import TimeprestError

# modules that define sub-commands, in the order ``--help`` lists them
_COMMANDS = ("train", "compare", "plot", "schedule", "simulate", "profile", "export")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="timeprest",
        description="Pipeline-parallel training with explicit weight-version policies.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(f"timeprest.cli.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name == f"timeprest.cli.{name}_cmd":
                continue  # sub-command not built in this version
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TimeprestError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"timeprest {args.command}: error: {first}", file=sys.stderr)
        rest = str(exc).splitlines()[1:]
        if rest and getattr(args, "verbose", False):
            print("\n".join(rest), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"timeprest {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into a program that stopped reading (e.g. head): not an error
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:  # a path the user gave: not a directory, no permission, no space
        print(f"timeprest {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        return 2


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system error: what failed, and on which path."""
    what = exc.strerror or str(exc) or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    return f"{what}: " + " -> ".join(map(str, paths)) if paths else what


def run() -> None:
    sys.exit(main())
