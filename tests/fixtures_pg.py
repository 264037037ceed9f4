"""Fixtures: a real PostgreSQL server (Debian's ``postgresql`` package; no mock).

PostgreSQL refuses to run as root, which CI is: as root, the cluster is made and started as the
unprivileged ``postgres`` user (``runuser``), in a directory that user owns; otherwise as the
current user. One server per test session on a free port (TCP on 127.0.0.1, socket in its own
directory, trust authentication: it listens on loopback only), stopped by ``pg_ctl`` at the end;
``pg_url`` gives each test a fresh database.

Import the fixtures into a test module with ``from fixtures_pg import pg_server, pg_url``.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_mqtt import free_port


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class PgServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        cmd = ["runuser", "-u", self.user, "--", *argv] if self.user else list(argv)
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> PgServer:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if self.user:
            shutil.chown(self.root, self.user, self.user)
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(
            pg_ctl,
            "-D",
            str(self.data),
            "-l",
            str(self.root / "pg.log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        return self

    def stop(self) -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return self.url(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    if pg_bin("initdb") is None:
        pytest.fail("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="edgellm-pg-", dir="/tmp"))
    os.chmod(root, 0o755)
    srv = PgServer(root).start()
    try:
        yield srv
    finally:
        try:
            srv.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A fresh :class:`server.store.Store` on SQLite, then on a real PostgreSQL: one contract."""
    from server.store import Store

    target = tmp_path / "s.sqlite" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = Store(target)
    yield s
    s.close()
