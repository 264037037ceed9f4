"""Where the local API listens: parse ``host:port``, bind a loopback TCP socket or an owner-only Unix socket."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from agent.errors import ConfigError


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen {listen!r} is not HOST:PORT", hint="for example --listen 127.0.0.1:8321")
    host = host.strip("[]") or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as e:
        raise ConfigError(f"--listen host {host!r} is not an IP address", hint="use 127.0.0.1 or ::1") from e
    if not ip.is_loopback:
        raise ConfigError(
            f"refusing to listen on {host}: the local API is for this device's own software",
            hint="listen on 127.0.0.1 (or ::1), or use --socket for a Unix socket",
        )
    return host, int(port)


def bind_tcp(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(128)
    s.setblocking(False)
    return s


def bind_unix(path: str | Path, mode: int = 0o660) -> socket.socket:
    path = Path(path)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a dead agent
        else:
            raise ConfigError(f"{path} is in use by a running process", hint="stop the other agent first")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    s.listen(128)
    s.setblocking(False)
    return s
