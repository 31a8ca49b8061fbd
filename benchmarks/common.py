"""Helpers shared by the benchmark scripts (run as scripts from the repository root, so this folder is on
sys.path)."""

from __future__ import annotations

import json


def last_json(text: str) -> dict | None:
    """The last line of a command's output that is one JSON object (every benchmark and the demo end with one)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None
