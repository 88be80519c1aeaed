import sys

from benchmarks.resources import prefer_passive_waiting

prefer_passive_waiting()  # before torch is imported: its OpenMP runtime reads the policy once

from benchmarks.cli import main  # noqa: E402

sys.exit(main())
