"""CLI output: one summary line for people, or one JSON object on stdout with --json."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(args: Any, summary: str, payload: dict[str, Any] | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload if payload is not None else {"summary": summary}, ensure_ascii=False, default=str))
    else:
        print(summary)


def info(message: str) -> None:
    """Progress and notes go to stderr so --json stdout stays one object."""
    print(message, file=sys.stderr, flush=True)
