"""The privacy guarantee an exported bundle carries (read, never computed or guessed).

Whoever receives synthetic images from a bundle should see under which (epsilon, delta)
guarantee the adapter was trained: the numbers come from the training accountant's state
file (``dpfl-accountant/1``, or any JSON with epsilon/delta/accountant fields) or are stated
on the command line; otherwise the bundle says "unknown".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfl.shared.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyGuarantee:
    """The (epsilon, delta) guarantee under which the adapter was trained, as stated to us.

    Attributes:
        status: "stated" when epsilon and delta are known, else "unknown".
        epsilon, delta: the global guarantee (None when unknown); epsilon >= 0, 0 <= delta < 1.
        accountant: name of the accountant that computed it (e.g. "rdp", "prv"), if given.
        per_client: per-client guarantees as given in the privacy file, if any.
        source: where the numbers came from ("command line", a file path, or "none").
        detail: the privacy file's content (or its SHA-256 when large), for audit.
    """

    status: str = "unknown"
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    per_client: Any = None
    source: str = "none"
    detail: Any = None

    def __post_init__(self) -> None:
        if self.status not in ("stated", "unknown"):
            raise ConfigError(f"privacy status must be 'stated' or 'unknown', got {self.status!r}")
        if self.status == "stated":
            if not isinstance(self.epsilon, (int, float)) or self.epsilon < 0:
                raise ConfigError(f"privacy epsilon must be a number >= 0, got {self.epsilon!r}")
            if not isinstance(self.delta, (int, float)) or not 0 <= self.delta < 1:
                raise ConfigError(f"privacy delta must be a number in [0, 1), got {self.delta!r}")

    @classmethod
    def from_values(cls, epsilon: float | None, delta: float | None,
                    accountant: str | None = None) -> PrivacyGuarantee:
        if epsilon is None and delta is None:
            return cls()
        if epsilon is None or delta is None:
            raise ConfigError(f"give both epsilon and delta (got epsilon={epsilon}, "
                              f"delta={delta}); a guarantee needs both")
        return cls("stated", float(epsilon), float(delta), accountant, source="command line")

    @classmethod
    def from_file(cls, path: str | Path) -> PrivacyGuarantee:
        """Read any JSON object with ``epsilon``/``delta``/``accountant`` (or ``kind``, as in
        ``dpfl-accountant/1`` state files), at the top level or under ``global``, or
        ``global_epsilon``/``global_delta`` with per-site entries under ``sites`` (a federated
        run's ``adapter/privacy.json``), and optional per-client entries (``clients`` or
        ``per_client``). Numbers are taken as stated,
        never computed or guessed: without an epsilon/delta pair the status is "unknown"."""
        p = Path(path)
        try:
            state = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read privacy file {p}: {exc}; pass the accountant "
                              "state JSON written by training, or --epsilon/--delta") from exc
        if not isinstance(state, dict):
            raise ConfigError(f"privacy file {p} holds {type(state).__name__}, expected a JSON object")
        top = state.get("global") if isinstance(state.get("global"), dict) else state
        eps = top.get("epsilon", top.get("eps", state.get("global_epsilon")))
        delta = top.get("delta", state.get("delta", state.get("global_delta")))
        raw = p.read_bytes()
        detail = state if len(raw) <= 20000 else {"sha256": hashlib.sha256(raw).hexdigest()}
        per_client = state.get("clients", state.get("per_client", state.get("sites")))
        accountant = top.get("accountant", state.get("accountant", state.get("kind")))
        status = "stated" if eps is not None and delta is not None else "unknown"
        if status == "unknown":
            log.warning("privacy file %s has no epsilon/delta pair; the bundle records the "
                        "guarantee as unknown", p)
            eps = delta = None
        return cls(status, eps, delta, None if accountant is None else str(accountant),
                   per_client, str(p), detail)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.status == "unknown":
            d["note"] = ("no differential-privacy guarantee was supplied at export; treat "
                         "images from this bundle as carrying no stated guarantee")
        return d
