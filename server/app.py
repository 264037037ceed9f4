"""The server's data directory and the long-running process that ties the parts together.

Data directory::

    server.json        settings written by ``init``
    keys/              the online TUF keys (targets, snapshot, timestamp) + root.json, the trust
                       root devices pin. Never the root key: it stays with the operator
    repo/              TUF repository served at /metadata/ and /targets/
    ca/                fleet CA (``edgellm-server ca init``), device certs in ca/devices/
    store.sqlite       device registry, telemetry, rollouts, API tokens, audit log (unless
                       ``run --db postgresql://...`` puts them in PostgreSQL)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edgellm._fs import atomic_write
from edgellm.telemetry import MqttConfig
from server.api import ApiContext
from server.drain import SessionJanitor
from server.errors import ServerError
from server.leader import Leadership
from server.store import Store

logger = logging.getLogger(__name__)


def default_root_keys_dir(data_dir: Path) -> Path:
    """Where ``init`` without ``--keys`` puts the full keys directory (root key included):
    next to the data directory, never inside it."""
    return data_dir.with_name(f"{data_dir.name}-root-keys")


def offline_key_files(keys_dir: Path) -> list[str]:
    """Private key files of offline roles (root) present in ``keys_dir``."""
    from edgellm.trust import KeyStore
    from edgellm.trust.director import DIRECTOR
    from edgellm.trust.keys import ONLINE_ROLES

    index = KeyStore(keys_dir).index
    return [
        e["file"]
        for role, entries in index["roles"].items()
        if role not in (*ONLINE_ROLES, DIRECTOR)
        for e in entries
        if (keys_dir / e["file"]).exists()
    ]


@dataclasses.dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def store_path(self) -> Path:
        return self.root / "store.sqlite"

    @property
    def config_path(self) -> Path:
        return self.root / "server.json"

    def check(self) -> DataDir:
        if not self.config_path.is_file():
            raise ServerError(
                f"{self.root} is not an edgellm-server data directory",
                hint=f"run `edgellm-server init --data-dir {self.root}` first",
            )
        return self

    def store(self, db: str | None = None) -> Store:
        """The store: ``db`` (a ``postgresql://`` URL) or the SQLite file in the directory."""
        return Store(db or self.store_path)

    def director(self, store: Store | None = None, publish: Any = None) -> Any:
        """The director (:mod:`server.director`) over this repository; upgrades an older
        repository with the director role on first use."""
        from server.director import Director

        return Director(self.repo, self.keys, store or self.store(), publish)

    def offline_keys_present(self) -> list[str]:
        """Private keys of offline roles (root) found in ``keys/``: they should not be here."""
        return offline_key_files(self.keys)

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        expiry: Any = None,
        keys: Path | None = None,
        repo: Path | None = None,
        root_keys_out: Path | None = None,
    ) -> DataDir:
        """Create a data directory holding only the online TUF keys.

        ``keys``/``repo`` adopt a keys directory (``edgellm keys init``) and repository
        (``edgellm repo init``) made on the operator's machine, so devices already pinning that
        root.json follow this server; the root key in ``keys`` is not copied. Without ``keys``,
        a new keys directory is made at ``root_keys_out`` (default: next to the data
        directory, see :func:`default_root_keys_dir`) and only its online keys are copied in:
        move that directory off the server."""
        from edgellm.trust import KeyStore, Repository, copy_online_keys, init_keys

        d = cls(Path(root))
        if d.config_path.exists():
            raise ServerError(f"{root} is already initialised", hint="use it with `edgellm-server run --data-dir ...`")
        if repo is not None and keys is None:
            raise ServerError("--repo needs the keys that sign it", hint="pass --keys KEYS_DIR as well")
        if keys is not None:
            KeyStore(keys)  # refuses a directory that is not a keys directory
            if repo is not None:
                Repository(repo, keys)  # refuses a directory that is not a repository
        if keys is None:
            keys = Path(root_keys_out) if root_keys_out is not None else default_root_keys_dir(d.root)
            if keys.resolve().is_relative_to(d.root.resolve()):
                raise ServerError(
                    f"{keys} is inside the data directory; the root key must not live on the server",
                    hint="pass a directory outside it (and move it offline afterwards)",
                )
            init_keys(keys, **({"expiry": expiry} if expiry is not None else {}))
        d.root.mkdir(parents=True, exist_ok=True)
        copy_online_keys(Path(keys), d.keys)
        left = offline_key_files(Path(keys))
        if left:
            logger.info("root key(s) %s stay in %s, not in the server's data directory", ", ".join(left), keys)
        if repo is not None:
            shutil.copytree(repo, d.repo)
        else:
            Repository.create(d.repo, d.keys)
        from edgellm.trust.director import ensure_director

        ensure_director(Repository(d.repo, d.keys))
        Store(d.store_path).close()
        atomic_write(
            d.config_path,
            (json.dumps({"format": "edgellm-server", "version": 1, "created": time.time()}, indent=2) + "\n").encode(),
        )
        return d


