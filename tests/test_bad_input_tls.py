"""Bad input (issue #7), rows 14-15 of docs/bad-input.md: node keys and TLS certificates.

A bad CA certificate, node key, server certificate or key is named (file, subject, dates,
issuer) by ``dpfl-client join`` / ``dpfl-server serve`` before any Flower process starts;
certificates are made here with ``cryptography``, as ``dpfl.server.pki`` makes them. Chain,
extensions and host names are judged by ``cryptography.x509.verification``: the cases it
catches (wildcards, forged signatures, missing key identifiers, a client-only certificate, a
CA without keyUsage) are checked here for the verdict and the message. An unlisted node key
is refused by the real SuperLink in tests/test_deploy.py."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dpfl.shared.deploy.certs import check_server_certificate, check_server_files
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
    ip_only = tmp_path / "ip-only.crt"  # dpfl's own certificates always name localhost too
    ip_only.write_bytes(_pem(_leaf(pki, sans=("127.0.0.1",))))
    with _tls_server(ip_only, pki.server_key) as address:
        port = address.rsplit(":", 1)[1]
        with pytest.raises(ConfigError, match=r"is not valid for 'localhost': it names "
                                              r"\['127.0.0.1'\]"):
            preflight(_node(pki, pki.ca_cert, superlink=f"localhost:{port}"))
    # nobody listening yet: the coordinator may start later, the SuperNode will retry
    preflight(_node(pki, pki.ca_cert, superlink="127.0.0.1:1"))


def _leaf(pki, sans=("127.0.0.1",), aki=True, eku=ExtendedKeyUsageOID.SERVER_AUTH,
          signer=None) -> x509.Certificate:
    """A server certificate for ``pki.server_key``, issued in the name of ``pki``'s CA and
    signed by ``signer`` (default: the CA key), with the extensions asked for."""
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    names = []
    for host in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    b = (x509.CertificateBuilder().subject_name(x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
         .issuer_name(ca.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(FUTURE[1])
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if aki:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    return b.sign(signer or ca_key, hashes.SHA384())


@pytest.mark.parametrize("case", ["other-ca", "expired", "wrong-key", "bad-site-key",
                                  "no-key-identifier", "no-address", "no-loopback"])
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
    elif case == "no-key-identifier":  # what dpfl-server certs wrote before the verifier
        pki.server_cert.write_bytes(_pem(_leaf(pki, aki=False)))
        expected = (f"server certificate {pki.server_cert} .* does not form a standard "
                    "certificate chain with the CA in .*: invalid extension: authority key "
                    "identifier: .*; re-issue it with 'dpfl-server certs --out PKI --host")
    elif case == "no-address":
        pki.server_cert.write_bytes(_pem(_leaf(pki, sans=())))
        expected = f"server certificate {pki.server_cert} .* names no address"
    elif case == "no-loopback":  # the Fleet proxy and the loopback commands could not dial it
        pki.server_cert.write_bytes(_pem(_leaf(pki, sans=("coord.example.org", "127.0.0.1"))))
        expected = (f"{pki.server_cert} does not name \\['localhost'\\], which the Fleet proxy "
                    "and the coordinator's own commands dial on loopback; re-issue it")
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


def _verdict(pki, cert: x509.Certificate, host: str, ca_path: Path | None = None) -> str:
    """"ok", or the message with which the site's check refuses ``cert`` for ``host``."""
    ca_path = ca_path or pki.ca_cert
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    try:
        check_server_certificate(cert, "the certificate presented by X", host, ca, ca_path)
    except ConfigError as exc:
        return str(exc)
    return "ok"


@pytest.mark.parametrize("host, ok", [
    ("a.example.org", True), ("A.Example.ORG", True),  # one label, any case
    ("a.example.com", False),  # another domain
    ("x.a.example.org", False),  # a wildcard covers one label only
    ("example.org", False),  # nor the bare domain
    ("127.0.0.1", True), ("10.0.0.1", False)])
def test_a_wildcard_certificate_covers_one_label_of_its_own_domain(pki, host, ok):
    verdict = _verdict(pki, _leaf(pki, sans=("127.0.0.1", "*.example.org")), host)
    if ok:
        assert verdict == "ok"
    else:
        assert re.search(f"is not valid for '{re.escape(host)}': it names "
                         r"\['127.0.0.1', '\*.example.org'\]", verdict), verdict


