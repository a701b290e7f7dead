"""Real deployment processes for tests: coordinator, sites, and a check that none is left.

Every process runs in its own process group on 127.0.0.1 with ports picked free at run time;
``Harness.stop`` stops them all (SIGTERM, then SIGKILL) and lists any flwr process still
alive whose FLWR_HOME lies under the test's directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


def cli(side: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"dpfl.{side}.cli", *args]


def serve_cmd(pki: Path, coord: Path, port: int, root: Path, *extra: str) -> list[str]:
    """``dpfl-server serve`` on loopback: the Fleet proxy on ``port``, the SuperLink's API on
    a free port, and ``root`` (the test's directory) as both model root and runs root."""
    return cli("server", "serve", "--pki", str(pki), "--state-dir", str(coord), "--port",
               str(port), "--api-port", str(free_port()), "--model-root", str(root),
               "--runs-root", str(root), *extra)


class Harness:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], cwd: Path = ROOT) -> subprocess.Popen:
        out = open(self.tmp / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text(errors="replace")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.procs[name].pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, name: str, grace: float = 20.0) -> None:
        proc = self.procs[name]
        self.kill(name, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill(name, signal.SIGKILL)  # the rest of its group, if any
        proc.wait(timeout=10)

    def leftovers(self) -> list[str]:
        """flwr/dpfl processes still alive whose FLWR_HOME or command names our directory."""
        mine = str(self.tmp)
        return [f"{pid}: {cmd[:200]}" for pid, home, cmd in _processes()
                if mine in home or mine in cmd]

    def crash(self, names: list[str], home: Path) -> int:
        """SIGKILL the process groups of ``names`` and every process whose FLWR_HOME lies
        under ``home`` (their detached children), as a power cut would; returns how many
        processes were alive to kill. Repeated until none is left (a dying parent may fork)."""
        home_s = str(home)
        killed = {pid for pid, h, _cmd in _processes() if h.startswith(home_s)}
        killed |= {self.procs[n].pid for n in names
                   if n in self.procs and self.procs[n].poll() is None}
        for name in names:
            if name in self.procs:
                self.kill(name)
        for _ in range(5):
            found = [pid for pid, h, _cmd in _processes() if h.startswith(home_s)]
            if not found:
                break
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for name in names:
            if name in self.procs:
                try:
                    self.procs[name].wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        return len(killed)

    def stop_all(self) -> list[str]:
        """Stop every process; returns what was still alive afterwards (then kills it)."""
        for name in list(self.procs):
            self.stop(name)
        time.sleep(1.0)
        left = self.leftovers()
        for line in left:
            try:
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def _processes():
    """(pid, FLWR_HOME or "", command line) of every process we may read."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        home = next((e[len(b"FLWR_HOME="):] for e in environ if e.startswith(b"FLWR_HOME=")),
                    b"")
        yield int(pid), home.decode(errors="replace"), cmdline.decode(errors="replace")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")


def checkpoint_round(run_dir: Path) -> int:
    """The round of the coordinator's global checkpoint (0 before the first), read from the
    weights file's own metadata, the only place the round is kept."""
    from safetensors import safe_open

    weights = Path(run_dir) / "global" / "adapter.safetensors"
    if not weights.exists():
        return 0
    with safe_open(str(weights), "np") as f:
        return int((f.metadata() or {})["round"])
