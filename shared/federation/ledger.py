"""The coordinator's privacy ledger: what every site reported spending, round by round.

Each record lives at exactly one site, so by parallel composition the global model is
``(max_i eps_i, max_i delta_i)``-DP at the record level, where ``eps_i`` is site i's
cumulative spend from its own accountant (which covers all its rounds, see
``dpfl.shared.privacy.accountant``). The ledger is written atomically and durably *before* the
round's aggregate is released or checkpointed, so a crash can only leave the ledger ahead
of the model, never behind it.

A site's spend is the ledger's, not only the latest report's. Within one accountant
history the reported epsilon and steps only grow, and the site's delta is the running
maximum of what it reported. A report whose epsilon or cumulative steps fall below the
previous one comes from a *new* history (a reset or replaced accountant): it is flagged, and
the site's spend becomes the earlier history's plus the new one's, epsilon and delta each
summed (basic composition, a valid upper bound for two histories on the same records; the
maximum of the two would not be). A site whose composed epsilon reaches its budget is treated
as exhausted and never sampled again.

A round is also put on record, durably, *before* its instructions are sent
(:meth:`PrivacyLedger.begin_round`: ``open_round``, the round and the sites it goes to). A
round whose replies never reach the ledger (the coordinator was stopped, crashed or restarted
mid-round) stays there; the next round begun moves it to ``interrupted``, and a later attempt
at the same round is marked ``rerun``: the sites may have trained it, and spent epsilon for
it, more than once, though only the attempt that reached the ledger carries their report.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dpfl.shared.errors import StateError
from dpfl.shared.federation.protocol import SiteReport
from dpfl.shared.io import atomic_write_json

log = logging.getLogger(__name__)


class PrivacyLedger:
    """Per-round, per-site privacy spend and the global record-level guarantee."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rounds: list[dict[str, Any]] = []
        self.sites: dict[str, dict[str, Any]] = {}
        self.flags: list[str] = []
        self.client_level: dict[str, Any] | None = None  # DP-FedAvg spend, when enabled
        self.open_round: dict[str, Any] | None = None  # sent, no replies recorded yet
        self.interrupted: list[dict[str, Any]] = []  # sent, never recorded (stop, restart)

    @classmethod
    def load_or_create(cls, path: str | Path) -> PrivacyLedger:
        """The ledger at ``path`` (:func:`read_ledger`), or an empty one when there is none."""
        ledger = cls(path)
        if ledger.path.exists():
            data = read_ledger(ledger.path)
            ledger.rounds, ledger.sites = data["rounds"], data["sites"]
            ledger.flags = data.get("flags", [])
            ledger.client_level = data.get("client_level")
            ledger.open_round = data.get("open_round")  # absent in older ledgers
            ledger.interrupted = data.get("interrupted", [])
        return ledger

    @property
    def last_round(self) -> int:
        return self.rounds[-1]["round"] if self.rounds else 0

    def begin_round(self, server_round: int, sites: list[str]) -> None:
        """Put round ``server_round`` on record as sent to ``sites`` (names, or ``node N``
        while a node's site is not yet known), durably, before its instructions go out. A
        round still open from an earlier attempt (its replies never reached the ledger) is
        moved to ``interrupted`` first."""
        if self.open_round is not None:
            lost = {**self.open_round, "reason": "no reply reached the ledger (the coordinator "
                    "was stopped, crashed or restarted mid-round)"}
            log.warning("round %s was sent to %s at %s but no reply reached the ledger; the "
                        "sites may have spent epsilon for it", lost["round"],
                        ", ".join(lost.get("sites", [])) or "no site", lost.get("sent"))
            self.interrupted.append(lost)
        self.open_round = {"round": server_round, "sites": sorted(sites),
                           "sent": _dt.datetime.now(_dt.timezone.utc).isoformat(
                               timespec="seconds")}
        self.save()

    def record_round(self, server_round: int, reports: list[SiteReport],
                     rejected: dict[str, str] | None = None,
                     client_level: dict[str, Any] | None = None) -> dict[str, Any]:
        """Add a round's reports and persist the ledger durably; returns the round entry.

        ``client_level``: the coordinator's cumulative client-level (DP-FedAvg) spend after
        this round, when client-level DP is on; it is reported beside the record-level one.
        """
        if server_round < self.last_round:
            raise StateError(f"round {server_round} is older than the ledger's last round "
                             f"{self.last_round}; the ledger is never rewound")
        # The same round again: the coordinator crashed after recording it but before
        # releasing its aggregate (the spend happened; both attempts stay on record), or an
        # earlier attempt was sent but never recorded (stopped or restarted mid-round).
        rerun = server_round == self.last_round or any(
            int(i["round"]) == server_round for i in self.interrupted)
        for rep in reports:
            self.sites[rep.site], flag = _site_record(self.sites.get(rep.site), rep,
                                                      server_round)
            if flag:
                log.warning(flag)
                self.flags.append(flag)
        eps_g, delta_g = self.global_guarantee()
        entry = {"round": server_round, "rerun": rerun,
                 "sites": {r.site: {**asdict(r), "epsilon": self.sites[r.site]["epsilon"],
                                    "delta": self.sites[r.site]["delta"],
                                    "reported_epsilon": r.epsilon, "reported_delta": r.delta}
                           for r in reports},
                 "rejected": rejected or {},
                 "global_epsilon": eps_g, "global_delta": delta_g}
        if client_level is not None:
            self.client_level = dict(client_level)
            entry["client_level"] = dict(client_level)
        self.rounds.append(entry)
        self.open_round = None
        self.save()
        return entry

    def global_guarantee(self) -> tuple[float, float]:
        """(max eps_i, max delta_i) over every site that ever trained."""
        if not self.sites:
            return 0.0, 0.0
        return (max(s["epsilon"] for s in self.sites.values()),
                max(s["delta"] for s in self.sites.values()))

    def exhausted(self, site: str) -> bool:
        """Whether ``site`` said so, or its spend on record (composed over accountant
        resets) has reached its budget."""
        s = self.sites.get(site)
        return bool(s and (s["exhausted"] or s["epsilon"] >= s["budget"]))

    def save(self) -> None:
        atomic_write_json(self.path, {"rounds": self.rounds, "sites": self.sites,
                                      "flags": self.flags, "client_level": self.client_level,
                                      "open_round": self.open_round,
                                      "interrupted": self.interrupted,
                                      "global": dict(zip(("epsilon", "delta"),
                                                         self.global_guarantee()))})

    def table(self) -> str:
        """A plain-text table of each site's spend and the global guarantee."""
        lines = [f"{'site':<16}{'epsilon':>10}{'budget':>10}{'delta':>10}{'steps':>8}"
                 f"{'examples':>10}  status"]
        for name in sorted(self.sites):
            s = self.sites[name]
            status = "exhausted" if self.exhausted(name) else "active"
            if s.get("resets"):
                status += f", {s['resets']} accountant reset(s) composed"
            lines.append(f"{name:<16}{s['epsilon']:>10.3f}{s['budget']:>10.3f}"
                         f"{s['delta']:>10.1e}{s['steps']:>8d}{s['examples']:>10d}  {status}")
        eps, delta = self.global_guarantee()
        lines.append(f"global (record-level, parallel composition): epsilon={eps:.3f} "
                     f"delta={delta:.1e} after {self.last_round} round(s)")
        if self.client_level:
            c = self.client_level
            lines.append(f"client-level (DP-FedAvg, one whole site): epsilon={c['epsilon']:.3f} "
                         f"delta={c['delta']:.1e} (noise z={c['noise_multiplier']:g}, clip "
                         f"{c['clip']:g}, {c['releases']} release(s))")
        return "\n".join(lines)


