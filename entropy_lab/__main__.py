from entropy_lab.cli import main

raise SystemExit(main())
