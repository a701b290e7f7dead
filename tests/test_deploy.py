"""Deployment mode with real processes on 127.0.0.1: `dpfl-server certs/serve/run` and
`dpfl-client join` - a SuperLink with TLS and node authentication, three listed sites
training two DP rounds, and an unlisted site that is refused. Every process is stopped and
none may be left."""

import json
import socket
import ssl
import subprocess

import pytest

from dpfl.shared.ldm.models import build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant

from .deploy_harness import ROOT, Harness, cli, env, free_port, wait_for
from .test_federation import _silo

SITES = ("site-0", "site-1", "site-2")


def _tls_checks(port: int, ca) -> dict:
    """Handshake with the federation CA succeeds; with the system CAs it must fail."""
    result = {}
    for name, ctx in (("federation-ca", ssl.create_default_context(cafile=str(ca))),
                      ("system-ca", ssl.create_default_context())):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                result[name] = "ok"
        except ssl.SSLCertVerificationError as exc:
            result[name] = f"refused: {exc.verify_message}"
    return result


def _join(h: Harness, name: str, port: int, pki, key, base, silo, state) -> None:
    h.start(name, cli("client", "join", "--superlink", f"127.0.0.1:{port}",
                      "--ca-cert", str(pki / "ca.crt"), "--node-key", str(key),
                      "--site-id", name, "--data", str(silo), "--base-model", str(base),
                      "--state-dir", str(state), "--epsilon-budget", "8", "--delta", "1e-3",
                      "--device", "cpu", "--runtime-port", str(free_port()),
                      "--max-wait-time", "120"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    base = save_ldm(build_ldm("tiny", seed=0), tmp / "base")
    pki, rogue_pki = tmp / "pki", tmp / "rogue-pki"
    for out, sites in ((pki, SITES), (rogue_pki, ("rogue",))):
        subprocess.run(cli("server", "certs", "--out", str(out), "--host", "127.0.0.1",
                           "--host", "localhost", *[a for s in sites for a in ("--site", s)]),
                       cwd=ROOT, env=env(), check=True, capture_output=True, timeout=120)
    port = free_port()
    h = Harness(tmp)
    try:
        h.start("coordinator", cli("server", "serve", "--pki", str(pki), "--state-dir",
                                   str(tmp / "coord"), "--port", str(port)))
        wait_for(lambda: "SuperLink ready" in h.output("coordinator")
                 or h.procs["coordinator"].poll() is not None, 180, "SuperLink")
        assert "SuperLink ready" in h.output("coordinator"), h.output("coordinator")[-3000:]
        tls = _tls_checks(port, pki / "ca.crt")
        for i, site in enumerate(SITES):
            _silo(tmp / f"silo{i}.npz", i, [(0, 1, 2), (3, 4, 5), (6, 7, 8)][i])
            _join(h, site, port, pki, pki / "sites" / site / "node.key", base,
                  tmp / f"silo{i}.npz", tmp / f"state{i}")
        _join(h, "rogue", port, pki, rogue_pki / "sites" / "rogue" / "node.key", base,
              tmp / "silo0.npz", tmp / "state-rogue")
        sets = {"base-model": base, "run-dir": tmp / "run", "num-rounds": 2, "batch-size": 16,
                "noise-multiplicity": 2, "target-epsilon": 4.0, "min-available-nodes": 3,
                "sample-steps": 2, "lr": 5e-3, "round-timeout": 600}
        run = subprocess.run(
            cli("server", "run", "--pki", str(pki), "--state-dir", str(tmp / "coord"),
                "--superlink", f"127.0.0.1:{port}", "--timeout", "900",
                *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]),
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1000)
        rogue_rc = h.procs["rogue"].poll()
    finally:
        left = h.stop_all()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + \
        (tmp / "coord" / "superlink.log").read_text()[-3000:]
    return dict(tmp=tmp, h=h, run=run, tls=tls, rogue_rc=rogue_rc, left=left)


def test_listed_sites_train_two_rounds_over_tls(deployment):
    tmp = deployment["tmp"]
    assert "finished:completed" in deployment["run"].stdout
    assert deployment["tls"]["federation-ca"] == "ok"
    assert deployment["tls"]["system-ca"].startswith("refused")
    led = json.loads((tmp / "run" / "ledger.json").read_text())
    r1, r2 = led["rounds"]
    assert set(r1["sites"]) == set(r2["sites"]) == set(SITES)
    for i, site in enumerate(SITES):
        assert r2["sites"][site]["epsilon"] > r1["sites"][site]["epsilon"] > 0
        own = PersistentAccountant.load(tmp / f"state{i}" / "accountant.json")
        assert led["sites"][site]["epsilon"] == pytest.approx(own.epsilon(), rel=1e-9)
        assert led["sites"][site]["epsilon"] <= 4.0 + 1e-6
    assert r2["global_epsilon"] == max(v["epsilon"] for v in r2["sites"].values())
    assert (tmp / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_unlisted_site_is_refused(deployment):
    tmp, h = deployment["tmp"], deployment["h"]
    assert deployment["rogue_rc"] not in (None, 0)  # it gave up on its own
    assert "Failed to activate SuperNode" in h.output("rogue")
    assert "No SuperNode found with the given public key" in \
        (tmp / "coord" / "superlink.log").read_text()
    assert not (tmp / "state-rogue" / "accountant.json").exists()  # never trained


def test_every_process_is_stopped(deployment):
    assert deployment["left"] == []
    for name, proc in deployment["h"].procs.items():
        assert proc.poll() is not None, name
