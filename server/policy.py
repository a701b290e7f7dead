"""What the coordinator's operator decided when starting ``dpfl-server serve``, kept in
``STATE_DIR/coordinator.json`` for the ServerApp and for ``dpfl-server run/status/stop``:

* where the SuperLink's loopback API is (the only place runs are submitted, listed and
  stopped) and the public address nginx serves the Fleet API on;
* which paths a run config may name: ``base-model`` inside one of the model roots (read),
  ``run-dir`` strictly inside the runs root (write). A run config arrives over the network
  (the Control API), so it is untrusted; relative paths resolve against the state directory,
  and symbolic links are followed before the check;
* the enrolment: each listed site's node id (returned when its key was registered), its
  key's fingerprint, and the most examples it may weigh in FedAvg.

The ServerApp finds the file through ``$DPFL_COORDINATOR_STATE``, which ``serve`` sets for the
SuperLink and so for every process it starts. A deployment ServerApp without it refuses to run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import FedConfig
from dpfl.shared.io import atomic_write_json

POLICY_FILE = "coordinator.json"
STATE_ENV = "DPFL_COORDINATOR_STATE"
FORMAT = "dpfl-coordinator/1"
MAX_SITE_EXAMPLES = 100_000  # the default bound on one site's FedAvg weight


def key_fingerprint(public_key: Path) -> str:
    """SHA-256 of a node public key file's bytes (what the enrolment remembers it by)."""
    return hashlib.sha256(Path(public_key).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Enrolled:
    """One listed site: the node id its key was registered as, and its weight bound."""

    site: str
    node_id: int
    key_sha256: str
    max_examples: int = MAX_SITE_EXAMPLES


@dataclass(frozen=True)
class CoordinatorPolicy:
    state_dir: Path
    api_address: str  # the SuperLink's own address, loopback only
    public_address: str  # nginx, Fleet API only
    model_roots: tuple[Path, ...] = ()
    runs_root: Path = Path()
    sites: tuple[Enrolled, ...] = field(default_factory=tuple)
    started_at: float = 0.0  # when this serve started (time.time()): a follower re-attaches

    def __post_init__(self) -> None:
        state = Path(self.state_dir).resolve()
        object.__setattr__(self, "state_dir", state)
        object.__setattr__(self, "model_roots", tuple(Path(p).resolve()
                                                      for p in self.model_roots))
        runs = Path(self.runs_root) if str(self.runs_root) not in ("", ".") else state / "runs"
        object.__setattr__(self, "runs_root", runs.resolve())
        names = [e.site for e in self.sites]
        if len(set(names)) != len(names):
            raise ConfigError(f"a site is enrolled twice: {sorted(names)}")

    # --- the file --------------------------------------------------------------------
    def write(self) -> Path:
        data = {"format": FORMAT, "state_dir": str(self.state_dir),
                "api_address": self.api_address, "public_address": self.public_address,
                "model_roots": [str(p) for p in self.model_roots],
                "runs_root": str(self.runs_root), "sites": [asdict(e) for e in self.sites],
                "started_at": self.started_at}
        return atomic_write_json(Path(self.state_dir) / POLICY_FILE, data)

    @classmethod
    def read(cls, state_dir: str | os.PathLike) -> CoordinatorPolicy:
        path = Path(state_dir).resolve() / POLICY_FILE
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: no coordinator serves from "
                              f"{path.parent}; start 'dpfl-server serve --state-dir "
                              f"{path.parent}' first")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            return cls(state_dir=Path(data["state_dir"]), api_address=data["api_address"],
                       public_address=data["public_address"],
                       model_roots=tuple(Path(p) for p in data["model_roots"]),
                       runs_root=Path(data["runs_root"]),
                       sites=tuple(Enrolled(**e) for e in data["sites"]),
                       started_at=float(data.get("started_at", 0.0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is unreadable: {exc}") from exc

    @classmethod
    def from_env(cls) -> CoordinatorPolicy:
        state = os.environ.get(STATE_ENV)
        if not state:
            raise ConfigError(f"${STATE_ENV} is not set: the dpfl ServerApp runs only under "
                              "'dpfl-server serve', which names the coordinator's state "
                              "directory and so what a run config may name")
        return cls.read(state)

    # --- the run config ----------------------------------------------------------------
    def confine(self, cfg: FedConfig) -> FedConfig:
        """``cfg`` with ``base-model`` and ``run-dir`` absolute, or :class:`ConfigError` when
        either leaves what this coordinator allows (checked before anything is written)."""
        base = self._resolve(cfg.base_model)
        if not any(base == root or base.is_relative_to(root) for root in self.model_roots):
            raise ConfigError(f"run config: base-model {cfg.base_model!r} resolves to {base}, "
                              f"outside the model roots {[str(r) for r in self.model_roots]} "
                              "('dpfl-server serve --model-root')")
        run = self._resolve(cfg.run_dir)
        if run == self.runs_root or not run.is_relative_to(self.runs_root):
            raise ConfigError(f"run config: run-dir {cfg.run_dir!r} resolves to {run}, not "
                              f"inside the runs root {self.runs_root} ('dpfl-server serve "
                              "--runs-root')")
        return replace(cfg, base_model=str(base), run_dir=str(run))

    def _resolve(self, value: str) -> Path:
        path = Path(value)
        return (path if path.is_absolute() else self.state_dir / path).resolve()

    # --- the enrolment --------------------------------------------------------------------
    def enrolment(self) -> dict[int, Enrolled]:
        return {e.node_id: e for e in self.sites}


def enrol(previous: Mapping[str, Enrolled] | None, site: str, node_id: int | None, key: Path,
          max_examples: int) -> Enrolled:
    """The enrolment of ``site``: its new node id, else (its key was registered before) the
    node id a previous ``serve`` recorded for the same key; :class:`ConfigError` when the
    SuperLink knows the key but no record says as which node."""
    sha = key_fingerprint(key)
    if node_id is None:
        old = (previous or {}).get(site)
        if old is None or old.key_sha256 != sha:
            raise ConfigError(
                f"the key of {site} ({key}) is registered in the SuperLink's database, but "
                f"{POLICY_FILE} has no node id for it (registered by hand, or by an older "
                "dpfl): unregister it ('flwr supernode unregister') or start from a new "
                "state directory")
        node_id = old.node_id
    return Enrolled(site=site, node_id=int(node_id), key_sha256=sha,
                    max_examples=int(max_examples))
