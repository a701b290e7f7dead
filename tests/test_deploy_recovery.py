"""Deployment failures with real processes on 127.0.0.1: a site SIGKILLed mid-round (the
round completes with the others after ``round-timeout``), then the whole coordinator
SIGKILLed after round 1 and restarted: the resubmitted run resumes at round 2 with the
ledger of round 1 intact. Every process is stopped and none may be left."""

import json
import subprocess

import pytest

from dpfl.shared.ldm.models import build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant

from .deploy_harness import (
    ROOT,
    Harness,
    checkpoint_round,
    cli,
    env,
    free_port,
    serve_cmd,
    wait_for,
)
from .test_deploy import SITES, _join
from .test_federation import _silo


def _submit(pki, coord, port, base, run_dir):
    sets = {"base-model": base, "run-dir": run_dir, "num-rounds": 2, "batch-size": 16,
            "noise-multiplicity": 2, "target-epsilon": 4.0, "min-available-nodes": 2,
            "sample-steps": 2, "lr": 5e-3, "round-timeout": 150}
    return cli("server", "run", "--pki", str(pki), "--state-dir", str(coord), "--timeout", "900",
               *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])


@pytest.fixture(scope="module")
def recovery(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recovery")
    base = save_ldm(build_ldm("tiny", seed=0), tmp / "base")
    pki, coord, run_dir = tmp / "pki", tmp / "coord", tmp / "run"
    subprocess.run(cli("server", "certs", "--out", str(pki), "--host", "127.0.0.1",
                       *[a for s in SITES for a in ("--site", s)]),
                   cwd=ROOT, env=env(), check=True, capture_output=True, timeout=120)
    port = free_port()
    serve = serve_cmd(pki, coord, port, tmp)
    h = Harness(tmp)
    out = {"tmp": tmp, "h": h}
    try:
        h.start("coordinator", serve)
        wait_for(lambda: "SuperLink ready" in h.output("coordinator"), 180, "SuperLink")
        for i, site in enumerate(SITES):
            _silo(tmp / f"silo{i}.npz", i, [(0, 1, 2), (3, 4, 5), (6, 7, 8)][i])
            _join(h, site, port, pki, pki / "sites" / site / "node.key", base,
                  tmp / f"silo{i}.npz", tmp / f"state{i}")
        wait_for(lambda: (coord / "superlink.log").read_text().count("Activated node_id") >= 3,
                 180, "three sites connected")
        h.start("run1", _submit(pki, coord, port, base, run_dir))
        # site-2 dies as soon as it has started training in round 1
        wait_for(lambda: any((tmp / "state2").glob("latents-*")), 300, "site-2 training")
        h.kill("site-2")
        wait_for(lambda: checkpoint_round(run_dir) >= 1, 400, "round 1 checkpoint")
        out["ledger_r1"] = json.loads((run_dir / "ledger.json").read_text())
        h.kill("coordinator")  # crash the coordinator: SIGKILL; run1's follower lives on
        for line in h.leftovers():  # the coordinator's detached children, not the sites'
            if ("flower-superlink" in line or "serverapp" in line
                    or ("superexec" in line and f":{port} " in line + " ")):
                subprocess.run(["kill", "-9", line.split(":")[0]], check=False)
        out["round_at_crash"] = checkpoint_round(run_dir)
        # the coordinator stays down until the follower has seen it gone (a quick restart
        # between two of its polls would go unnoticed, and this test is about re-attaching)
        wait_for(lambda: "waiting to re-attach" in h.output("run1"), 120,
                 "the follower to notice the coordinator is down")
        h.start("coordinator2", serve)
        wait_for(lambda: "SuperLink ready" in h.output("coordinator2"), 180, "restart")
        # the follower re-attaches, resubmits the stopped run and follows it to the end
        wait_for(lambda: h.procs["run1"].poll() is not None, 1000, "run1's follower")
        out["run1"] = (h.procs["run1"].returncode, h.output("run1"))
    finally:
        out["left"] = h.stop_all()
    return out


def test_killed_site_round_completes_with_the_others(recovery):
    r1 = recovery["ledger_r1"]["rounds"][0]
    assert {"site-0", "site-1"} <= set(r1["sites"])
    if "site-2" not in r1["sites"]:  # killed before it could reply: no reply, or the
        # SuperLink's error reply for the dead node; either way one rejection on record
        assert len(r1["rejected"]) == 1, r1
        (reason,) = r1["rejected"].values()
        assert "no reply" in reason or "client error" in reason, r1


def test_restarted_coordinator_resumes_at_round_two(recovery):
    code, output = recovery["run1"]
    assert code == 0, output[-3000:]
    assert recovery["round_at_crash"] == 1
    tmp = recovery["tmp"]
    led = json.loads((tmp / "run" / "ledger.json").read_text())
    assert [r["round"] for r in led["rounds"]] == [1, 2]
    assert led["rounds"][0] == recovery["ledger_r1"]["rounds"][0]  # round 1 untouched
    r2 = led["rounds"][1]
    assert {"site-0", "site-1"} == set(r2["sites"])  # the dead site is not waited for again
    for i in (0, 1):
        site = f"site-{i}"
        own = PersistentAccountant.load(tmp / f"state{i}" / "accountant.json")
        assert led["sites"][site]["epsilon"] == pytest.approx(own.epsilon(), rel=1e-9)
        assert r2["sites"][site]["epsilon"] > led["rounds"][0]["sites"][site]["epsilon"]
    assert checkpoint_round(tmp / "run") == 2


def test_the_follower_reattached_and_showed_every_round(recovery):
    code, output = recovery["run1"]
    lines = output.splitlines()
    assert any("waiting to re-attach" in line for line in lines), output[-3000:]
    assert any("across a coordinator restart; resubmitted as run" in line
               for line in lines), output[-3000:]
    rounds = [line.split(":")[0] for line in lines if line.startswith("round ")]
    assert rounds[0] == "round 1" and rounds[-1] == "round 2", rounds
    assert any(line.startswith("run ") and line.endswith(": finished:completed")
               for line in lines), output[-3000:]


def test_every_process_is_stopped(recovery):
    assert recovery["left"] == []
