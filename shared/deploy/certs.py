"""Up-front checks of a deployment's TLS files and node keys, before any Flower process starts.

Once running, Flower's SuperNode reports a wrong certificate only as a failed handshake in a
retry loop, and the SuperLink a bad key file as an exit code. These checks say which file is
wrong and why (its subject, its dates, its issuer) instead:

* a site (``dpfl-client join``) checks the federation CA certificate and its own node key, and,
  when the coordinator answers, the certificate the coordinator presents: signed by that CA,
  within its dates, issued for the address the site dials;
* the coordinator (``dpfl-server serve``) checks its CA and server certificates (dates, issuer),
  that ``server.key`` belongs to ``server.crt``, and every site public key it is to list.

Dates are compared with the clock of the machine running the check.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dpfl.shared.errors import ConfigError

log = logging.getLogger(__name__)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _read(path: str | Path, what: str, hint: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file; {hint}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc


def load_certificate(path: str | Path, what: str = "certificate",
                     hint: str = "the coordinator's 'dpfl-server certs' writes it"
                     ) -> x509.Certificate:
    """The first PEM (or DER) certificate in ``path``; :class:`ConfigError` naming the file."""
    data = _read(path, what, hint)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{what} {path} is not an X.509 certificate ({exc}); {hint}") from exc


def check_dates(cert: x509.Certificate, where: str, now: dt.datetime | None = None) -> None:
    """:class:`ConfigError` unless ``now`` lies within the certificate's validity period."""
    now = now or dt.datetime.now(dt.timezone.utc)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now > end:
        raise ConfigError(f"{where} (subject {_subject(cert)}) expired on {end:%Y-%m-%d %H:%M} "
                          f"UTC (valid {start:%Y-%m-%d} to {end:%Y-%m-%d}, now "
                          f"{now:%Y-%m-%d %H:%M} UTC); re-issue it ('dpfl-server certs')")
    if now < start:
        raise ConfigError(f"{where} (subject {_subject(cert)}) is not valid yet: valid from "
                          f"{start:%Y-%m-%d %H:%M} UTC, now {now:%Y-%m-%d %H:%M} UTC; check "
                          "this machine's clock")


def check_ca_certificate(path: str | Path, now: dt.datetime | None = None) -> x509.Certificate:
    """The federation CA certificate: readable, a CA, within its dates."""
    ca = load_certificate(path, "CA certificate")
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = ca.issuer == ca.subject  # an old-style self-signed root
    if not is_ca:
        raise ConfigError(f"CA certificate {path} is not a CA certificate (subject "
                          f"{_subject(ca)}, issued by {ca.issuer.rfc4514_string()}); give "
                          "the federation's ca.crt, not a server certificate")
    check_dates(ca, f"CA certificate {path}", now)
    return ca


def check_issued_by(cert: x509.Certificate, where: str, ca: x509.Certificate,
                    ca_path: str | Path) -> None:
    """:class:`ConfigError` unless ``ca`` signed ``cert``."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{where} (subject {_subject(cert)}, issuer {cert.issuer.rfc4514_string()}) is not "
            f"signed by the CA in {ca_path} (subject {_subject(ca)}): "
            f"{str(exc) or 'its signature does not verify with the CA key'}. "
            "Sites and coordinator must use certificates from the same 'dpfl-server certs' "
            "run") from exc


def check_hostname(cert: x509.Certificate, host: str, where: str) -> None:
    """:class:`ConfigError` unless ``cert`` names ``host`` (an IP or DNS name) in its SANs."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    ips = sans.get_values_for_type(x509.IPAddress)
    names = [n.lower() for n in sans.get_values_for_type(x509.DNSName)]
    try:
        ok = ipaddress.ip_address(host.strip("[]")) in ips
    except ValueError:
        h = host.lower()
        ok = h in names or any(n.startswith("*.") and "." in h and h.split(".", 1)[1] == n[2:]
                               for n in names)
    if not ok:
        raise ConfigError(f"{where} (subject {_subject(cert)}) is not valid for {host!r}: it "
                          f"names {[str(i) for i in ips] + names}. Dial one of those, or "
                          "re-issue it with --host for every address the sites dial")


def check_server_files(ca_path: Path, cert_path: Path, key_path: Path,
                       now: dt.datetime | None = None) -> None:
    """The coordinator's TLS files: CA and server certificates valid, issued by the CA, and
    ``key_path`` the server certificate's private key."""
    ca = check_ca_certificate(ca_path, now)
    cert = load_certificate(cert_path, "server certificate")
    check_dates(cert, f"server certificate {cert_path}", now)
    check_issued_by(cert, f"server certificate {cert_path}", ca, ca_path)
    data = _read(key_path, "server key", "it is written beside server.crt")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"server key {key_path} is not an unencrypted PEM private key "
                          f"({exc})") from exc
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise ConfigError(f"server key {key_path} does not belong to server certificate "
                          f"{cert_path} (subject {_subject(cert)}); use the pair written "
                          "together by 'dpfl-server certs'")


def check_node_private_key(path: str | Path) -> None:
    """A site's node-authentication key: an OpenSSH EC private key (what Flower reads)."""
    data = _read(path, "node key", "the coordinator's 'dpfl-server certs' writes "
                 "sites/<id>/node.key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"node key {path} is not an unencrypted OpenSSH private key "
                          f"({exc}); give this site's sites/<id>/node.key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"node key {path} is a {type(key).__name__}; Flower node "
                          "authentication needs an ECDSA key (sites/<id>/node.key)")


def check_node_public_key(path: str | Path, site: str) -> None:
    """A site's public key as the coordinator lists it: OpenSSH ECDSA on a NIST curve."""
    data = _read(path, f"public key of site {site}", "pass the site's node.pub")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"public key of site {site}, {path}, is not an OpenSSH public key "
                          f"({exc}); pass the site's node.pub") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"public key of site {site}, {path}, is a {type(key).__name__}; "
                          "Flower node authentication needs an ECDSA key")


def fetch_certificate(host: str, port: int, timeout: float = 5.0) -> x509.Certificate | None:
    """The certificate a TLS server presents at host:port (unverified), or None when nothing
    answers there."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        log.info("no TLS answer from %s:%d yet (%s)", host, port, exc)
        return None
    return x509.load_der_x509_certificate(der) if der else None


def check_superlink(address: str, ca_path: str | Path, timeout: float = 5.0,
                    now: dt.datetime | None = None) -> bool:
    """Check the certificate the coordinator presents at ``address`` (host:port) against the
    CA in ``ca_path``. Returns False when nothing answers (the coordinator may start later);
    raises :class:`ConfigError` when the certificate is expired, not signed by the CA or not
    issued for ``host``."""
    host, _, port = address.rpartition(":")
    ca = check_ca_certificate(ca_path, now)
    cert = fetch_certificate(host.strip("[]"), int(port), timeout)
    if cert is None:
        return False
    where = f"the certificate presented by {address}"
    check_dates(cert, where, now)
    check_issued_by(cert, where, ca, ca_path)
    check_hostname(cert, host, where)
    return True
