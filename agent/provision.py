"""Provisioning: pin the trust root, record who this device is, create its secrets."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from agent._fs import atomic_write, create_private_file, fsync_dir
from agent.config import AgentConfig, AgentPaths
from agent.errors import AgentError, ConfigError
from edgellm.ids import ID_RULE, check_id
from edgellm.telemetry import MqttConfig

log = logging.getLogger(__name__)


def _check_root(root_file: Path) -> bytes:
    """The file must be a TUF root that verifies with its own keys (threshold of signatures)."""
    from tuf.api.metadata import Metadata, Root

    data = root_file.read_bytes()
    try:
        md = Metadata.from_bytes(data)
        if not isinstance(md.signed, Root):
            raise ValueError(f"it is {md.signed.type} metadata, not root")
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except Exception as e:
        raise AgentError(
            f"{root_file} is not a valid, self-signed TUF root: {e}",
            hint="use the root.json of your repository (`edgellm repo init` writes it)",
        ) from e
    return data


def _key_pair(key_type: str, device_id: str) -> tuple[bytes, bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        algo = None
    elif key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
        algo = hashes.SHA256()
    else:
        raise AgentError(f"unknown key type {key_type!r}", hint="use ecdsa-p256 or ed25519")
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, algo)
    )
    return priv, pub, csr.public_bytes(serialization.Encoding.PEM)


def provision(
    paths: AgentPaths,
    *,
    device_id: str,
    profile: str,
    server: str | None,
    root: str | Path,
    group: str = "default",
    mqtt_url: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    listen: str | None = None,
    socket_path: str | None = None,
    key_type: str = "ecdsa-p256",
    force: bool = False,
    train_data: str | Path | None = None,
    learn_from_use: bool = False,
    threads: int | None = None,
) -> AgentConfig:
    if paths.config.exists() and not force:
        raise AgentError(
            f"{paths.root} is already provisioned",
            hint="pass --force to re-provision (this replaces the API token and the device key)",
        )
    for value, what in ((device_id, "device id"), (group, "group")):
        try:
            check_id(value, what)
        except ValueError:
            raise ConfigError(
                f"{what} {value!r} is not valid here (telemetry topics, the server and the repository all use it)",
                hint=f"use {ID_RULE}, e.g. robot-1",
            ) from None
    _validate_profile(profile)
    if mqtt_url:
        _ = MqttConfig(mqtt_url).port  # refuses a URL that is not mqtt:// or mqtts:// now, not at run time
    root_bytes = _check_root(Path(root))
    for f in (ca, cert, key):
        if f and not Path(f).is_file():
            raise AgentError(f"{f} does not exist", hint="pass existing PEM files to --ca/--cert/--key")
    if train_data is not None and not Path(train_data).is_dir():
        raise AgentError(
            f"--train-data {train_data} is not a directory",
            hint="pass a directory of .txt/.jsonl text this device may learn from",
        )
    paths.ensure_dirs()
    os.chmod(paths.root, 0o750)
    # pinned root: read-only file in a directory the agent itself never writes into
    paths.trust.mkdir(parents=True, exist_ok=True)
    if paths.trust_root.exists():
        os.chmod(paths.trust_root, 0o644)
    atomic_write(paths.trust_root, root_bytes, 0o444)
    # API tokens: one for inference, one for admin actions (the first is not the second)
    for token_file in (paths.token, paths.admin_token):
        if token_file.exists():
            token_file.unlink()
        create_private_file(token_file, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
    # device key pair (for mTLS to the broker)
    if paths.keys.exists():
        shutil.rmtree(paths.keys)
    paths.keys.mkdir(mode=0o700)
    priv, pub, csr = _key_pair(key_type, device_id)
    create_private_file(paths.keys / "device.key", priv, mode=0o600)
    atomic_write(paths.keys / "device.pub", pub, 0o644)
    atomic_write(paths.keys / "device.csr", csr, 0o644)
    fsync_dir(paths.keys)
    mqtt = None
    if mqtt_url:
        mqtt = MqttConfig(url=mqtt_url, ca=_abs(ca), cert=_abs(cert), key=_abs(key))
    cfg = AgentConfig(
        device_id=device_id,
        profile=profile,
        server=server.rstrip("/") if server else None,
        group=group,
        mqtt=mqtt,
        threads=threads,
    )
    if listen is not None:
        cfg.listen = listen or None
    if socket_path is not None:
        cfg.socket = socket_path or None
    cfg.train_data = str(Path(train_data).absolute()) if train_data is not None else None
    cfg.learn_from_use = learn_from_use
    cfg.save(paths)
    log.info("provisioned", extra={"device_id": device_id, "profile": profile})
    return cfg


def _abs(p: str | None) -> str | None:
    return str(Path(p).absolute()) if p else None


def _validate_profile(name: str) -> None:
    from edgellm.errors import ProfileError
    from edgellm.profiles import get_profile

    try:
        get_profile(name)
    except ProfileError as e:
        raise ConfigError(e.message, hint=e.hint or "choose a profile from `edgellm profiles list`") from e


def read_token(paths: AgentPaths) -> str:
    return paths.token.read_text().strip()


def ensure_admin_token(paths: AgentPaths) -> str:
    """The admin token; a data dir provisioned before admin tokens existed gets one (0600) now."""
    if not paths.admin_token.exists():
        create_private_file(paths.admin_token, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
        log.warning("created %s: admin API calls need this token from now on", paths.admin_token)
    return paths.admin_token.read_text().strip()