def _site_record(prev: dict[str, Any] | None, rep: SiteReport, server_round: int
                 ) -> tuple[dict[str, Any], str | None]:
    """A site's ledger record after its report ``rep``, and a flag when the report starts
    a new accountant history. ``epsilon``/``delta``: the site's spend on record, the closed
    histories' (``earlier_*``) plus the current one's (its last reported epsilon, the running
    maximum of its reported delta, ``reported_epsilon`` and ``history_delta``)."""
    earlier_eps, earlier_delta, resets, flag = 0.0, 0.0, 0, None
    hist_delta = rep.delta
    if prev is not None:
        earlier_eps = float(prev.get("earlier_epsilon", 0.0))
        earlier_delta = float(prev.get("earlier_delta", 0.0))
        resets = int(prev.get("resets", 0))
        last_eps = float(prev.get("reported_epsilon", prev["epsilon"]))
        last_delta = float(prev.get("history_delta", prev["delta"]))
        if rep.epsilon < last_eps or rep.steps < int(prev["steps"]):
            earlier_eps, earlier_delta = earlier_eps + last_eps, earlier_delta + last_delta
            resets += 1
            flag = (f"round {server_round}: site {rep.site} reported (epsilon {rep.epsilon:.4f}, "
                    f"{rep.steps} steps) below its earlier (epsilon {last_eps:.4f}, "
                    f"{prev['steps']} steps): its accountant was reset or replaced. The two "
                    "histories are composed (epsilon and delta summed): "
                    f"epsilon {earlier_eps + rep.epsilon:.4f}, "
                    f"delta {earlier_delta + rep.delta:.1e}")
        else:
            hist_delta = max(rep.delta, last_delta)
    return {**asdict(rep), "epsilon": earlier_eps + rep.epsilon,
            "delta": earlier_delta + hist_delta, "reported_epsilon": rep.epsilon,
            "history_delta": hist_delta, "earlier_epsilon": earlier_eps,
            "earlier_delta": earlier_delta, "resets": resets, "last_round": server_round}, flag


def read_ledger(path: str | Path) -> dict[str, Any]:
    """The ledger file's contents, checked against its schema: the one reader of
    ``ledger.json``, for the coordinator (:meth:`PrivacyLedger.load_or_create`) and the run
    report alike. A file that cannot be read, or lacks or garbles a field, is a
    :class:`StateError` naming it: a ledger is restored from backup, never started afresh."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateError(f"privacy ledger {path} is unreadable ({exc}); restore it from "
                         "backup - it must never be reset") from exc
    try:
        _check_schema(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"privacy ledger {path} lacks or garbles a field "
                         f"({type(exc).__name__}: {exc}); restore it from backup - it must "
                         "never be reset") from exc
    return data


def _check_schema(data: Any) -> None:
    """Raise (KeyError, TypeError, ValueError, AttributeError) unless ``data`` has the fields
    and types :meth:`PrivacyLedger.save` writes and its readers use."""
    if not isinstance(data["rounds"], list) or not isinstance(data["sites"], dict):
        raise TypeError("'rounds' must be a list and 'sites' an object")
    for entry in data["rounds"]:
        int(entry["round"]), float(entry["global_epsilon"]), float(entry["global_delta"])
        for rep in entry["sites"].values():
            float(rep["epsilon"])
        if entry.get("client_level") is not None:
            float(entry["client_level"]["epsilon"])
    for rep in data["sites"].values():
        float(rep["epsilon"]), float(rep["delta"]), float(rep["budget"])
    if data.get("client_level") is not None:
        float(data["client_level"]["epsilon"]), float(data["client_level"]["delta"])
    for entry in [data.get("open_round") or {"round": 0}, *data.get("interrupted", [])]:
        int(entry["round"])
