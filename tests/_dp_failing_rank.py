"""``entropy-lab`` with rank 1 failing in its first measurement (tests/test_distributed.py)."""

import os
import sys

from entropy_lab import entropy
from entropy_lab.cli import main
from entropy_lab.distributed import record_errors


def _broken_measure(self, *args, **kwargs):
    raise RuntimeError("planted failure on rank 1")


if os.environ.get("RANK") == "1":
    entropy.EntropyScorer.measure = _broken_measure

raise SystemExit(record_errors(main)(sys.argv[1:]))
