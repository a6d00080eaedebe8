"""``python -m entropy_lab`` — also what every rank of ``torchrun -m entropy_lab`` runs."""

import os

from entropy_lab.cli import main

if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # torchrun's recorder puts the failing rank's traceback into torchrun's error summary.
    from entropy_lab.distributed import record_errors

    main = record_errors(main)

raise SystemExit(main())
