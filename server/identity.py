"""Fleet identity: a private CA that signs the broker's certificate and one certificate per device.

The broker (Mosquitto, see :func:`mosquitto_config`) requires a client certificate signed by this
CA and uses the certificate's common name (the device id) as the MQTT user name, so ACLs can pin
each device to its own topics. Keys are ECDSA P-256, written with mode 0600 from the moment the
file exists (:func:`edgellm._fs.atomic_write`: a fresh ``O_EXCL`` temporary file, never a fixed name).

Names starting with :data:`SERVER_IDENTITY` belong to the control plane: the broker's ACL gives
them the server's rights, so :meth:`CertificateAuthority.issue_device` refuses them and
:meth:`CertificateAuthority.issue_server_client` is the only way to obtain one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from pathlib import Path

from edgellm._fs import atomic_write
from edgellm.ids import ID_RULE, valid_id
from server.errors import IdentityError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
KEY_MODE = 0o600
SERVER_IDENTITY = "edgellm-server"


@dataclasses.dataclass(frozen=True)
class IssuedCert:
    cert: Path
    key: Path
    ca: Path


def is_reserved(name: str) -> bool:
    """True for the control plane's names (``edgellm-server``, ``edgellm-server-2``, ...)."""
    return name.lower().startswith(SERVER_IDENTITY)


def _pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined]  # any cryptography private key
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    def __init__(self, ca_dir: str | Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.dir = Path(ca_dir)
        if not (self.dir / CA_CERT).is_file() or not (self.dir / CA_KEY).is_file():
            raise IdentityError(
                f"{self.dir}: no fleet CA here", hint="run `edgellm-server ca init --data-dir DIR` first"
            )
        self.cert = x509.load_pem_x509_certificate((self.dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((self.dir / CA_KEY).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{self.dir / CA_KEY}: not an ECDSA key", hint="this is not a CA made by `ca init`")
        self.key = key

    @property
    def cert_path(self) -> Path:
        return self.dir / CA_CERT

    @classmethod
    def init(cls, ca_dir: str | Path, name: str = "edgellm fleet CA", days: int = 3650) -> CertificateAuthority:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        d = Path(ca_dir)
        if (d / CA_KEY).exists():
            raise IdentityError(
                f"{d}: a fleet CA already exists", hint="reuse it; delete the directory only to start a new fleet"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        atomic_write(d / CA_KEY, _pem_key(key), mode=KEY_MODE)
        atomic_write(d / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return cls(d)

    def _issue(
        self, common_name: str, out_dir: Path, stem: str, *, server_hosts: list[str] | None, days: int
    ) -> IssuedCert:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server_hosts is not None:
            sans: list[x509.GeneralName] = []
            for h in server_hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        out = Path(out_dir)
        cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
        atomic_write(key_path, _pem_key(key), mode=KEY_MODE)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return IssuedCert(cert=cert_path, key=key_path, ca=self.cert_path)

    def issue_device(self, device_id: str, out_dir: str | Path, days: int = 825) -> IssuedCert:
        """A client certificate whose common name is the device id (never a control-plane name)."""
        if not valid_id(device_id):
            raise IdentityError(f"device id {device_id!r} is not valid", hint=f"use {ID_RULE}")
        if is_reserved(device_id):
            raise IdentityError(
                f"{device_id!r} is reserved for the control plane and cannot be a device",
                hint="choose another device id; the server's own client certificate comes from "
                "`edgellm-server ca issue-server-client`",
            )
        return self._issue(device_id, Path(out_dir), device_id, server_hosts=None, days=days)

    def issue_server_client(self, out_dir: str | Path, name: str = SERVER_IDENTITY, days: int = 825) -> IssuedCert:
        """The control plane's own MQTT client certificate (CN ``edgellm-server`` or
        ``edgellm-server-N`` for replicas), which the broker's ACL lets ingest telemetry and
        publish desired state and commands."""
        if not valid_id(name) or not is_reserved(name):
            raise IdentityError(
                f"{name!r} is not a control-plane name", hint=f"use {SERVER_IDENTITY} or {SERVER_IDENTITY}-N"
            )
        return self._issue(name, Path(out_dir), name, server_hosts=None, days=days)

    def issue_server(self, out_dir: str | Path, hosts: list[str], days: int = 825) -> IssuedCert:
        """A TLS server certificate (for the broker) valid for ``hosts`` (names or IPs)."""
        if not hosts:
            raise IdentityError(
                "a server certificate needs at least one host name or IP", hint="pass --host NAME (repeatable)"
            )
        return self._issue(hosts[0], Path(out_dir), "server", server_hosts=hosts, days=days)


def mosquitto_acl(server_users: tuple[str, ...] = (SERVER_IDENTITY,)) -> str:
    """ACL for a broker with ``use_identity_as_username``: the user name is the certificate's
    common name, so a device may only write its own telemetry topics and read its own desired
    state and commands (plus group desired state). The control plane (names reserved by
    :func:`is_reserved`) reads device telemetry and writes desired state and commands; it never
    writes as a device."""
    lines = ["# edgellm: generated by `edgellm-server ca mosquitto-conf`", ""]
    for u in server_users:
        if not is_reserved(u):
            raise IdentityError(
                f"{u!r} is not a control-plane name", hint=f"use {SERVER_IDENTITY} or {SERVER_IDENTITY}-N"
            )
        lines += [
            f"user {u}",
            "topic read edgellm/v1/dev/#",
            "topic write edgellm/v1/desired/#",
            "topic write edgellm/v1/cmd/#",
            "",
        ]
    lines += [
        "# every device (user name = certificate CN = device id)",
        "pattern write edgellm/v1/dev/%u/#",
        "pattern read edgellm/v1/desired/device/%u",
        "pattern read edgellm/v1/cmd/%u",
        "pattern read edgellm/v1/desired/group/#",
    ]
    return "\n".join(lines) + "\n"


def mosquitto_config(
    *,
    port: int,
    ca: Path,
    cert: Path,
    key: Path,
    persistence_dir: Path | None = None,
    acl_file: Path | None = None,
    bind: str = "0.0.0.0",
    run_as_root: bool = False,
) -> str:
    """A Mosquitto configuration that requires client certificates from the fleet CA (and, with
    ``acl_file``, pins each device to its own topics; see :func:`mosquitto_acl`)."""
    lines = []
    if run_as_root:
        lines.append("user root")
    lines += [
        f"listener {port} {bind}",
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "max_queued_messages 100000",
        "max_packet_size 262144",
    ]
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    if persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {persistence_dir}/", "autosave_interval 30"]
    return "\n".join(lines) + "\n"
