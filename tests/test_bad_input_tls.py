"""Bad input (issue #7), rows 14-15 of docs/bad-input.md: node keys and TLS certificates.

A bad CA certificate, node key, server certificate or key is named (file, subject, dates,
issuer) by ``dpfl-client join`` / ``dpfl-server serve`` before any Flower process starts;
certificates are made here with ``cryptography``, as ``dpfl.server.pki`` makes them. An
unlisted node key is refused by the real SuperLink in tests/test_deploy.py."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import socket
import ssl
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import SiteConfig

from .test_bad_input import files


# -- helpers --------------------------------------------
def _cert(subject: str, key, issuer_name: str, issuer_key, start: dt.datetime,
          end: dt.datetime, ca: bool, hosts=()) -> x509.Certificate:
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
    b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer_name))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        import ipaddress
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(h)) for h in hosts]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


NOW = dt.datetime.now(dt.timezone.utc)
PAST = (NOW - dt.timedelta(days=400), NOW - dt.timedelta(days=30))
FUTURE = (NOW + dt.timedelta(days=30), NOW + dt.timedelta(days=400))


@pytest.fixture
def pki(tmp_path):
    from dpfl.server.pki import make_pki

    return make_pki(tmp_path / "pki", ["h1"], ["127.0.0.1"])


def _node(pki, ca_cert, node_key=None, state=None, superlink="127.0.0.1:1"):
    from dpfl.client.deploy import SiteNode

    site = SiteConfig(site_id="h1", data="silo.npz",
                      state_dir=str(state or pki.root.parent / "site-state"))
    return SiteNode(site=site, superlink=superlink, ca_cert=Path(ca_cert),
                    node_key=Path(node_key or pki.node_key("h1")))


def _bad_ca(pki, case) -> tuple[Path, str]:
    path = pki.root.parent / "bad-ca.crt"
    key = ec.generate_private_key(ec.SECP256R1())
    if case == "missing":
        return path, f"CA certificate {path} does not exist"
    if case == "not-a-certificate":
        path.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                        "-----END CERTIFICATE-----\n")
        return path, f"CA certificate {path} is not an X.509 certificate"
    if case == "server-cert-given":
        return pki.server_cert, f"CA certificate {pki.server_cert} is not a CA certificate " \
                                "\\(subject CN=127.0.0.1"
    start, end = PAST if case == "expired" else FUTURE
    path.write_bytes(_pem(_cert("old CA", key, "old CA", key, start, end, ca=True)))
    if case == "expired":
        return path, (f"CA certificate {path} \\(subject CN=old CA\\) expired on "
                      f"{end:%Y-%m-%d} .* \\(valid {start:%Y-%m-%d} to {end:%Y-%m-%d}")
    return path, (f"CA certificate {path} \\(subject CN=old CA\\) is not valid yet: valid "
                  f"from {start:%Y-%m-%d}")


@pytest.mark.parametrize("case", ["missing", "not-a-certificate", "server-cert-given",
                                  "expired", "not-yet-valid"])
def test_site_refuses_a_bad_ca_certificate_before_starting(pki, monkeypatch, case):
    path, expected = _bad_ca(pki, case)
    with pytest.raises(ConfigError, match=expected):
        _node(pki, path)
    # and through the command line: a clear message, and no SuperNode is started
    from dpfl.client import cli, deploy

    monkeypatch.setattr(deploy, "run_node", lambda node: pytest.fail("SuperNode started"))
    res = CliRunner().invoke(cli.main, [
        "join", "--superlink", "127.0.0.1:1", "--ca-cert", str(path), "--node-key",
        str(pki.node_key("h1")), "--site-id", "h1", "--data", "silo.npz", "--base-model", "m",
        "--state-dir", str(pki.root.parent / "site-state")])
    assert res.exit_code == 1 and str(path) in res.output, res.output


def test_site_refuses_a_node_key_that_is_not_one(pki):
    bad = pki.root.parent / "node.key"
    bad.write_bytes(pki.ca_cert.read_bytes())
    with pytest.raises(ConfigError, match=f"node key {bad} is not an unencrypted OpenSSH "
                                          "private key"):
        _node(pki, pki.ca_cert, node_key=bad)


@contextmanager
def _tls_server(cert: Path, key: Path):
    """A TLS server on 127.0.0.1 presenting ``cert`` (what a SuperLink shows a site)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(5)
            try:
                ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def _other_pki(pki):
    from dpfl.server.pki import make_pki

    return make_pki(pki.root.parent / "other-pki", [], ["127.0.0.1"])


