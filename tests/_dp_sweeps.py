"""Three ``entropy-lab`` sweeps in one torchrun launch (tests/test_distributed.py).

fp64, then fp32, then fp64 again with rank 1 failing in its first measurement. One launch
instead of three saves two launchers' and four ranks' imports and checkpoint loads (~50 s of
CPU). The sweeps share one process group: ``distributed.init`` joins it once and finds it
joined after; tearing it down between sweeps is skipped, as a second ``init_process_group``
after ``destroy_process_group`` hangs under gloo.

Usage: torchrun ... _dp_sweeps.py OUT_ROOT SWEEP_ARGS...  (each sweep writes OUT_ROOT/<name>)
"""

import os
import sys
import time
from pathlib import Path

from entropy_lab import distributed, entropy
from entropy_lab.cli import main
from entropy_lab.distributed import record_errors

FAILING_SWEEP_STARTS = "failing sweep starts at unix time "


def _broken_measure(self, *args, **kwargs):
    raise RuntimeError("planted failure on rank 1")


@record_errors
def sweeps(root: Path, argv: list[str]) -> int:
    teardown, distributed.teardown = distributed.teardown, lambda: None
    for dtype in ("fp64", "fp32"):
        status = main([*argv, "--dtype", dtype, "--output-dir", str(root / f"two_{dtype}")])
        if status:
            return status
    print(f"{FAILING_SWEEP_STARTS}{time.time()}", file=sys.stderr, flush=True)
    if os.environ.get("RANK") == "1":
        entropy.EntropyScorer.measure = _broken_measure
    status = main([*argv, "--dtype", "fp64", "--output-dir", str(root / "fail")])
    teardown()
    return status


if __name__ == "__main__":
    raise SystemExit(sweeps(Path(sys.argv[1]), sys.argv[2:]))