class Server:
    """Ingest + rollout driver + HTTP (+ periodic TUF timestamp refresh) in one process."""

    def __init__(
        self,
        data_dir: Path,
        mqtt: MqttConfig,
        *,
        http_host: str = "127.0.0.1",
        http_port: int = 8080,
        client_id: str = "edgellm-server-1",
        tick_s: float = 1.0,
        min_samples: int = 20,
        max_bake_factor: float = 3.0,
        update_timeout_s: float = 900.0,
        timestamp_refresh_s: float = 3600.0,
        drive_rollouts: bool = True,
        retention_days: float = 30.0,
        fl: str | None = None,
        db: str | None = None,
        leader_ttl_s: float = 10.0,
        trust_loopback: bool = True,
        fl_advertise: str | None = None,
    ) -> None:
        from server.http import HttpServer
        from server.ingest import Ingest
        from server.rollout import RolloutDriver

        self.data = DataDir(Path(data_dir)).check()
        if fl is not None and db is not None:
            raise ServerError(
                "federated runs (--fl) keep their state in the SQLite store for now",
                hint="run the replica that serves --fl without --db",
            )
        offline = self.data.offline_keys_present()
        if offline:
            logger.warning(
                "the data directory holds offline keys (%s): the server needs only the online roles; "
                "move them to the operator's machine",
                ", ".join(offline),
            )
        self.store = self.data.store(db)
        self.ingest = Ingest(self.store, mqtt, client_id=client_id)
        self.leadership = Leadership(self.store.reopen(), client_id, ttl_s=leader_ttl_s)
        self.janitor = SessionJanitor(self.leadership.store, mqtt, client_id, self.leadership.holder, leader_ttl_s)
        self.driver_store = self.store.reopen()
        self.publish = lambda t, p, r: self.ingest.publish(t, p, retain=r)
        self.director = self.data.director(self.driver_store, self.publish)
        self.driver = RolloutDriver(
            self.driver_store,
            self.director,
            min_samples=min_samples,
            max_bake_factor=max_bake_factor,
            update_timeout_s=update_timeout_s,
        )
        self.ingest.on_connect_hooks.append(self._on_broker_connect)
        self.http = HttpServer(
            self.store,
            self.data.repo,
            http_host,
            http_port,
            api=ApiContext(
                self.data,
                self.store,
                self.publish,
                self.leadership,
                trust_loopback=trust_loopback,
                replica_stats=lambda: dict(self.ingest.counters),
            ),
            director=self.director,
        )
        self.fl = None
        if fl is not None:  # federated runs: a supervised SuperLink and the run driver
            from server.federated.driver import FlDriver
            from server.federated.superlink import SuperLink, parse_address

            if fl_advertise is not None:
                parse_address(fl_advertise, "--fl-advertise")  # HOST:PORT, or a clear error before anything starts
            self.fl = FlDriver(
                self.store.reopen(),
                self.data.root,
                lambda t, p, r: self.ingest.publish(t, p, retain=r),
                SuperLink(self.data.root / "flwr", fl),
                advertise=fl_advertise,
            )
        self.tick_s = tick_s
        self.drive_rollouts = drive_rollouts
        self.retention_s = retention_days * 86400
        self.timestamp_refresh_s = timestamp_refresh_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._republish = threading.Event()
        self._director_seen: int | None = None

    @property
    def url(self) -> str:
        return self.http.url

    def _on_broker_connect(self) -> None:
        self._republish.set()  # done on the driver thread

    def start(self) -> None:
        self.ingest.start()
        self.http.start()
        if self.fl is not None and self.fl.superlink is not None:
            self.fl.superlink.start()
        self._thread = threading.Thread(target=self._loop, name="rollout-driver", daemon=True)
        self._thread.start()
        logger.info("edgellm-server: dashboard and repository at %s", self.url)

    def _loop(self) -> None:
        next_ts = time.monotonic() + self.timestamp_refresh_s
        while not self._stop.wait(self.tick_s):
            if time.monotonic() >= next_ts:
                next_ts = time.monotonic() + self.timestamp_refresh_s
                self._hourly()
            leading = self._leading()
            self.janitor.tick(leading)
            if not leading:
                continue
            if self._republish.is_set():
                self._republish.clear()
                try:
                    self.driver.republish()
                except Exception:
                    logger.exception("republishing desired state failed")
            self.driver.tick()
            try:
                from server import commands

                v = self.director.version()
                if v != self._director_seen:  # the repository changed (CLI process, replica, publish)
                    if self._director_seen is not None:
                        self.director.republish(scopes=("group",))
                    self._director_seen = v

                commands.send_pending(self.driver_store, self.publish)
            except Exception:
                logger.exception("sending device commands failed")
            if self.fl is not None:
                self.fl.tick()

    def _leading(self) -> bool:
        """Take or renew the leader lease; a new leader re-sends desired state first."""
        if self.drive_rollouts and self.leadership.check():
            self._republish.set()
        return self.drive_rollouts and self.leadership.is_leader

    def _hourly(self) -> None:
        if self.leadership.is_leader:  # one replica signs
            try:
                from edgellm.trust import Repository
                from server.ops import repository_lock

                with repository_lock(self.store):
                    Repository(self.data.repo, self.data.keys).refresh_timestamp()
            except Exception:
                logger.exception("refreshing the TUF timestamp failed")
        try:
            n = self.store.prune(self.retention_s)
            if n:
                logger.info("pruned %d telemetry rows older than %.0f days", n, self.retention_s / 86400)
        except Exception:
            logger.exception("pruning old telemetry failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.leadership.release()
        if self.fl is not None and self.fl.superlink is not None:
            self.fl.superlink.stop()
        self.http.stop()
        self.ingest.stop()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
