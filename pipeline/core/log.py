"""Status messages go to stderr, so stdout carries only results (tables, JSON) a user can pipe."""

from __future__ import annotations

import sys


def status(message: str) -> None:
    """One progress / notice line on stderr (never a secret: tokens are never passed here)."""
    print(message, file=sys.stderr, flush=True)
