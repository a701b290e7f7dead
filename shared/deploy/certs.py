"""Up-front checks of a deployment's TLS files and node keys, before any Flower process starts.

Once running, Flower's SuperNode reports a wrong certificate only as a failed handshake in a
retry loop, and the SuperLink a bad key file as an exit code. These checks say which file is
wrong and why (its subject, its dates, its issuer) instead:

* a site (``dpfl-client join``) checks the federation CA certificate and its own node key, and,
  when the coordinator answers, the certificate the coordinator presents: signed by that CA,
  within its dates, issued for the address the site dials;
* the coordinator (``dpfl-server serve``) checks its CA and server certificates (dates, issuer),
  that ``server.key`` belongs to ``server.crt``, and every site public key it is to list.

Chain, signature, extension profile (RFC 5280 / CA/Browser Forum: basicConstraints, keyUsage,
key identifiers, serverAuth) and host name (subject alternative names, RFC 6125 wildcards) are
verified by ``cryptography.x509.verification``; this module only chooses what to verify and
turns the library's verdict into a message naming the file, the subject and the host. Dates
are compared here first (with the clock of the machine running the check), so that an expired
certificate is reported with its dates rather than as "not valid at validation time".
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from cryptography.x509.verification import (
    PolicyBuilder,
    ServerVerifier,
    Store,
    Subject,
    VerificationError,
)

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
    """The federation CA certificate: readable, a CA (basicConstraints CA:TRUE, which the
    verifier requires of every issuer), within its dates."""
    ca = load_certificate(path, "CA certificate")
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"CA certificate {path} is not a CA certificate (subject "
                          f"{_subject(ca)}, issued by {ca.issuer.rfc4514_string()}; no "
                          "basicConstraints CA:TRUE); give the federation's ca.crt, not a "
                          "server certificate")
    check_dates(ca, f"CA certificate {path}", now)
    return ca


def _names(cert: x509.Certificate) -> list[str]:
    """The IP addresses and DNS names the certificate's subject alternative names list."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] + \
        sans.get_values_for_type(x509.DNSName)


def _server_verifier(ca: x509.Certificate, host: str, where: str,
                     now: dt.datetime) -> ServerVerifier:
    """The library's verifier of server certificates for ``host`` (an IP address, bracketed
    or not, or a DNS name), trusting only ``ca``, at time ``now``."""
    subject: Subject
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        subject = x509.DNSName(host)
    try:
        return PolicyBuilder().store(Store([ca])).time(now).build_server_verifier(subject)
    except ValueError as exc:
        raise ConfigError(f"cannot check {where} for {host!r}: not an IP address or DNS "
                          f"name ({exc})") from exc


_EXTENSIONS = {oid.dotted_string: name.lower().replace("_", " ")
               for name, oid in vars(ExtensionOID).items()
               if isinstance(oid, x509.ObjectIdentifier)}


def _reason(exc: VerificationError) -> str:
    """The library's reason, without its prefix and certificate repr, extensions by name."""
    text = re.sub(r"^validation failed: ", "", str(exc))
    text = re.sub(r" \(encountered processing <Certificate.*\)$", "", text)
    return re.sub(r"\b\d+(?:\.\d+){3,}\b",
                  lambda m: _EXTENSIONS.get(m.group(), m.group()), text)


def _explain(exc: VerificationError, cert: x509.Certificate, where: str, host: str,
             ca: x509.Certificate, ca_path: str | Path) -> ConfigError:
    """A :class:`ConfigError` naming the file, subject, host and CA of a failed verification."""
    reason = _reason(exc)
    against = f"the CA in {ca_path} (subject {_subject(ca)})"
    if "no matching subjectAltName" in reason:
        return ConfigError(f"{where} (subject {_subject(cert)}) is not valid for {host!r}: it "
                           f"names {_names(cert)}. Dial one of those, or re-issue it with "
                           "--host for every address the sites dial")
    head = f"{where} (subject {_subject(cert)}, issuer {cert.issuer.rfc4514_string()})"
    if "signature does not match" in reason or "no interior errors" in reason:
        return ConfigError(f"{head} is not signed by {against}: {reason}. Sites and "
                           "coordinator must use certificates from the same 'dpfl-server "
                           "certs' run")
    if "extension" not in reason and "EKU" not in reason:
        return ConfigError(f"{head} does not verify against {against}: {reason}")
    if reason.startswith("candidates exhausted"):  # the CA, as issuer, was refused
        fix = "re-create the CA ('dpfl-server certs --overwrite') and give every site its ca.crt"
    else:
        fix = "re-issue it with 'dpfl-server certs --out PKI --host NAME...' (keeps the CA)"
        if "authority key identifier" in reason:
            fix += "; server certificates from older dpfl checkouts lack this extension"
        elif "EKU" in reason:
            fix = f"a TLS server certificate needs extendedKeyUsage serverAuth: {fix}"
    return ConfigError(f"{head} does not form a standard certificate chain with {against}: "
                       f"{reason}; {fix}")


def check_server_certificate(cert: x509.Certificate, where: str, host: str,
                             ca: x509.Certificate, ca_path: str | Path,
                             now: dt.datetime | None = None) -> None:
    """:class:`ConfigError` unless ``cert`` is a TLS server certificate for ``host`` that
    chains to ``ca``: its dates, then ``cryptography``'s path validation (signature, profile,
    serverAuth, ``host`` among its subject alternative names)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    check_dates(cert, where, now)
    verifier = _server_verifier(ca, host, where, now)
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        raise _explain(exc, cert, where, host, ca, ca_path) from exc


def _check_key_pair(cert: x509.Certificate, cert_path: Path, key_path: Path) -> None:
    """:class:`ConfigError` unless ``key_path`` holds the private key of ``cert``."""
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


def check_server_files(ca_path: Path, cert_path: Path, key_path: Path,
                       now: dt.datetime | None = None) -> None:
    """The coordinator's TLS files: CA and server certificates valid, the server certificate
    one that sites dialling its first listed name accept, and ``key_path`` its private key.

    The host name check proper happens on each site, which knows the address it dials."""
    ca = check_ca_certificate(ca_path, now)
    cert = load_certificate(cert_path, "server certificate")
    where = f"server certificate {cert_path}"
    check_dates(cert, where, now)
    names = _names(cert)
    if not names:
        raise ConfigError(f"{where} (subject {_subject(cert)}) names no address (no subject "
                          "alternative name), so no site can verify it; re-issue it with "
                          "'dpfl-server certs --host NAME...'")
    # a wildcard entry is checked with a name it covers
    check_server_certificate(cert, where, names[0].replace("*", "superlink", 1), ca, ca_path,
                             now)
    _check_key_pair(cert, cert_path, key_path)


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
    check_server_certificate(cert, f"the certificate presented by {address}", host, ca,
                             ca_path, now)
    return True
