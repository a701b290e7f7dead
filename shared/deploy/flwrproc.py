"""Starting the pinned flwr's executables (no flwr import: only paths and environment).

Every flwr process gets a private ``FLWR_HOME`` (never the user's ``~/.flwr``), no update
check and no run-time dependency installation (``uv sync``): a deployment runs exactly the
pinned packages it was installed with.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from dpfl.shared.errors import DpflError


class DeployError(DpflError):
    """A deployment process failed to start, answer or finish."""


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment of every flwr process: private FLWR_HOME, no run-time installs, and this
    Python environment's scripts first on PATH (the SuperLink starts ``flower-superexec`` and
    the SuperNode its app processes by name, so an un-activated virtualenv must still work)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


def flwr_bin(name: str) -> str:
    """A flwr executable of this Python environment (falls back to PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise DeployError(f"'{name}' not found beside {sys.executable} or on PATH; "
                          "install dpfl with its pinned flwr (pip install -e .)")
    return found


def die_with_parent() -> None:
    """``preexec_fn`` of a supervised child: it gets SIGTERM when the process that started it
    dies (Linux ``PR_SET_PDEATHSIG``), so a supervisor killed with SIGKILL leaves no SuperLink
    or proxy holding its ports."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def processes_of(flwr_home: Path) -> list[int]:
    """Pids of the processes (ours to read) whose ``FLWR_HOME`` is ``flwr_home``: what a
    SuperLink or SuperNode started, detached (SuperExec, ServerApp, ClientApp processes)."""
    want = b"FLWR_HOME=" + str(flwr_home).encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in environ and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def stop_processes_of(flwr_home: Path, grace: float = 5.0) -> int:
    """SIGTERM every process of ``flwr_home`` (:func:`processes_of`), SIGKILL what is left
    after ``grace`` seconds; returns how many there were."""
    pids = processes_of(flwr_home)
    found = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and processes_of(flwr_home):
            time.sleep(0.2)
        pids = processes_of(flwr_home)
        if not pids:
            break
    return found
