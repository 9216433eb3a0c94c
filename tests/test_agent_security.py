"""The MQTT link's security against a real Mosquitto: TLS with client certificates, passwords, signed commands."""

from __future__ import annotations

import datetime
import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import Operator, read_results, start_agent, start_mosquitto, stop_agent, write_config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.control.command_auth import sign_command
from agent.engine.signing import load_private_key
from builder.bundle.keys import keygen

from conftest import free_port


def _certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple | None, ca: bool = False):
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_name, signer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(signer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_pki(folder: Path) -> Path:
    """A CA, a broker certificate for 127.0.0.1, and client certificates for the device and the operator."""
    folder.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("edgevit test CA", ca_key, None, ca=True)
    _write(folder, "ca", ca, ca_key)
    for name in ("broker", "test-box", "operator"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(folder, name, _certificate(name, key, (ca.subject, ca_key)), key)
    return folder


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    folder = tmp_path_factory.mktemp("secure")
    pki = make_pki(folder / "pki")
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(folder / "passwd"), "test-box", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(folder / "passwd"), "operator", "op-pass"], check=True)
    port = free_port()
    broker = start_mosquitto(
        folder,
        port,
        f"allow_anonymous false\npassword_file {folder / 'passwd'}\ncafile {pki / 'ca.pem'}\n"
        f"certfile {pki / 'broker.pem'}\nkeyfile {pki / 'broker.key'}\nrequire_certificate true\n",
    )
    yield port, pki
    broker.terminate()
    broker.wait()


def _tls(pki: Path, name: str) -> dict:
    return {"ca": str(pki / "ca.pem"), "cert": str(pki / f"{name}.pem"), "key": str(pki / f"{name}.key")}


def _operator(port: int, pki: Path) -> Operator:
    paths = _tls(pki, "operator")
    tls = {
        "ca_certs": paths["ca"],
        "certfile": paths["cert"],
        "keyfile": paths["key"],
        "tls_version": ssl.PROTOCOL_TLS_CLIENT,
    }
    return Operator(port, tls=tls, username="operator", password="op-pass")


def test_tls_password_and_signed_commands(secure_broker, demo_bundle, signing_key, digits_video, tmp_path) -> None:
    port, pki = secure_broker
    private, public, _ = keygen(tmp_path / "operator-keys", "operator")
    mqtt = {
        "host": "127.0.0.1",
        "port": port,
        "username": "test-box",
        "password": "s3cret",
        "tls": _tls(pki, "test-box"),
        "signed_commands": {"keys": [str(public)], "max_age_s": 60},
    }
    cameras = [{"name": "cam", "source": str(digits_video), "loop": True, "fps": 10}]
    agent = start_agent(write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras, mqtt=mqtt))
    operator = _operator(port, pki)
    key = load_private_key(private)
    try:
        operator.wait_serving()  # answered "unsigned", which is enough to know the agent listens
        signed = sign_command({"id": "ping-1", "cmd": "ping"}, key)
        assert operator.send(signed)["ok"], "TLS with client certificates and a password: the agent is reachable"
        replay = operator.send(signed)
        assert replay.get("duplicate"), "a redelivery is answered from memory, not checked or run again"
        again = operator.send(json.dumps({**signed, "id": "ping-2"}).encode())
        assert not again["ok"] and again["error"].startswith("unauthorised: signature rejected")
        assert "does not match the command: the command was altered" in again["error"]
        replayed = sign_command({"id": "ping-3", "cmd": "ping", "nonce": signed["nonce"]}, key)
        assert "already used: a replayed command" in operator.send(replayed)["error"]
        unsigned = operator.send({"id": "deploy-1", "cmd": "deploy", "bundle": {"path": "/tmp/x"}})
        assert (
            unsigned["error"] == "unauthorised: unsigned: this agent requires 'sig', 'ts' and 'nonce' on every command"
        )
    finally:
        operator.close()
        _, err = stop_agent(agent)
    assert agent.returncode == 0, err[-3000:]


def test_a_wrong_password_is_reported_and_nothing_is_lost(
    secure_broker, demo_bundle, signing_key, digits_video, tmp_path
) -> None:
    port, pki = secure_broker
    mqtt = {
        "host": "127.0.0.1",
        "port": port,
        "username": "test-box",
        "password": "wrong",
        "tls": _tls(pki, "test-box"),
    }
    cameras = [{"name": "cam", "source": str(digits_video), "fps": 30}]
    config = write_config(
        tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras, mqtt=mqtt, exit_when_sources_end=True
    )
    agent = start_agent(config)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0 and "MQTT connection refused: Not authorized" in err
    served = len(read_results(tmp_path / "results.jsonl"))
    import sqlite3

    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite") as db:
        kept = db.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'result'").fetchone()[0]
    assert served > 0 and kept == served, "every result waits in the outbox for a broker that accepts the device"
