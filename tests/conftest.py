"""Shared fixtures.

Real-data tests read ../shared/data in place. On a user's fresh clone that folder may be absent and the tests skip;
CI sets CONNECTOME_REQUIRE_DATA=1, which turns the skip into a failure so real-data tests are never silently skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.tensorflow_env import configure

configure()  # oneDNN on, quiet logs: test modules import TensorFlow directly

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CONNECTOME_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CONNECTOME_REQUIRE_DATA") == "1":
            pytest.fail(f"shared data folder {SHARED_DATA} is required (CONNECTOME_REQUIRE_DATA=1) but missing")
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (initdb/pg_ctl in a temp dir); skips when PostgreSQL is absent,
    fails instead when CONNECTOME_REQUIRE_POSTGRES=1. Use ``postgres_server.new_database()`` for a fresh URL."""
    from storage.store.local_postgres import PostgresServer

    try:
        server = PostgresServer().start()
    except FileNotFoundError as exc:
        if os.environ.get("CONNECTOME_REQUIRE_POSTGRES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield server
    server.stop()
