"""The two databases the store runs on: SQLite (a file, the default) and PostgreSQL (several
server replicas on one database). The store's SQL is written once, with ``?`` placeholders and
upserts both accept (``ON CONFLICT ... DO NOTHING / DO UPDATE``); what differs is kept here:

* placeholders: PostgreSQL's driver (psycopg 3) takes ``%s``; :func:`pg_sql` rewrites ``?``
  outside string literals (and doubles a literal ``%``), once per statement text;
* column types (``REAL`` is 4 bytes in PostgreSQL: timestamps need ``DOUBLE PRECISION``),
  auto-increment keys and ``WITHOUT ROWID``: the ``{NAME}`` markers of the schema text;
* transactions: ``BEGIN IMMEDIATE`` on SQLite, psycopg's transaction block on PostgreSQL;
* rows: both come back readable by column name and by position.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from server.errors import ServerError

PG_SCHEMES = ("postgresql://", "postgres://")


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What the store's tables use of a connection (a ``sqlite3.Connection`` is one)."""

    def execute(self, sql: str, args: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, rows: Any, /) -> Any: ...

    def executescript(self, script: str, /) -> Any: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Dialect:
    name: str
    types: dict[str, str]
    #: how an expression is rounded down to an integer (bucketing)
    floor: str
    #: the column that orders rows of an append-only table by insertion
    insertion_order: str

    def schema(self, text: str) -> str:
        return text.format(**self.types)


SQLITE = Dialect(
    "sqlite",
    {
        "REAL": "REAL",
        "INT": "INTEGER",
        "BLOB": "BLOB",
        "AUTOID": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "NOROWID": "WITHOUT ROWID",
        "LOGID": "",
    },
    floor="CAST({} AS INTEGER)",
    insertion_order="rowid",
)
POSTGRES = Dialect(
    "postgresql",
    {
        "REAL": "DOUBLE PRECISION",
        "INT": "BIGINT",
        "BLOB": "BYTEA",
        "AUTOID": "BIGSERIAL PRIMARY KEY",
        "NOROWID": "",
        "LOGID": ", id BIGSERIAL",
    },
    floor="FLOOR({})",
    insertion_order="id",
)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Database errors worth retrying (lost connection, lock timeouts, deadlock victims): the
    data is not at fault."""
    out: list[type[BaseException]] = [OSError, sqlite3.OperationalError]
    try:
        import psycopg

        out += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:
        pass
    return tuple(out)


def is_postgres(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(PG_SCHEMES)


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """``?`` placeholders to ``%s`` outside single-quoted literals; a literal ``%`` doubled."""
    out, quoted = [], False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


class _PgRow(dict):
    """A row readable as ``row["name"]`` and ``row[0]``."""

    def __init__(self, names: list[str], values: Sequence[Any]) -> None:
        super().__init__(zip(names, values, strict=True))
        self._values = tuple(values)

    def __getitem__(self, key: Any) -> Any:
        return self._values[key] if isinstance(key, int) else super().__getitem__(key)


def _numeric_loader() -> type:
    """``SUM`` of integers is ``numeric`` in PostgreSQL: read it back as SQLite does (int, or
    float when it has a fraction), never as ``Decimal``."""
    from psycopg.types.numeric import NumericLoader

    class Loader(NumericLoader):
        def load(self, data: Any) -> Any:
            v = super().load(data)
            return int(v) if v == v.to_integral_value() else float(v)

    return Loader


def _row_factory(cursor: Any) -> Any:
    names = [d.name for d in cursor.description or ()]
    return lambda values: _PgRow(names, values)


class PgConn:
    """A psycopg 3 connection speaking the store's ``?`` SQL (autocommit outside :meth:`tx`)."""

    dialect = POSTGRES

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as e:
            raise ServerError(
                "PostgreSQL needs the psycopg package", hint="pip install 'edgellm[server]' (or 'psycopg[binary]')"
            ) from e
        try:
            self._conn = psycopg.connect(url, autocommit=True, row_factory=_row_factory, connect_timeout=10)
        except psycopg.OperationalError as e:
            raise ServerError(
                f"cannot connect to the database: {_redact(str(e))}",
                hint="check the --db URL (host, port, user, database) and that PostgreSQL runs",
            ) from None
        self._conn.adapters.register_loader("numeric", _numeric_loader())

    @property
    def broken(self) -> bool:
        """The connection was lost (server restart, network): the store opens a new one."""
        return bool(self._conn.broken or self._conn.closed)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._conn.execute(pg_sql(sql), tuple(args))

    def executemany(self, sql: str, rows: Any) -> Any:
        with self._conn.cursor() as cur:
            cur.executemany(pg_sql(sql), list(rows))
            return cur

    def executescript(self, script: str) -> None:
        for stmt in (s.strip() for s in script.split(";")):
            if stmt:
                self._conn.execute(stmt)

    @contextmanager
    def tx(self) -> Iterator[PgConn]:
        with self._conn.transaction():
            yield self

    def close(self) -> None:
        self._conn.close()


@contextmanager
def sqlite_tx(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def open_sqlite(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _redact(text: str) -> str:
    """Connection errors may quote the URL: never print its password."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def redact_url(url: str) -> str:
    return _redact(url)
