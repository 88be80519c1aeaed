"""Calling the CLI in-process the way a user sees it: exit code, stdout, and the one `error:` line."""

from __future__ import annotations

from benchmarks.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one `error:` line the user sees; fails on a traceback or on several lines."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]
