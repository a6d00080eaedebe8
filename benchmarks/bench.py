"""Performance benchmarks (issue #8): the same code as ``entropy-lab bench``.

python benchmarks/bench.py --output bench.json              # CPU, tiny checkpoint, < 60 s
python benchmarks/bench.py --quick --output bench.json      # also times `entropy-lab quick`
python benchmarks/bench.py --device cuda --checkpoint DIR --dtype bf16 --output bench.json
"""

from __future__ import annotations

import sys

from entropy_lab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
