"""Helpers shared by the benchmark scripts (run as scripts from the repository root, so this folder is on
sys.path)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from storage.tensorflow_env import configure  # noqa: E402

configure()

# real data, read in place (tests and benchmarks never copy it)
SHARED = Path(os.environ.get("CONNECTOME_SHARED_DATA", REPO.parent / "shared" / "data"))
CKPT = SHARED / "ffn_fib25_checkpoint" / "model.ckpt-27465036"
MEDULLA = SHARED / "flyem_fib_medulla_train" / "medulla_train.h5"


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

