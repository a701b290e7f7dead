"""Fault injection with real processes on 127.0.0.1: a seeded schedule of kill -9 points
(``DPFL_FAULT_POINTS``, default 20; seed ``DPFL_FAULT_SEED``) hits the coordinator (the
SuperLink with its detached SuperExec/ServerApp children and the waiting ``dpfl-server run``)
or one of three sites (its SuperNode and ClientApps) across a multi-round run. What was
killed is restarted as a service manager would: a site with the same state directory and
key (retried until the SuperLink lets its node in again), the coordinator with the same
state directory, then the run is resubmitted with the same run directory.

Each point is a trigger and a seeded delay after it: ``time`` (after the previous point),
``train`` (a site's accountant file changed: a site committed steps and is training) or
``round`` (the global checkpoint advanced). A coordinator kill first waits until a round
completed since the previous one (at most ``PROGRESS_WAIT``): on a slow machine a round can
outlast the gap between kills, and the run would never advance. After every kill, and every
few seconds in between, the state on disk must satisfy:

* the checkpoint round never decreases, and the ledger is never behind it;
* every ledger is a prefix of the next (rounds are appended, never rewritten), with round
  numbers 1, 2, ... (a round recorded twice is a rerun after a crash: both spends count);
* for every site, the ledger's ε is at most the site's own accountant ε (which commits
  steps before training, so it may be ahead);
* every report in the ledger is the site's accountant *at the time the update was
  produced*: ``steps`` is at most the accountant's steps and ``epsilon`` is exactly Opacus'
  ε of the first ``steps`` steps of the accountant history; a trained report matches a
  line of the site's ``rounds.jsonl`` (written after the commit and the training, before
  the reply), so the ε in the ledger covers every step behind the update it aggregated.

At the end the run completes all planned rounds and no process is left.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from dpfl.shared.io import read_jsonl
from dpfl.shared.ldm.models import build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant, epsilon_of

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
from .test_federation import _silo

POINTS = int(os.environ.get("DPFL_FAULT_POINTS", "20"))
SEED = int(os.environ.get("DPFL_FAULT_SEED", "0"))
ROUNDS = int(os.environ.get("DPFL_FAULT_ROUNDS", "6"))
DEADLINE = float(os.environ.get("DPFL_FAULT_DEADLINE", "2400"))
SITES = ("site-0", "site-1", "site-2")
RESTART_BACKOFF = 10.0  # seconds between a site's exit and its restart (systemd RestartSec)
TRIGGER_WAIT = 60.0  # a train/round trigger not seen by then fires anyway
PROGRESS_WAIT = 300.0  # the most a coordinator kill waits for a round to complete first


def schedule(rng: random.Random, points: int) -> list[dict]:
    """``points`` kill points, about half of them at the coordinator."""
    targets = ["coordinator"] * (points // 2) + \
        [rng.choice(SITES) for _ in range(points - points // 2)]
    rng.shuffle(targets)
    plan = []
    for target in targets:
        trigger = rng.choices(["time", "train", "round"], weights=[4, 4, 2])[0]
        delay = {"time": rng.uniform(2.0, 20.0), "train": rng.uniform(0.0, 4.0),
                 "round": rng.uniform(0.0, 3.0)}[trigger]
        plan.append({"target": target, "trigger": trigger, "delay": round(delay, 2)})
    return plan


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _prefix(history: list[tuple[float, float, int]], steps: int):
    """The first ``steps`` steps of an accountant history."""
    out, left = [], steps
    for sigma, q, n in history:
        if left <= 0:
            break
        out.append((sigma, q, min(n, left)))
        left -= min(n, left)
    return out


class Invariants:
    """What must hold on disk after any crash (see the module docstring)."""

    def __init__(self, run_dir: Path, states: dict[str, Path]):
        self.run_dir, self.states = run_dir, states
        self.round, self.rounds = 0, []
        self.checks = 0

    def check(self, when: str) -> None:
        ckpt = checkpoint_round(self.run_dir)  # before the ledger: the ledger leads
        led = _json(self.run_dir / "ledger.json") or {"rounds": [], "sites": {}, "flags": []}
        accs, logs = {}, {}
        for site, state in self.states.items():  # after the ledger: accountants only grow
            if (state / "accountant.json").exists():
                accs[site] = PersistentAccountant.load(state / "accountant.json")
            logs[site] = read_jsonl(state / "rounds.jsonl") \
                if (state / "rounds.jsonl").exists() else []
        ctx = f"{when}: checkpoint {ckpt}, ledger rounds {[r['round'] for r in led['rounds']]}"
        assert ckpt >= self.round, f"{ctx}: checkpoint went back from {self.round}"
        rounds = led["rounds"]
        assert rounds[:len(self.rounds)] == self.rounds, f"{ctx}: the ledger was rewritten"
        nums = [r["round"] for r in rounds]
        assert all(b in (a, a + 1) for a, b in zip([0] + nums, nums)), ctx
        assert (nums[-1] if nums else 0) >= ckpt, f"{ctx}: ledger behind the checkpoint"
        assert not led.get("flags"), f"{ctx}: {led['flags']}"
        for site, rec in led["sites"].items():
            acc = accs[site]
            assert rec["epsilon"] <= acc.epsilon() * (1 + 1e-9), \
                f"{ctx}: {site} ledger eps {rec['epsilon']} > accountant {acc.epsilon()}"
        for entry in rounds:
            for site, rep in entry["sites"].items():
                acc = accs[site]
                assert rep["steps"] <= acc.steps, (ctx, site, rep, acc.steps)
                at_reply = epsilon_of(_prefix(acc.history, rep["steps"]), acc.delta, acc.kind)
                assert rep["epsilon"] == pytest.approx(at_reply, rel=1e-9), \
                    f"{ctx}: round {entry['round']} {site} reported {rep} but its accountant " \
                    f"had eps {at_reply} after {rep['steps']} steps"
                if rep["trained"]:
                    assert any(line["epsilon"] == pytest.approx(rep["epsilon"], rel=1e-9)
                               for line in logs[site]), (ctx, site, rep, logs[site])
        for site, acc in accs.items():  # commit before training: the accountant leads
            assert sum(line["steps"] for line in logs[site]) <= acc.steps, (ctx, site)
        self.round, self.rounds = ckpt, rounds
        self.checks += 1


class Deployment:
    """Coordinator and sites under fire; every incarnation gets its own process name."""

    def __init__(self, tmp: Path, h: Harness):
        self.tmp, self.h = tmp, h
        self.base = save_ldm(build_ldm("tiny", seed=0), tmp / "base")
        self.pki, self.coord, self.run_dir = tmp / "pki", tmp / "coord", tmp / "run"
        self.port = free_port()
        self.states = {s: tmp / f"state{i}" for i, s in enumerate(SITES)}
        self.incarnation: dict[str, int] = {}
        self.current: dict[str, str] = {}  # target -> its live process name(s), by role
        self.site_exit: dict[str, float] = {}
        self.events: list[str] = []  # unexpected exits, for the report
        self.rounds = ROUNDS  # raised when the run finishes before every point is spent
        self.round_at_coordinator_kill = -1  # the checkpoint round at its last kill
        subprocess.run(cli("server", "certs", "--out", str(self.pki), "--host", "127.0.0.1",
                           *[a for s in SITES for a in ("--site", s)]),
                       cwd=ROOT, env=env(), check=True, capture_output=True, timeout=120)
        for i, _ in enumerate(SITES):
            _silo(tmp / f"silo{i}.npz", i, [(0, 1, 2), (3, 4, 5), (6, 7, 8)][i])

    def _name(self, target: str) -> str:
        self.incarnation[target] = self.incarnation.get(target, 0) + 1
        return f"{target}-{self.incarnation[target]}"

    # -- coordinator -------------------------------------------------------------------
    def start_coordinator(self) -> None:
        name = self._name("coordinator")
        self.h.start(name, serve_cmd(self.pki, self.coord, self.port, self.tmp))
        self.current["coordinator"] = name
        wait_for(lambda: "SuperLink ready" in self.h.output(name)
                 or self.h.procs[name].poll() is not None, 180, "SuperLink")
        assert "SuperLink ready" in self.h.output(name), self.h.output(name)[-3000:]
        self.submit()

    def submit(self) -> None:
        sets = {"base-model": self.base, "run-dir": self.run_dir, "num-rounds": self.rounds,
                "batch-size": 16, "noise-multiplicity": 1, "target-epsilon": 4.0,
                "min-available-nodes": 2, "sample-every": 0, "sample-steps": 2, "lr": 5e-3,
                "round-timeout": 120}  # a slow machine: sites may take over a minute
        name = self._name("run")
        self.h.start(name, cli("server", "run", "--pki", str(self.pki), "--state-dir",
                               str(self.coord), "--timeout", str(DEADLINE),
                               *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]))
        self.current["run"] = name

    def crash_coordinator(self) -> int:
        return self.h.crash([self.current["coordinator"], self.current["run"]],
                            self.coord / "flwr-home")

    # -- sites -------------------------------------------------------------------------
    def start_site(self, site: str) -> None:
        name = self._name(site)
        self.h.start(name, cli(
            "client", "join", "--superlink", f"127.0.0.1:{self.port}",
            "--ca-cert", str(self.pki / "ca.crt"),
            "--node-key", str(self.pki / "sites" / site / "node.key"), "--site-id", site,
            "--data", str(self.tmp / f"silo{SITES.index(site)}.npz"),
            "--base-model", str(self.base), "--state-dir", str(self.states[site]),
            "--epsilon-budget", "100", "--delta", "1e-3", "--device", "cpu",
            # rdp: the cheaper accountant, as this test is about crash consistency (the
            # default prv path runs with real processes in test_deploy and test_federation)
            "--accountant", "rdp",
            "--runtime-port", str(free_port()), "--max-wait-time", "120"))
        self.current[site] = name
        self.site_exit.pop(site, None)

    def alive(self, site: str) -> bool:
        return self.h.procs[self.current[site]].poll() is None

    def crash_site(self, site: str) -> int:
        return self.h.crash([self.current[site]], self.states[site] / "flwr-home")

    def supervise(self) -> None:
        """Restart what exited on its own: a site (after a back-off: a killed node stays
        'online' at the SuperLink for up to two heartbeat intervals and is refused until
        then), a failed coordinator or run (recorded as unexpected)."""
        now = time.monotonic()
        for site in SITES:
            proc = self.h.procs[self.current[site]]
            if proc.poll() is None:
                continue
            first = self.site_exit.setdefault(site, now)
            if now - first >= RESTART_BACKOFF:
                self.start_site(site)
        if self.h.procs[self.current["coordinator"]].poll() is not None:
            self.events.append(f"{self.current['coordinator']} exited on its own")
            self.crash_coordinator()
            self.start_coordinator()
        elif self.h.procs[self.current["run"]].poll() not in (None, 0):
            self.events.append(f"{self.current['run']} exited with "
                               f"{self.h.procs[self.current['run']].returncode}: "
                               + self.h.output(self.current["run"])[-1500:])
            self.submit()


def untrained(run_dir: Path) -> list[str]:
    """The sites with no trained report in the ledger yet."""
    led = _json(run_dir / "ledger.json") or {"rounds": []}
    trained = {site for entry in led["rounds"] for site, rep in entry["sites"].items()
               if rep.get("trained")}
    return [s for s in SITES if s not in trained]


def _accountant_mtimes(states: dict[str, Path]) -> dict[str, int]:
    out = {}
    for site, state in states.items():
        try:
            out[site] = (state / "accountant.json").stat().st_mtime_ns
        except FileNotFoundError:
            out[site] = 0
    return out


def _wait_progress(dep: Deployment, inv: Invariants, point: dict, deadline: float) -> None:
    """Before killing the coordinator again: a round completed since its last kill (at most
    ``PROGRESS_WAIT``). On a slow machine a round can outlast the gap between two kills, and
    the run would then never advance; with this, every kill point is still spent, each after
    some progress."""
    start = time.monotonic()
    while checkpoint_round(dep.run_dir) <= dep.round_at_coordinator_kill \
            and time.monotonic() - start < PROGRESS_WAIT and time.monotonic() < deadline:
        dep.supervise()
        inv.check(f"waiting for progress before {point}")
        time.sleep(1.0)
    point["waited_for_progress"] = round(time.monotonic() - start, 1)


def _wait_point(dep: Deployment, inv: Invariants, point: dict, deadline: float) -> str:
    """Wait for the point's trigger (``TRIGGER_WAIT`` at most) and delay, supervising and
    checking."""
    if point["target"] == "coordinator":
        _wait_progress(dep, inv, point, deadline)
    start = time.monotonic()
    mtimes, ckpt = _accountant_mtimes(dep.states), checkpoint_round(dep.run_dir)
    fired, last_check = None, 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        if fired is None:
            if point["trigger"] == "time":
                fired = start
            elif point["trigger"] == "train" and _accountant_mtimes(dep.states) != mtimes:
                fired = now
            elif point["trigger"] == "round" and checkpoint_round(dep.run_dir) > ckpt:
                fired = now
            elif now - start > TRIGGER_WAIT:
                fired = now
                point["trigger"] = f"{point['trigger']} (not seen in {TRIGGER_WAIT:.0f} s)"
        if fired is not None and now - fired >= point["delay"]:
            return "ok"
        dep.supervise()
        if now - last_check > 5:
            inv.check(f"before point {point}")
            last_check = now
        time.sleep(0.25)
    return "deadline"


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    h = Harness(tmp)
    t0 = time.monotonic()
    deadline = t0 + DEADLINE
    out = {"tmp": tmp, "h": h, "points": [], "done": False}
    try:
        dep = Deployment(tmp, h)
        out["dep"] = dep
        inv = Invariants(dep.run_dir, dep.states)
        out["inv"] = inv
        dep.start_coordinator()
        for site in SITES:
            dep.start_site(site)
        for point in schedule(random.Random(SEED), POINTS):
            if _wait_point(dep, inv, point, deadline) == "deadline":
                break
            if checkpoint_round(dep.run_dir) >= dep.rounds:
                # the run finished before every point was spent: extend it by two rounds
                # (a resubmitted run with more rounds resumes from its run directory)
                wait_for(lambda: h.procs[dep.current["run"]].poll() is not None, 120,
                         "the finished run's dpfl-server run to exit")
                dep.rounds += 2
                point["extended_to"] = dep.rounds
                dep.submit()
            if point["target"] != "coordinator" and not dep.alive(point["target"]):
                # that site is still in its restart back-off: hit a live one instead
                live = [s for s in SITES if dep.alive(s)]
                point["target"] = live[int(point["delay"] * 100) % len(live)] if live \
                    else "coordinator"
                point["retargeted"] = True
            point["t"] = round(time.monotonic() - t0, 1)
            point["round"] = checkpoint_round(dep.run_dir)
            if point["target"] == "coordinator":
                dep.round_at_coordinator_kill = checkpoint_round(dep.run_dir)
                point["killed"] = dep.crash_coordinator()
                inv.check(f"after killing the coordinator at {point}")
                dep.start_coordinator()
            else:
                point["killed"] = dep.crash_site(point["target"])
                inv.check(f"after killing {point['target']} at {point}")
                dep.start_site(point["target"])
            out["points"].append(point)
            (tmp / "faults.jsonl").open("a").write(json.dumps(point) + "\n")
        # every point spent: the run must now finish all its rounds, with every site trained
        # at least once on record (a slow machine may have lost a site's every reply so far:
        # then the run is extended by two rounds, as above, until the deadline)
        while time.monotonic() < deadline:
            run = h.procs[dep.current["run"]]
            if run.poll() == 0:
                missing = untrained(dep.run_dir)
                if not missing:
                    out["done"] = True
                    break
                dep.rounds += 2
                out.setdefault("extended_for", []).append({"missing": missing,
                                                           "rounds": dep.rounds})
                dep.submit()
            dep.supervise()
            inv.check("finishing")
            time.sleep(2)
        inv.check("the end")
        out["last_run"] = h.output(dep.current["run"])
    finally:
        out["left"] = h.stop_all()
        out["seconds"] = round(time.monotonic() - t0, 1)
        (tmp / "faults-summary.json").write_text(json.dumps(
            {k: out[k] for k in ("points", "done", "seconds", "left")}, indent=1))
    return out


def test_schedule_is_seeded_and_mixed():
    a, b = schedule(random.Random(3), 20), schedule(random.Random(3), 20)
    assert a == b and len(a) == 20
    assert sum(p["target"] == "coordinator" for p in a) == 10
    assert {p["trigger"] for p in a} == {"time", "train", "round"}


def test_every_point_was_injected_while_training(faults):
    points = faults["points"]
    killed = [p for p in points if "killed" in p]
    assert len(killed) == POINTS, json.dumps(points, indent=1)
    assert all(p["killed"] > 0 for p in killed), points  # something was alive to kill
    assert any(p["target"] == "coordinator" for p in killed)
    assert any(p["target"] != "coordinator" for p in killed)


def test_run_completes_every_round_after_the_faults(faults):
    dep, inv = faults["dep"], faults["inv"]
    assert faults["done"], (faults["seconds"], dep.events,
                            faults["h"].output(dep.current["run"])[-3000:])
    assert "finished:completed" in faults["last_run"]
    assert checkpoint_round(dep.run_dir) == dep.rounds
    led = json.loads((dep.run_dir / "ledger.json").read_text())
    assert sorted({r["round"] for r in led["rounds"]}) == list(range(1, dep.rounds + 1))
    assert inv.checks >= POINTS
    assert not [e for e in dep.events if "exited with" in e], dep.events


def test_ledger_never_under_reports_any_site(faults):
    """The final state, checked once more: every site trained, and its ledger ε is its
    accountant's ε at its last report (never less than the steps behind its updates)."""
    dep = faults["dep"]
    led = json.loads((dep.run_dir / "ledger.json").read_text())
    missing = untrained(dep.run_dir)
    assert not missing, (f"{missing} never trained on record in {dep.rounds} rounds "
                         f"({faults['seconds']} s; extensions {faults.get('extended_for')})")
    for site, state in dep.states.items():
        acc = PersistentAccountant.load(state / "accountant.json")
        assert 0 < led["sites"][site]["epsilon"] <= acc.epsilon() * (1 + 1e-9)


def test_every_process_is_stopped(faults):
    assert faults["left"] == []
