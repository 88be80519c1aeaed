import sys

from benchmarks.resources import choose_wait_policy

choose_wait_policy()  # before torch is imported: its OpenMP runtime reads the policy once

from benchmarks.cli import main  # noqa: E402

sys.exit(main())
