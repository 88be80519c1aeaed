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
import signal
import sys
import time
from typing import NoReturn

from benchmarks import commands
from benchmarks.errors import JobCannotGoOn, UserError, user_line
from benchmarks.resources import WAIT_POLICY_CHOSEN, WAIT_RESTARTS, RestartForWaitPolicy, child_pids

log = logging.getLogger(__name__)


class OneLineErrors(argparse.ArgumentParser):
    """argparse's refusal of a malformed command line as the harness's other errors are: one line on stderr,
    naming the problem and where the options are, exit code 2 (argparse prints its usage block first).
    Sub-commands' parsers are of this class too (`add_subparsers` makes them of the caller's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; `{self.prog} --help` lists its options\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
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


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub-)command `args` were parsed for: `run`'s, `data check`'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _command_parser(chosen, args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A malformed command line exits 2 here, with one line (`OneLineErrors`); options no parser knows are
    # refused by the (sub-)command's own parser, so that the line names the help that lists its options.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
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
    except JobCannotGoOn as err:
        print(f"error: {err}", file=sys.stderr)
        return JobCannotGoOn.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RestartForWaitPolicy as restart:
        passive = restart.passive  # restarted outside the handler, so the run's frames (and loader workers) go first
    return restart_with_wait_policy(sys.argv[1:] if argv is None else argv, passive)


def restart_with_wait_policy(argv: list[str], passive: bool) -> NoReturn:
    """Replaces this process with the same command whose OpenMP threads wait passively, or spin
    (`RestartForWaitPolicy`): the pid, the terminal's signals and the exit code stay the command's, and none of
    this process's memory stays behind. Its loader workers end first (they watch their parent by its pid, which
    the new program keeps); one that has not ended within `WORKERS_GRACE_S` is stopped."""
    gc.collect()  # the interrupted run's frames, and with them its data loader, whose workers then end
    stop_children([int(pid) for pid in child_pids()], grace_s=WORKERS_GRACE_S)
    env = {name: value for name, value in os.environ.items() if name not in ("OMP_WAIT_POLICY", WAIT_POLICY_CHOSEN)}
    env[WAIT_RESTARTS] = str(int(os.environ.get(WAIT_RESTARTS) or 0) + 1)
    if passive:
        env.update({"OMP_WAIT_POLICY": "PASSIVE", WAIT_POLICY_CHOSEN: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], env)


WORKERS_GRACE_S = 10.0
"""How long a loader worker has to end after its loader is freed (torch's own shutdown waits 5 s per worker)."""


def stop_children(pids: list[int], grace_s: float) -> None:
    """Waits up to `grace_s` in all for the children to end, then kills those that have not."""
    deadline = time.monotonic() + grace_s
    for pid in pids:
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.05)
        if _running(pid):
            log.warning("stopping child process %d, still running %.0f s after its run was interrupted", pid, grace_s)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _running(pid: int) -> bool:
    try:
        ended, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # reaped already (torch joins its workers)
        return False
    return ended == 0


if __name__ == "__main__":
    sys.exit(main())
