#!/usr/bin/env python3
"""The original quick test's entry point: the same flags, now ``entropy-lab quick``
(3 η × 3 repeats; the built-in tiny checkpoint when --checkpoint is absent)."""

from __future__ import annotations

import sys

from entropy_lab.cli import legacy_main

if __name__ == "__main__":
    sys.exit(legacy_main("quick", sys.argv[1:]))