def test_the_verifier_refuses_what_the_profile_forbids(pki, tmp_path):
    # signed by another key in the name of our CA (a forged issuer)
    forged = _leaf(pki, signer=ec.generate_private_key(ec.SECP384R1()))
    assert re.search(f"is not signed by the CA in {pki.ca_cert} .*: candidates exhausted: "
                     "signature does not match", _verdict(pki, forged, "127.0.0.1"))
    # a client certificate is no server certificate
    client = _leaf(pki, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
    assert re.search("does not form a standard certificate chain .*: required EKU not found; "
                     "a TLS server certificate needs extendedKeyUsage serverAuth",
                     _verdict(pki, client, "127.0.0.1"))
    # a CA without keyUsage may not issue certificates: re-create the CA
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    name = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).subject
    old_ca = tmp_path / "no-key-usage-ca.crt"
    old_ca.write_bytes(_pem(
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(FUTURE[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())))
    verdict = _verdict(pki, _leaf(pki), "127.0.0.1", old_ca)
    assert re.search(f"with the CA in {old_ca} .*: candidates exhausted: invalid extension: "
                     "key usage: .*; re-create the CA", verdict), verdict
    # a name no verifier accepts is named, not raised as a bare ValueError
    assert "cannot check the certificate presented by X for 'bad_name'" in \
        _verdict(pki, _leaf(pki), "bad_name")


def test_certificates_dpfl_writes_pass_the_verifier(pki, tmp_path):
    from dpfl.server.pki import make_pki

    layout = make_pki(tmp_path / "wide", [], ["127.0.0.1", "::1", "localhost",
                                              "*.example.org"])
    check_server_files(layout.ca_cert, layout.server_cert, layout.server_key)
    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    for host in ("127.0.0.1", "[::1]", "localhost", "coordinator.example.org"):
        assert _verdict(layout, cert, host) == "ok", host
    # deploy/make-certs.sh (through dpfl-server certs) writes the same
    out = tmp_path / "script-pki"
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    subprocess.run(["bash", str(Path(__file__).resolve().parent.parent / "deploy" /
                                "make-certs.sh"), str(out), "10.0.0.5,coordinator.example.org",
                    "site-a"], env={**os.environ, "PATH": path}, check=True,
                   capture_output=True, timeout=300)
    from dpfl.server.pki import PkiLayout

    script = PkiLayout(out)
    check_server_files(script.ca_cert, script.server_cert, script.server_key)
    cert = x509.load_pem_x509_certificate(script.server_cert.read_bytes())
    assert _verdict(script, cert, "10.0.0.5") == "ok"
    assert _verdict(script, cert, "coordinator.example.org") == "ok"
    assert script.node_key("site-a").exists()


def test_reissuing_the_server_certificate_mends_an_older_pki(pki):
    """A PKI from an older dpfl: CA without key identifiers, server certificate without an
    authority key identifier. The coordinator names the fix; 'dpfl-server certs --host'
    re-issues server.crt under the same CA (sites keep ca.crt) and it then verifies."""
    from dpfl.server.pki import make_pki

    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    old_ca = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(FUTURE[1]))
    key_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    for ext in (x509.BasicConstraints(ca=True, path_length=0), key_usage):
        old_ca = old_ca.add_extension(ext, critical=True)
    pki.ca_cert.write_bytes(_pem(old_ca.sign(ca_key, hashes.SHA384())))
    pki.server_cert.write_bytes(_pem(_leaf(pki, aki=False)))
    with pytest.raises(ConfigError, match="authority key identifier.*re-issue it with "
                                          "'dpfl-server certs --out PKI --host NAME...'"):
        check_server_files(pki.ca_cert, pki.server_cert, pki.server_key)
    ca_before = pki.ca_cert.read_bytes()
    make_pki(pki.root, [], ["127.0.0.1"])
    assert pki.ca_cert.read_bytes() == ca_before
    check_server_files(pki.ca_cert, pki.server_cert, pki.server_key)
