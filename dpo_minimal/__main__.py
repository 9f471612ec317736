"""`python -m dpo_minimal ...`: the `dpo-minimal` command line (dpo_minimal.cli)."""

from .cli import main

raise SystemExit(main())
