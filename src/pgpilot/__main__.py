"""``python -m pgpilot``: the same as the ``pgpilot`` command."""

from pgpilot.cli import main

raise SystemExit(main())
