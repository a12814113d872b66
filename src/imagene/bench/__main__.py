"""``python -m imagene.bench``: the benchmark command (same options as ``imagene bench``)."""

from __future__ import annotations

from imagene.bench._command import main

raise SystemExit(main())
