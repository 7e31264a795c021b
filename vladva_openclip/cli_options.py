"""Argument parsing that several command-line tools share."""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def key_values(items: Iterable[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` items of a repeatable ``flag`` -> a dict; VALUE is read as JSON when it parses (numbers,
    booleans, lists), else kept as text. A malformed item is a ValueError naming the flag."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: write KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
