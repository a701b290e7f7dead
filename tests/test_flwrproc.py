"""Finding and stopping what a coordinator or site started (dpfl.shared.deploy.flwrproc):
processes are recognised by their private FLWR_HOME, so a restarted coordinator can stop what
a predecessor killed outright left running (a ServerApp would reconnect and fail its run)."""

from __future__ import annotations

import os
import subprocess
import sys

from dpfl.shared.deploy.flwrproc import processes_of, stop_processes_of


def test_processes_of_a_flwr_home_are_found_and_stopped(tmp_path):
    home, other = tmp_path / "flwr-home", tmp_path / "other-home"
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    mine = subprocess.Popen(sleeper, env={**os.environ, "FLWR_HOME": str(home)})
    theirs = subprocess.Popen(sleeper, env={**os.environ, "FLWR_HOME": str(other)})
    try:
        assert processes_of(home) == [mine.pid]
        assert stop_processes_of(home, grace=5.0) == 1
        assert mine.wait(timeout=10) is not None and processes_of(home) == []
        assert theirs.poll() is None  # another FLWR_HOME is left alone
        assert stop_processes_of(home) == 0
    finally:
        for proc in (mine, theirs):
            proc.kill()
            proc.wait()
