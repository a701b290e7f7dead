"""The PKI dpfl writes: one CA subject per federation (a site given the wrong CA is told
which one it holds), and deploy/make-certs.sh never silently re-issues."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509

from dpfl.server.pki import PkiLayout, make_pki

from .deploy_harness import ROOT, env


def _subject(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).subject.rfc4514_string()


def test_every_federation_gets_a_ca_subject_of_its_own(tmp_path):
    a, b = make_pki(tmp_path / "a", []), make_pki(tmp_path / "b", [])
    assert _subject(a.ca_cert) != _subject(b.ca_cert)
    assert "dpfl federation CA" in _subject(a.ca_cert)


def test_a_relative_pki_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert PkiLayout(Path("deploy/pki")).ca_cert == tmp_path / "deploy" / "pki" / "ca.crt"


def test_make_certs_refuses_an_existing_pki_unless_forced(tmp_path):
    script = ROOT / "deploy" / "make-certs.sh"
    path = {**env(), "PATH": f"{Path(ROOT / '.venv' / 'bin')}:{env()['PATH']}"}
    out = tmp_path / "pki"

    def run(*args):
        return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=path,
                              capture_output=True, text=True, timeout=120)

    assert run(str(out), "127.0.0.1", "site-a").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = run(str(out), "coord.example.org", "site-b")
    assert again.returncode == 2 and "already holds a CA" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (out / "sites" / "site-b").exists()
    forced = run("--force", str(out), "coord.example.org", "site-b")
    assert forced.returncode == 0, forced.stderr
    assert (out / "ca.crt").read_bytes() == before["ca.crt"]  # the CA is kept
    assert (out / "server.crt").read_bytes() != before["server.crt"]  # re-issued
    assert (out / "sites" / "site-b" / "node.pub").exists()
