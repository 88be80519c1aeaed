"""`python -m benchmarks COMMAND`: one entry point, one module per command in benchmarks/commands/.

A command module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int` (or
`add_parser(subparsers)` when it builds its own sub-commands). Errors a user can cause arrive as
`UserError` and leave as one line on stderr with exit code 2, never a traceback. A command's
`--method-file` files are loaded here, before it runs, so a bad one stops it before it creates anything.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import logging
import os
import pkgutil
import signal
import subprocess
import sys

from benchmarks import commands
from benchmarks.errors import UserError, user_line
from benchmarks.resources import WAIT_POLICY_CHOSEN, WAIT_RESTARTS, RestartForWaitPolicy


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
    except RestartForWaitPolicy as restart:
        passive = restart.passive  # restarted outside the handler, so the run's frames (and loader workers) go first
    return restart_with_wait_policy(sys.argv[1:] if argv is None else argv, passive)


RESTART_EXIT_CODES = {True: 75, False: 76}
"""How a restarted process asks the first one to start the next: for passive waiting, for spinning. No
command exits with these otherwise."""


def restart_with_wait_policy(argv: list[str], passive: bool) -> int:
    """The same command in a new process whose OpenMP threads wait passively, or spin (`RestartForWaitPolicy`);
    its exit code is this one's. The first process starts every later one, so however often a command restarts,
    one process waits beside the one that runs."""
    gc.collect()
    release_freed_heap()
    if WAIT_RESTARTS in os.environ:
        return RESTART_EXIT_CODES[passive]
    restarts = 0
    while True:
        restarts += 1
        env = {name: value for name, value in os.environ.items() if name not in ("OMP_WAIT_POLICY", WAIT_POLICY_CHOSEN)}
        env[WAIT_RESTARTS] = str(restarts)
        if passive:
            env.update({"OMP_WAIT_POLICY": "PASSIVE", WAIT_POLICY_CHOSEN: "1"})
        code = run_to_its_end([sys.executable, "-m", "benchmarks", *argv], env)
        if code not in RESTART_EXIT_CODES.values():
            return code
        passive = code == RESTART_EXIT_CODES[True]


def release_freed_heap() -> None:
    """Hands the heap freed by the interrupted run back to the system (glibc keeps it otherwise), so the first
    process, which waits while the restarted one runs, holds little more than its libraries."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def run_to_its_end(command: list[str], env: dict[str, str]) -> int:
    """The restarted process's exit code (128 + the signal's number, as a shell reports it, if a signal ended it).
    Ctrl-C reaches it from the terminal (one process group) and it stops itself, saying so in one line, so this
    process only waits; a SIGTERM sent to this process alone is passed on."""
    child = subprocess.Popen(command, env=env)
    # Set after the child started: an ignored SIGINT is inherited, and Python then raises no KeyboardInterrupt.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))}
    try:
        code = child.wait()
        return code if code >= 0 else 128 - code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