def _expired_server_cert(pki, path: Path) -> None:
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    cert = (x509.CertificateBuilder().subject_name(x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(PAST[0]).not_valid_after(PAST[1])
            .sign(ca_key, hashes.SHA384()))
    path.write_bytes(_pem(cert))


def test_site_checks_the_certificate_the_coordinator_presents(pki, tmp_path):
    from dpfl.client.deploy import preflight

    with _tls_server(pki.server_cert, pki.server_key) as address:  # the right one: passes
        preflight(_node(pki, pki.ca_cert, superlink=address))
    other = _other_pki(pki)
    with _tls_server(other.server_cert, other.server_key) as address:
        with pytest.raises(ConfigError, match=f"the certificate presented by {address} .* is "
                                              f"not signed by the CA in {pki.ca_cert}"):
            preflight(_node(pki, pki.ca_cert, superlink=address))
    expired = tmp_path / "expired.crt"
    _expired_server_cert(pki, expired)
    with _tls_server(expired, pki.server_key) as address:
        with pytest.raises(ConfigError, match=f"presented by {address} .* expired on "
                                              f"{PAST[1]:%Y-%m-%d}"):
            preflight(_node(pki, pki.ca_cert, superlink=address))
    with _tls_server(pki.server_cert, pki.server_key) as address:
        port = address.rsplit(":", 1)[1]
        with pytest.raises(ConfigError, match=r"is not valid for 'localhost': it names "
                                              r"\['127.0.0.1'\]"):
            preflight(_node(pki, pki.ca_cert, superlink=f"localhost:{port}"))
    # nobody listening yet: the coordinator may start later, the SuperNode will retry
    preflight(_node(pki, pki.ca_cert, superlink="127.0.0.1:1"))


@pytest.mark.parametrize("case", ["other-ca", "expired", "wrong-key", "bad-site-key"])
def test_coordinator_refuses_bad_tls_files_before_starting(pki, tmp_path, monkeypatch, case):
    from dpfl.server import cli, deploy

    monkeypatch.setattr(deploy, "start_superlink",
                        lambda coord: pytest.fail("SuperLink started"))
    args = ["serve", "--pki", str(pki.root), "--state-dir", str(tmp_path / "coord")]
    if case == "other-ca":
        other = _other_pki(pki)
        shutil.copy(other.server_cert, pki.server_cert)
        shutil.copy(other.server_key, pki.server_key)
        expected = f"server certificate {pki.server_cert} .* is not signed by the CA in"
    elif case == "expired":
        _expired_server_cert(pki, pki.server_cert)
        expected = f"server certificate {pki.server_cert} .* expired on {PAST[1]:%Y-%m-%d}"
    elif case == "wrong-key":
        shutil.copy(_other_pki(pki).server_key, pki.server_key)
        expected = f"server key {pki.server_key} does not belong to server certificate"
    else:
        bad = tmp_path / "h2.pub"
        bad.write_text("ssh-ed25519 AAAA-not-a-key h2\n")
        args += ["--site-key", f"h2={bad}"]
        expected = f"public key of site h2, {bad}, is not an OpenSSH public key"
    before = files(pki.root)
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 1, res.output
    assert re.search(expected, res.output.replace("\n", " ")), res.output
    assert files(pki.root) == before and not (tmp_path / "coord").exists()
