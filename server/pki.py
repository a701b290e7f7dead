"""Certificates and keys of a deployment: a CA, the coordinator's TLS certificate and one
node-authentication key pair per site.

Two independent mechanisms protect a deployment (Flower "Enable TLS connections" and
"Authenticate SuperNodes"):

* **TLS** - the coordinator's SuperLink presents ``server.crt`` (signed by ``ca.crt``, with
  subject alternative names for every address the sites dial); each site is given ``ca.crt``
  and refuses any other server.
* **Node authentication** - each site holds an ECDSA P-384 private key (OpenSSH format, as
  ``flower-supernode --auth-supernode-private-key`` expects); the coordinator registers only
  the listed sites' public keys (``flwr supernode register``), and the SuperLink, started with
  ``--enable-supernode-auth``, refuses every other node.

Layout written under ``out``::

    ca.crt  ca.key  server.crt  server.key
    sites/<site-id>/node.key  sites/<site-id>/node.pub

Private keys are written with mode 0600. ``ca.key`` should then be moved offline; sites
receive only ``ca.crt`` and their own ``node.key``; the coordinator keeps ``node.pub``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dpfl.shared.errors import ConfigError

log = logging.getLogger(__name__)

_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class PkiLayout:
    """Where the files of one deployment's PKI live (see the module docstring). The root is
    made absolute at once: the flwr CLI that registers keys runs in another directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, site_id: str) -> Path:
        return self.root / "sites" / check_site_id(site_id) / "node.key"

    def node_pub(self, site_id: str) -> Path:
        return self.root / "sites" / check_site_id(site_id) / "node.pub"


def check_site_id(site_id: str) -> str:
    if not _SITE_ID.match(site_id):
        raise ConfigError(f"site id {site_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
                          "and start with a letter or digit")
    return site_id


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int
             ) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dpfl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    """digitalSignature (a TLS ECDHE handshake), plus keyCertSign and cRLSign for the CA."""
    return x509.KeyUsage(digital_signature=True, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False)


def make_ca(layout: PkiLayout, days: int = 3650) -> None:
    """A self-signed CA (ECDSA P-384) that signs the coordinator's certificate, with the
    extensions RFC 5280 and the CA/Browser Forum profile expect of a root: basicConstraints
    and keyUsage (critical), subject and authority key identifiers."""
    key = ec.generate_private_key(ec.SECP384R1())
    # a subject of its own: a site given another federation's CA is told which one it holds
    name = _name(f"dpfl federation CA {secrets.token_hex(4)}")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (_builder(name, name, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA384()))
    _write_private(layout.ca_key, _pem_key(key))
    layout.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


LOOPBACK_NAMES = ("127.0.0.1", "localhost")  # the Fleet proxy and the coordinator's CLI dial these


def server_names(cert_path: Path) -> set[str]:
    """The DNS names and IP addresses a certificate's subject alternative names hold."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({str(n) for n in sans.get_values_for_type(x509.DNSName)}
            | {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)})


def default_hosts() -> list[str]:
    """Loopback names and this machine's hostname: what the sites may dial."""
    return sorted({"127.0.0.1", "localhost", "::1", socket.gethostname()})


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The CA's subject key identifier, or one derived from its key (a CA written by an older
    dpfl has none)."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def make_server_cert(layout: PkiLayout, hosts: list[str], days: int = 825) -> None:
    """The SuperLink's TLS certificate, valid for every name/IP in ``hosts`` (subject
    alternative names), for server authentication only, with key identifiers that chain it
    to the CA."""
    if not layout.ca_key.exists():
        raise ConfigError(f"no CA key at {layout.ca_key}; create the CA first")
    ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    sans: list[x509.GeneralName] = []
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))  # the coordinator's own loopback
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(hosts[0] if hosts else "superlink"), ca_cert.subject,
                     key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(_authority_key_id(ca_cert), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(layout.server_key, _pem_key(key))
    layout.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_site_key(layout: PkiLayout, site_id: str) -> Path:
    """An ECDSA P-384 node-authentication key pair (OpenSSH format); returns the public key."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(layout.node_key(site_id), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    pub = layout.node_pub(site_id)
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return pub


def make_pki(out: str | Path, sites: list[str], hosts: list[str] | None = None,
             overwrite: bool = False) -> PkiLayout:
    """CA + server certificate (unless present) and a key pair for each new site."""
    layout = PkiLayout(Path(out))
    layout.root.mkdir(parents=True, exist_ok=True)
    for site in sites:
        check_site_id(site)
    if overwrite or not layout.ca_cert.exists():
        make_ca(layout)
        make_server_cert(layout, hosts or default_hosts())
        log.info("wrote CA and server certificate for %s to %s", hosts or default_hosts(),
                 layout.root)
    elif hosts:
        make_server_cert(layout, hosts)
    for site in sites:
        if overwrite or not layout.node_key(site).exists():
            make_site_key(layout, site)
            log.info("wrote node key pair of %s", site)
    return layout
