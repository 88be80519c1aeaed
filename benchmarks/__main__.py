import sys

from benchmarks.resources import choose_wait_policy, watch_wait_policy

TRAINING_COMMANDS = ("run", "check", "profile", "pretrain")


def entry() -> int:
    """`python -m benchmarks` and the `dgss-bench` script. Before torch is imported (its OpenMP runtime reads
    the wait policy once), and only for the commands that train or time models: reading the machine's state
    takes 0.2 s that `list` or `table` need not pay."""
    if sys.argv[1:2] and sys.argv[1] in TRAINING_COMMANDS:
        choose_wait_policy()
        if sys.argv[1] == "run":  # a matrix can take an hour, and the machine's load can change meanwhile
            watch_wait_policy()
    from benchmarks.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(entry())
