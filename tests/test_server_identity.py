"""Fleet identity and keys on the server host: private keys are 0600 from the moment they exist
(no fixed temporary name to pre-plant), the control plane's certificate names cannot be obtained
as device certificates, and the TUF root key never enters the server's data directory."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

from server.cli import main
from server.errors import IdentityError
from server.identity import SERVER_IDENTITY, CertificateAuthority, mosquitto_acl


def cli(*args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# --------------------------------------------------------------------------- private keys


def test_a_stale_or_planted_temporary_file_never_widens_a_private_key(tmp_path):
    ca_dir, out = tmp_path / "ca", tmp_path / "devices"
    ca_dir.mkdir()
    out.mkdir()
    stale = ca_dir / ".ca.key.tmp"
    stale.write_bytes(b"left over")
    stale.chmod(0o644)
    elsewhere = tmp_path / "attacker-readable"
    elsewhere.write_bytes(b"")
    (out / ".robot-7.key.tmp").symlink_to(elsewhere)  # a planted link at the old fixed name

    ca = CertificateAuthority.init(ca_dir)
    issued = ca.issue_device("robot-7", out)

    assert mode(ca_dir / "ca.key") == 0o600 and mode(issued.key) == 0o600
    assert elsewhere.read_bytes() == b""  # nothing written through the link
    assert stale.read_bytes() == b"left over"


def test_private_keys_are_0600_while_they_are_written(tmp_path, monkeypatch):
    import edgellm._fs as fs

    seen: list[int] = []
    real_fsync = fs.os.fsync

    def watch(fd):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):  # the temporary file, just written, not yet renamed
            seen.append(stat.S_IMODE(st.st_mode))
        return real_fsync(fd)

    monkeypatch.setattr(fs.os, "fsync", watch)
    ca = CertificateAuthority.init(tmp_path / "ca")
    seen_ca = list(seen)
    ca.issue_device("robot-8", tmp_path / "devices")
    assert len(seen_ca) == 2 and len(seen) == 4  # key + certificate, twice
    assert all(m == 0o600 for m in seen)  # every temporary file is 0600 while its bytes go in


# --------------------------------------------------------------------------- reserved names


@pytest.mark.parametrize("name", [SERVER_IDENTITY, "edgellm-server-2", "EDGELLM-SERVER"])
def test_control_plane_names_cannot_be_issued_as_device_certificates(tmp_path, name):
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(IdentityError, match="reserved for the control plane") as e:
        ca.issue_device(name, tmp_path / "devices")
    assert "issue-server-client" in e.value.hint
    assert not (tmp_path / "devices" / f"{name}.key").exists()


def test_ca_cli_refuses_the_server_name_for_a_device_and_issues_it_separately(tmp_path):
    from cryptography import x509

    data = tmp_path / "srv"
    cli("init", "--data-dir", data)
    cli("ca", "init", "--data-dir", data)
    r = cli("ca", "issue-device", "--data-dir", data, "edgellm-server", ok=False)
    assert r.exit_code != 0 and "reserved" in r.output and "hint" in r.output
    assert "server.crt" not in r.output
    r = cli("ca", "issue-server-client", "--data-dir", data)
    cert = x509.load_pem_x509_certificate((data / "ca" / "server-client" / "edgellm-server.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=edgellm-server"
    assert mode(data / "ca" / "server-client" / "edgellm-server.key") == 0o600
    assert cli("ca", "issue-server-client", "--data-dir", data, "--name", "robot-1", ok=False).exit_code != 0


def test_the_server_acl_reads_telemetry_and_writes_desired_state_but_never_writes_as_a_device():
    acl = mosquitto_acl()
    server_part = acl.split("# every device")[0]
    assert "topic read edgellm/v1/dev/#" in server_part
    assert "topic write edgellm/v1/desired/#" in server_part and "topic write edgellm/v1/cmd/#" in server_part
    assert "readwrite" not in acl and "topic write edgellm/v1/dev" not in acl
    with pytest.raises(IdentityError):
        mosquitto_acl(("robot-1",))


def test_the_server_identity_cannot_publish_device_telemetry_on_a_real_broker(tmp_path, fleet_pki):
    import paho.mqtt.client as mqtt
    from fixtures_mqtt import Broker

    from edgellm import telemetry as wire
    from edgellm.telemetry import MqttConfig
    from server.identity import mosquitto_config

    b = Broker(tmp_path / "broker")
    acl = tmp_path / "broker" / "mosquitto.acl"
    acl.write_text(mosquitto_acl())
    b.config.write_text(
        mosquitto_config(
            port=b.port,
            bind="127.0.0.1",
            ca=fleet_pki["ca"],
            cert=fleet_pki["server"].cert,
            key=fleet_pki["server"].key,
            acl_file=acl,
            run_as_root=True,
        )
    )
    b.start()
    try:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="srv-as-device", protocol=mqtt.MQTTv5)
        MqttConfig(
            f"mqtts://127.0.0.1:{b.port}",
            ca=str(fleet_pki["ca"]),
            cert=str(fleet_pki["ingest"].cert),
            key=str(fleet_pki["ingest"].key),
        ).apply_tls(c)
        codes: dict[str, int] = {}
        topics = {}
        c.on_publish = lambda cl, u, mid, rc, p: codes.__setitem__(topics[mid], rc.value)
        c.connect("127.0.0.1", b.port)
        c.loop_start()
        env = wire.Envelope(device="dev-good", kind="event", seq=1, ts=1.0, body={"name": "forged"})
        for t, payload in (
            (wire.device_topic("dev-good", "event"), env.to_json()),
            (wire.desired_group_topic("lab"), wire.Desired(model="m", version="1").to_json()),
        ):
            info = c.publish(t, payload, qos=1)
            topics[info.mid] = t
            info.wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
        assert codes[wire.device_topic("dev-good", "event")] == 0x87  # MQTT 5 "Not authorized"
        assert codes[wire.desired_group_topic("lab")] < 0x80  # accepted (0x10: nobody subscribed yet)
    finally:
        b.stop()


# --------------------------------------------------------------------------- the TUF root key


def test_init_keeps_the_root_key_out_of_the_data_directory_and_still_publishes(tmp_path, packed_bundle):
    from edgellm.trust import Repository

    data = tmp_path / "srv"
    r = cli("init", "--data-dir", data)
    operator = tmp_path / "srv-root-keys"
    assert str(operator) in r.output and "offline" in r.output
    assert not list((data / "keys").glob("root-*.pem"))
    assert list(operator.glob("root-*.pem")) and mode(operator / "root-1.pem") == 0o600
    # the online roles, plus the director's online key that signs assignments
    assert sorted(p.name for p in (data / "keys").glob("*.pem")) == [
        "director-1.pem",
        "snapshot-1.pem",
        "targets-1.pem",
        "timestamp-1.pem",
    ]
    assert all(mode(p) == 0o600 for p in (data / "keys").glob("*.pem")) and mode(data / "keys") == 0o700
    assert (data / "keys" / "root.json").read_bytes() == (operator / "root.json").read_bytes()
    cli("publish", "--data-dir", data, packed_bundle)  # the online keys are enough to publish
    Repository(data / "repo", data / "keys").refresh_timestamp()
    r = cli("init", "--data-dir", tmp_path / "srv2", "--root-keys-out", tmp_path / "srv2" / "inside", ok=False)
    assert r.exit_code != 0 and "inside the data directory" in r.output


def test_init_adopting_operator_keys_leaves_the_root_key_behind(tmp_path):
    from edgellm.trust import Repository, init_keys

    keys = tmp_path / "operator-keys"
    init_keys(keys)
    Repository.create(tmp_path / "repo", keys)
    r = cli("init", "--data-dir", tmp_path / "srv", "--keys", keys, "--repo", tmp_path / "repo")
    assert "root key: kept in" in r.output and "not copied" in r.output
    assert not list((tmp_path / "srv" / "keys").glob("root-*.pem"))
    assert (keys / "root-1.pem").exists()
    from server.app import DataDir

    assert DataDir(tmp_path / "srv").offline_keys_present() == []


def test_init_refuses_a_directory_that_is_not_a_keys_directory_and_leaves_nothing(tmp_path):
    (tmp_path / "not-keys").mkdir()
    r = cli("init", "--data-dir", tmp_path / "srv", "--keys", tmp_path / "not-keys", ok=False)
    assert r.exit_code != 0 and "keys" in r.output and not (tmp_path / "srv").exists()
