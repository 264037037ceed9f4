"""Fixtures (see conftest.py): a real Mosquitto broker, plain and with mutual TLS.

``mosquitto`` runs in the foreground from a temporary config (``user root`` so it can read the
test's files, persistence on so a restarted broker keeps the server's session, a large
``max_queued_messages``) and is stopped by its PID. Use the ``Broker`` object's
``stop()`` / ``start()`` to simulate an outage.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def raw_client(url: str, client_id: str):
    """A bare paho MQTT 5 client, connected and looping (to publish what a real agent would not)."""
    import paho.mqtt.client as mqtt

    from edgellm.telemetry import MqttConfig

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    cfg = MqttConfig(url)
    c.connect(cfg.host, cfg.port)
    c.loop_start()
    return c


class Broker:
    """A Mosquitto process on 127.0.0.1:``port`` with its own config and persistence dir."""

    def __init__(
        self, workdir: Path, port: int | None = None, tls: dict | None = None, persistence: bool = True
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.config = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        lines = [
            "user root",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 1000000",
            "max_inflight_messages 100",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"log_dest file {self.log}",
        ]
        if tls:
            lines += [
                f"cafile {tls['ca']}",
                f"certfile {tls['cert']}",
                f"keyfile {tls['key']}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {err}\n{self._log_tail()}")
            if _port_open(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}\n{self._log_tail()}")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file) and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-20:])
        except OSError:
            return ""


@pytest.fixture
def mqtt_broker(tmp_path):
    """A fresh plain-TCP Mosquitto for one test (stopped by PID afterwards)."""
    b = Broker(tmp_path / "mosquitto")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory):
    """A fleet CA (server.identity), a broker certificate for 127.0.0.1, one good device
    certificate, the server's client certificate (CN edgellm-server), and one device
    certificate signed by a different (rogue) CA."""
    from server.identity import CertificateAuthority

    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.init(d / "ca")
    server = ca.issue_server(d / "broker", hosts=["127.0.0.1", "localhost"])
    good = ca.issue_device("dev-good", d / "devices")
    ingest = ca.issue_server_client(d / "server-client")  # the control plane's own client cert
    rogue_ca = CertificateAuthority.init(d / "rogue-ca")
    bad = rogue_ca.issue_device("dev-rogue", d / "rogue-devices")
    return {"ca": ca.cert_path, "server": server, "good": good, "bad": bad, "ingest": ingest}


@pytest.fixture
def mqtt_broker_tls(tmp_path, fleet_pki):
    """Mosquitto with TLS and ``require_certificate true`` (client certs from the fleet CA)."""
    b = Broker(
        tmp_path / "mosquitto-tls",
        tls={"ca": str(fleet_pki["ca"]), "cert": str(fleet_pki["server"].cert), "key": str(fleet_pki["server"].key)},
    )
    b.start()
    try:
        yield b
    finally:
        b.stop()
