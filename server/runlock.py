"""One coordinator per run directory.

After a crash, a restarted SuperLink can resume a run it had queued while the operator
resubmits the same run: two ServerApps would then share one run directory, each holding the
ledger it read at start, and the later write would erase rounds the other recorded. An
exclusive ``flock`` on ``RUN_DIR/.coordinator.lock`` makes the second one stop at once with a
clear error; the kernel releases the lock when its holder exits, even on ``kill -9``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dpfl.shared.errors import StateError

LOCK_NAME = ".coordinator.lock"


class RunLock:
    """Held while a coordinator writes ``run_dir``; use as a context manager."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateError(
                f"run directory {self.path.parent} is in use by another coordinator (pid "
                f"{holder}); two coordinators writing one ledger would lose rounds. Wait for it "
                "to finish or stop it (flwr stop RUN_ID), then resubmit") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
