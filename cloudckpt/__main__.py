"""``python -m cloudckpt``: the command line (see :mod:`cloudckpt.cli`)."""

from __future__ import annotations

from cloudckpt.cli import main

raise SystemExit(main())
