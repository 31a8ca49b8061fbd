"""A throw-away local PostgreSQL server: initdb + pg_ctl into a temp dir, unix socket only, free port.

Used by the tests (the store's PostgreSQL path — COPY, transactions, dropped connections — is exercised for real,
no mocks) and by benchmarks/query_speed.py; handy for trying the server backend without installing a service.
PostgreSQL refuses to run as root, so when the tests run as root the server runs as the ``postgres`` user (or a
user created for it) through ``runuser``. Binaries come from PATH or /usr/lib/postgresql/<version>/bin (where
Debian's ``postgresql`` package puts them).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as_user() -> str | None:
    """The user to run the server as when we are root (None when not root)."""
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "connectome_pg"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "connectome_pg"], check=True, capture_output=True)
    return "connectome_pg"


class PostgresServer:
    def __init__(self, options: str = "") -> None:
        self.options = options
        self.initdb = find_bin("initdb")
        self.pg_ctl = find_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            raise FileNotFoundError("PostgreSQL initdb/pg_ctl not found (apt-get install postgresql)")
        self.user = _run_as_user()
        self.root = Path(tempfile.mkdtemp(prefix="connectome-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._dbs = 0
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.root, info.pw_uid, info.pw_gid)

    def _cmd(self, args: list[str]) -> subprocess.CompletedProcess:
        if self.user:
            runuser = shutil.which("runuser")
            args = [runuser, "-u", self.user, "--", *args] if runuser else ["su", self.user, "-c", " ".join(args)]
        return subprocess.run(args, capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresServer":
        r = self._cmd([self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                       "--no-locale", "--no-sync"])
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr.strip()}")
        opts = (f"-k {self.root} -p {self.port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=50 -c shared_buffers=64MB " + self.options)
        r = self._cmd([self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                       "-o", opts, "start"])
        if r.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()} {log[-500:]}")
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.root}&port={self.port}"

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        self._dbs += 1
        name = f"test_{self._dbs}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            self._cmd([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)
