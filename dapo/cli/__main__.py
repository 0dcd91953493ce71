"""``python -m dapo.cli``: the ``dapo`` command (how the local stack and torchrun start services)."""

from dapo.cli.main import main

raise SystemExit(main())
