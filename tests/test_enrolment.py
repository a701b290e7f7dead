"""Enrolment across coordinator restarts, with real processes: a site whose key is rotated is
re-registered and its old node unregistered; a site no longer listed is unregistered; what
``serve`` recorded (``coordinator.json``) follows. Stale keys must not stay valid. The first
``serve`` is started as the deployment guide writes it: relative ``--pki`` and
``--state-dir`` from the operator's own directory."""

from __future__ import annotations

import json
import subprocess

import pytest

from dpfl.server.pki import make_pki

from .deploy_harness import ROOT, Harness, cli, env, free_port, serve_cmd, wait_for
from .test_deploy import _flwr_json


def _serve(h: Harness, name: str, cmd: list[str], cwd=ROOT) -> None:
    h.start(name, cmd, cwd=cwd)
    wait_for(lambda: "SuperLink ready" in h.output(name) or h.procs[name].poll() is not None,
             180, "SuperLink")
    assert "SuperLink ready" in h.output(name), h.output(name)[-3000:]


def _enrolled(tmp, coord) -> dict[str, int]:
    res = subprocess.run(cli("server", "status", "--pki", str(tmp / "pki"), "--state-dir",
                             str(coord), "--json"),
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return {s["site"]: s["node-id"] for s in json.loads(res.stdout)["sites"]}


@pytest.fixture(scope="module")
def restarts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enrolment")
    pki, coord = tmp / "pki", tmp / "coord"
    make_pki(pki, ["site-0", "site-1"])
    rotated = make_pki(tmp / "new-keys", ["site-0"]).node_pub("site-0")  # a new key pair
    port = free_port()
    h = Harness(tmp)
    out = {}
    try:
        relative = cli("server", "serve", "--pki", "pki", "--state-dir", "coord", "--port",
                       str(port), "--api-port", str(free_port()), "--model-root", ".",
                       "--runs-root", ".")
        _serve(h, "first", relative, cwd=tmp)
        out["first"] = _enrolled(tmp, coord)
        h.stop("first")
        _serve(h, "second", serve_cmd(pki, coord, port, tmp, "--site-key",
                                      f"site-0={rotated}"))
        out["second"] = _enrolled(tmp, coord)
        nodes = _flwr_json(coord / "flwr-home", "supernode", "ls", "dpfl", "-v")["nodes"]
        out["nodes"] = {int(n["node-id"]): n["status"] for n in nodes}
        out["log"] = h.output("second")
    finally:
        out["left"] = h.stop_all()
    return out


def test_a_rotated_key_replaces_the_old_node(restarts):
    first, second = restarts["first"], restarts["second"]
    assert set(first) == {"site-0", "site-1"}
    assert set(second) == {"site-0"} and second["site-0"] != first["site-0"]
    assert restarts["nodes"][first["site-0"]] == "unregistered"
    assert restarts["nodes"][second["site-0"]] == "registered"
    assert "unregistered site-0's previous key" in restarts["log"]


def test_a_site_no_longer_listed_is_unregistered(restarts):
    assert restarts["nodes"][restarts["first"]["site-1"]] == "unregistered"
    assert "unregistered site-1" in restarts["log"]
    assert restarts["left"] == []
