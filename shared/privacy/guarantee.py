"""``privacy.json``: the one schema of the (ε, δ) guarantee a trained artefact carries.

Whoever receives an adapter, a DP-trained model or synthetic images from an exported bundle
should see under which guarantee it was trained. :class:`PrivacyGuarantee` is that record,
with one writer (:meth:`PrivacyGuarantee.write`, format ``dpfl-privacy/1``) and one reader
(:meth:`PrivacyGuarantee.from_file`), used by every part of dpfl:

- central DP-LoRA (``dpfl-client train``): ``RUN_DIR/adapter/privacy.json``, from the
  client's accountant (:meth:`PrivacyGuarantee.from_accountant`);
- DP on the whole UNet (``dpfl-client train-full``): ``RUN_DIR/model/privacy.json``, also
  from the accountant;
- a federation: ``RUN_DIR/adapter/privacy.json``, from the coordinator's privacy ledger
  (:meth:`PrivacyGuarantee.from_ledger`; parallel composition over the sites);
- export (``bundle.json``'s ``privacy``), evaluation (``evaluation.json``) and the run
  report read it back.

The numbers are read, never computed or guessed here: they come from an accountant or
ledger, from a file, or from the command line; otherwise the status is "unknown". The
reader also takes the files older dpfl versions wrote: an accountant state
(``dpfl-accountant/1``), a federated ``global_epsilon``/``global_delta``/``sites`` record,
or any JSON object with ``epsilon``/``delta`` (at the top level or under ``global``).

Torch- and Opacus-free: export, evaluation and the report import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dpfl.shared.errors import ConfigError
from dpfl.shared.io import atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "dpfl-privacy/1"
#: what a guarantee protects, by writer
SCOPE_ADAPTER = ("record-level DP of the adapter with respect to each example of the silo; "
                 "the base model is public (no private data)")
SCOPE_UNET = ("record-level DP of the UNet with respect to each example of the silo; vae/ is "
              "the base model's public autoencoder (no private data)")
SCOPE_FEDERATED = ("record-level DP of the global adapter with respect to each example at "
                   "every site: by parallel composition (max over sites of ε_i, δ_i), where "
                   "ε_i is site i's cumulative spend from its own accountant")
#: What every dpfl guarantee covers and what it does not, stated in README and every report.
COVERS = (
    "Record level: adding or removing one image (with its label) of a silo changes the "
    "distribution of everything trained on it by at most (ε, δ) - the trained weights, "
    "every update a site sends over all its rounds, and anything derived from them (the "
    "global model, exported bundles, synthetic images).",
    "Per site: ε_i and δ_i come from site i's own durable accountant; a federation's global "
    "guarantee is (max_i ε_i, max_i δ_i) because every image lives at exactly one site.",
    "δ is the probability-like slack of (ε, δ)-DP; it should be well below 1/n for a silo of "
    "n images.",
)
DOES_NOT_COVER = (
    "The silo size: a site reports its number of images, its sampling rate and its step "
    "count in clear (FedAvg weight and accounting); each reveals n, which is outside the "
    "add/remove-one guarantee.",
    "People rather than images: a patient with k images in a silo is protected at about "
    "k·ε (group privacy), not ε.",
    "Which sites take part, when and how long they train; whole sites are protected only "
    "with client-level DP (client-dp-clip), reported separately.",
    "Without SecAgg+, the coordinator sees each site's (noised) update; the guarantee above "
    "still holds for it, but nothing more.",
)
_INLINE_BYTES = 20000  # a legacy file larger than this is recorded by its SHA-256


class _Accountant(Protocol):
    """What :meth:`PrivacyGuarantee.from_accountant` reads of a
    :class:`~dpfl.shared.privacy.accountant.PersistentAccountant`."""

    path: Path
    kind: str
    delta: float
    budget: float
    history: list[tuple[float, float, int]]

    @property
    def steps(self) -> int: ...

    def epsilon(self) -> float: ...


class _Ledger(Protocol):
    """What :meth:`PrivacyGuarantee.from_ledger` reads of a
    :class:`~dpfl.shared.federation.ledger.PrivacyLedger`."""

    path: Path
    sites: dict[str, dict[str, Any]]
    client_level: dict[str, Any] | None

    @property
    def last_round(self) -> int: ...

    def global_guarantee(self) -> tuple[float, float]: ...


@dataclass(frozen=True, kw_only=True)
class PrivacyGuarantee:
    """The (ε, δ) guarantee under which an adapter or model was trained, as stated to us.

    Attributes:
        status: "stated" when epsilon and delta are known, else "unknown" (no numbers).
        epsilon, delta: the guarantee (None when unknown); epsilon >= 0, 0 <= delta < 1.
        accountant: the accountant that computed it (``rdp``, ``prv``), if known.
        scope: what is protected, and at which level (record-level for every writer).
        steps: DP-SGD steps behind it (central training: the whole ledger), if known.
        rounds: federated rounds behind it, if a federation wrote it.
        per_client: per-site guarantees as the ledger holds them (federated), if any.
        client_level: the coordinator's client-level (DP-FedAvg) guarantee, if it was on.
        base_fingerprint: fingerprint of the public base model it was trained on.
        source: where the numbers came from: an accountant or ledger file, "command line",
            the path of an older privacy file, or "none".
        detail: audit facts (the accountant's (σ, q, steps) history and budget), or an
            older privacy file's content (its SHA-256 when large).
    """

    status: str = "unknown"
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    scope: str | None = None
    steps: int | None = None
    rounds: int | None = None
    per_client: Any = None
    client_level: Any = None
    base_fingerprint: str | None = None
    source: str = "none"
    detail: Any = None

    def __post_init__(self) -> None:
        if self.status not in ("stated", "unknown"):
            raise ConfigError(f"privacy status must be 'stated' or 'unknown', got {self.status!r}")
        eps, delta = self.epsilon, self.delta
        if self.status == "stated":
            if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
                raise ConfigError(f"privacy epsilon must be a number >= 0, got {eps!r}")
            if not isinstance(delta, (int, float)) or isinstance(delta, bool) \
                    or not 0 <= delta < 1:
                raise ConfigError(f"privacy delta must be a number in [0, 1), got {delta!r}")
        elif eps is not None or delta is not None:
            raise ConfigError(f"an unknown guarantee carries no numbers, got epsilon={eps!r}, "
                              f"delta={delta!r}")
        for name in ("steps", "rounds"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"privacy {name} must be an integer >= 0, got {v!r}")
        for name in ("accountant", "scope", "base_fingerprint", "source"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"privacy {name} must be a string, got {v!r}")

    # -- writers' constructors ----------------------------------------------------------
    @classmethod
    def from_values(cls, epsilon: float | None, delta: float | None,
                    accountant: str | None = None) -> PrivacyGuarantee:
        """A guarantee stated on the command line (both numbers, or neither: unknown)."""
        if epsilon is None and delta is None:
            return cls()
        if epsilon is None or delta is None:
            raise ConfigError(f"give both epsilon and delta (got epsilon={epsilon}, "
                              f"delta={delta}); a guarantee needs both")
        return cls(status="stated", epsilon=float(epsilon), delta=float(delta),
                   accountant=accountant, source="command line")

    @classmethod
    def from_accountant(cls, acc: _Accountant, *, scope: str,
                        base_fingerprint: str | None = None,
                        examples: int | None = None) -> PrivacyGuarantee:
        """The guarantee of everything a client's ledger holds (central training): ε of its
        whole (σ, q, steps) history at its δ, as its accountant computes it."""
        return cls(status="stated", epsilon=float(acc.epsilon()), delta=float(acc.delta),
                   accountant=acc.kind, scope=scope, steps=int(acc.steps),
                   base_fingerprint=base_fingerprint, source=str(acc.path),
                   detail={"history": [list(h) for h in acc.history], "budget": acc.budget,
                           "examples": examples})

    @classmethod
    def from_ledger(cls, ledger: _Ledger, base_fingerprint: str | None = None
                    ) -> PrivacyGuarantee:
        """The global record-level guarantee of a federation's ledger (max over sites), with
        each site's spend and the client-level guarantee when DP-FedAvg was on."""
        eps, delta = ledger.global_guarantee()
        return cls(status="stated", epsilon=float(eps), delta=float(delta),
                   scope=SCOPE_FEDERATED, rounds=int(ledger.last_round),
                   per_client=ledger.sites, client_level=ledger.client_level,
                   base_fingerprint=base_fingerprint, source=str(ledger.path))

    # -- the one writer and the one reader ----------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = {"format": FORMAT, **dataclasses.asdict(self)}
        if self.status == "unknown":
            d["note"] = ("no differential-privacy guarantee was supplied at export; treat "
                         "images from this bundle as carrying no stated guarantee")
        return d

    def write(self, path: str | Path) -> Path:
        """Write ``privacy.json`` (atomically: never half-written)."""
        atomic_write_json(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def from_file(cls, path: str | Path) -> PrivacyGuarantee:
        """Read a ``privacy.json`` written by :meth:`write`, or a file of an older format
        (module docstring). Raises :class:`ConfigError` naming the file when it is
        unreadable, not a JSON object, of a newer format, or holds invalid values."""
        p = Path(path)
        try:
            raw = p.read_bytes()
            state = json.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read privacy file {p}: {exc}; pass the privacy.json or "
                              "accountant state JSON written by training, or "
                              "--epsilon/--delta") from exc
        if not isinstance(state, dict):
            raise ConfigError(f"privacy file {p} holds {type(state).__name__}, expected a "
                              "JSON object")
        try:
            if str(state.get("format", "")).startswith("dpfl-privacy/"):
                g = cls._from_schema(state)
            else:
                g = cls._from_legacy(state, p, raw)
        except ConfigError as exc:
            raise ConfigError(f"privacy file {p}: {exc}") from exc
        if g.status == "unknown":
            log.warning("privacy file %s states no epsilon/delta pair; the guarantee is "
                        "recorded as unknown", p)
        return g

    @classmethod
    def _from_schema(cls, state: dict[str, Any]) -> PrivacyGuarantee:
        if state["format"] != FORMAT:
            raise ConfigError(f"format {state['format']!r} is not {FORMAT!r} (written by a "
                              "newer dpfl?); upgrade dpfl to read it")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})

    @classmethod
    def _from_legacy(cls, state: dict[str, Any], p: Path, raw: bytes) -> PrivacyGuarantee:
        """An accountant state, a federated record of older dpfl, or any JSON object with
        epsilon/delta/accountant (or ``kind``) at the top level or under ``global``."""
        nested = state.get("global")
        top: dict[str, Any] = nested if isinstance(nested, dict) else state
        eps = top.get("epsilon", top.get("eps", state.get("global_epsilon")))
        delta = top.get("delta", state.get("delta", state.get("global_delta")))
        accountant = top.get("accountant", state.get("accountant", state.get("kind")))
        stated = eps is not None and delta is not None
        detail = state if len(raw) <= _INLINE_BYTES else {"sha256": hashlib.sha256(raw).hexdigest()}
        # optional facts are kept only when they have their type (never coerced)
        return cls(status="stated" if stated else "unknown",
                   epsilon=eps if stated else None, delta=delta if stated else None,
                   accountant=None if accountant is None else str(accountant),
                   scope=_typed(state.get("scope"), str), steps=_typed(state.get("steps"), int),
                   rounds=_typed(state.get("rounds"), int),
                   per_client=state.get("clients", state.get("per_client", state.get("sites"))),
                   client_level=state.get("client_level"),
                   base_fingerprint=_typed(state.get("base_fingerprint"), str), source=str(p),
                   detail=detail)



def _typed(v: Any, kind: type) -> Any:
    return v if isinstance(v, kind) and not isinstance(v, bool) else None
