#!/usr/bin/env python3
"""The original experiment's entry point, kept for its users: the same flags, now running
``entropy-lab sweep`` in process (no training runs, no log scraping).

    python scripts/entropy_vs_learning_rate.py --checkpoint CKPT --base-config cfg.yaml \\
        --learning-rates 1e-8 1e-7 1e-6 --num-repeats 5 --output-dir results
"""

from __future__ import annotations

import sys

from entropy_lab.cli import legacy_main

if __name__ == "__main__":
    sys.exit(legacy_main("sweep", sys.argv[1:]))
