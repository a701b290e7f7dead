"""Starting the pinned flwr's executables (no flwr import: only paths and environment).

Every flwr process gets a private ``FLWR_HOME`` (never the user's ``~/.flwr``), no update
check and no run-time dependency installation (``uv sync``): a deployment runs exactly the
pinned packages it was installed with.
"""

from __future__ import annotations

import os
import shutil
import sys
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
