"""Sub-commands of `python -m benchmarks`, one module each (discovered by benchmarks.cli)."""
