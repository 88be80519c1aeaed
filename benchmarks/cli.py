"""`python -m benchmarks COMMAND`: one entry point, one module per command in benchmarks/commands/.

A command module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int` (or
`add_parser(subparsers)` when it builds its own sub-commands). Errors a user can cause arrive as
`UserError` and leave as one line on stderr with exit code 2, never a traceback. A command's
`--method-file` files are loaded here, before it runs, so a bad one stops it before it creates anything.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import pkgutil
import subprocess
import sys

from benchmarks import commands
from benchmarks.errors import UserError, user_line
from benchmarks.resources import RestartWithPassiveWaiting


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="DGSS-Bench: fine-tuning methods of vision foundation models for domain-generalized segmentation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"benchmarks.commands.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
        else:
            sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with usage on malformed arguments
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "method_files", None):
            from benchmarks.method import use_method_files

            use_method_files(args.method_files)
        return int(handler(args) or 0)
    except UserError as err:
        print(f"error: {user_line(err)}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RestartWithPassiveWaiting:
        pass  # outside the handler, so the interrupted run's frames (and loader workers) are freed first
    return restart_with_passive_waiting(sys.argv[1:] if argv is None else argv)


def restart_with_passive_waiting(argv: list[str]) -> int:
    """The same command in a new process whose OpenMP threads wait passively (`RestartWithPassiveWaiting`);
    its exit code is this one's."""
    gc.collect()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.call([sys.executable, "-m", "benchmarks", *argv], env=env)


if __name__ == "__main__":
    sys.exit(main())
