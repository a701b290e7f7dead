"""``serve``'s supervision of its processes, with real (short-lived) processes standing in
for the SuperLink, the SuperExec and the proxy: a dead SuperExec is restarted, one that keeps
dying stops ``serve`` with its log named, and a dead SuperLink or proxy ends ``serve``."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import dpfl.server.deploy as deploy
from dpfl.server.deploy import MAX_RESTARTS, Coordinator


def _proc(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def _restarts(monkeypatch, code: str) -> list[subprocess.Popen]:
    """Make ``serve``'s SuperExec restarts start ``code``; returns the list they land in."""
    started: list[subprocess.Popen] = []

    def restart(_coord):
        started.append(_proc(code))
        return started[-1]

    monkeypatch.setattr(deploy, "start_superexec", restart)
    return started


@pytest.fixture()
def coord(tmp_path):
    return Coordinator(pki=tmp_path / "pki", state_dir=tmp_path / "state")


def test_a_dead_superexec_is_restarted_and_the_link_still_decides(coord, monkeypatch, caplog):
    # the new SuperExec lives; the SuperLink then exits with 7
    started = _restarts(monkeypatch, "import time; time.sleep(30)")
    link = _proc("import time; time.sleep(2); raise SystemExit(7)")
    procs = [link, _proc("raise SystemExit(1)"), _proc("import time; time.sleep(30)")]
    try:
        with caplog.at_level(logging.WARNING, logger="dpfl.server.deploy"):
            assert deploy._supervise(coord, procs) == 7
    finally:
        for p in procs + started:
            p.kill()
            p.wait()
    assert len(started) == 1 and procs[1] is started[0]
    assert "the SuperExec exited with 1; restarting it" in caplog.text


def test_a_superexec_that_keeps_dying_stops_serve_naming_its_log(coord, monkeypatch,
                                                                   caplog):
    started = _restarts(monkeypatch, "raise SystemExit(3)")
    procs = [_proc("import time; time.sleep(60)"), _proc("raise SystemExit(3)"),
             _proc("import time; time.sleep(60)")]
    try:
        with caplog.at_level(logging.ERROR, logger="dpfl.server.deploy"):
            assert deploy._supervise(coord, procs) == 3
    finally:
        for p in procs + started:
            p.kill()
            p.wait()
    assert len(started) == MAX_RESTARTS
    assert f"exited {MAX_RESTARTS + 1} times" in caplog.text
    assert str(coord.state_dir / "superexec.log") in caplog.text
