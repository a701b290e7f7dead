"""One coordinator per run directory: a second one stops before touching the ledger, and a
holder killed with SIGKILL leaves no stale lock behind."""

import os
import signal
import subprocess
import sys

import pytest

from dpfl.server.rounds import run_federation
from dpfl.server.runlock import RunLock
from dpfl.shared.errors import StateError
from dpfl.shared.federation.config import FedConfig
from dpfl.shared.federation.ledger import PrivacyLedger
from dpfl.shared.federation.protocol import SiteReport

HOLD = ("import sys, time; from dpfl.server.runlock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_coordinator_is_refused_and_ledger_untouched(tmp_path):
    run = tmp_path / "run"
    ledger = PrivacyLedger(run / "ledger.json")
    ledger.record_round(1, [SiteReport("h1", 1.0, 1e-5, 10.0, 1.0, 0.1, 5, 50)])
    before = (run / "ledger.json").read_bytes()
    proc = _holder(run)
    try:
        with pytest.raises(StateError, match=f"{run}.*in use by another coordinator.*{proc.pid}"):
            run_federation(None, FedConfig(run_dir=str(run), base_model=str(tmp_path / "none")))
        assert (run / "ledger.json").read_bytes() == before
    finally:
        proc.kill()
        proc.wait()


def test_lock_dies_with_a_killed_holder_and_is_reusable(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with RunLock(tmp_path):  # the kernel released it
        with pytest.raises(StateError):
            RunLock(tmp_path).acquire()  # held by us now, even within one process
    RunLock(tmp_path).acquire().release()
