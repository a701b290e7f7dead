"""What a federated run's report says while the run goes on: its state, what each site spent
in this run beside its lifetime spend, and the rounds whose spend may not be on record.

- **State** (:func:`run_state`): *finished* when ``adapter/privacy.json`` covers the ledger's
  last round and no round is open; otherwise *in progress* when the coordinator renders the
  report between rounds (``live``; the page then reloads itself every :data:`REFRESH_S` s)
  and *not finished* when anyone else renders it (a report cannot tell a running coordinator
  from a stopped one, so it says both).
- **This run vs lifetime** (:func:`site_spend`): a site reports its *lifetime* ε (its
  persistent accountant covers every round it ever trained). This run's spend is the ε on
  the ledger minus the lifetime ε the site held before this run's first round. No report from
  before that round is on this run's ledger, so the start is derived, exactly, from (1) a
  first report that counts exactly one round's steps (a site new to training: the start is
  0), or, when every round this run sent up to then is on the ledger (none interrupted or
  unanswered), from (2) a first report of a round the site did not train (it *is* the
  start) or (3) the site's own round log, when its state directory is at hand. Otherwise it
  is not known, and the whole lifetime ε is counted as this run's: never less than recorded.
- **Unrecorded rounds** (:func:`unrecorded`): rounds sent but never recorded (the ledger's
  ``open_round`` and ``interrupted``), rounds re-run, and sites that did not answer in time:
  a site may have spent more than its last report.

Reads only what the ledger (:mod:`dpfl.shared.federation.ledger`) and the run's config hold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfl.shared.errors import ConfigError
from dpfl.shared.privacy.guarantee import PrivacyGuarantee
from dpfl.shared.report.render import read_records

#: seconds between reloads of a live report page
REFRESH_S = 15

THIS_RUN_VS_LIFETIME = (
    "Lifetime ε is what the site's own persistent accountant reported last: it covers every "
    "round the site ever trained, in this run, earlier runs and local training, and the global "
    "guarantee is the maximum over the sites of their ε on record. ε this run is how much this "
    "run raised it: the ε on record minus the site's lifetime ε before this run's first round. "
    "They differ when a site spent ε before this run. Spend does not add up across runs (DP "
    "composition is sub-additive), so this run's share is not a guarantee of its own; where the "
    "start is not known, the whole lifetime ε is counted as this run's. The ε on record "
    "exceeds the lifetime ε only after an accountant reset (both histories are added).")

MAY_HAVE_SPENT_MORE = (
    "Sites may have spent more ε than their last report here shows: a site that trained a "
    "round whose reply never reached this ledger (a reply later than the round timeout or "
    "lost, a coordinator stopped with `flwr stop`, crashed or restarted mid-round) spent it on "
    "its own accountant only. Each site's `dpfl-client status --state-dir DIR` shows its "
    "full spend.")


@dataclass(frozen=True)
class RunState:
    """``finished``, ``live`` (the coordinator is between rounds) or ``stopped`` (not
    finished, rendered outside the coordinator), with the sentence that says so."""

    kind: str
    text: str
    recorded: int  # rounds with replies on the ledger
    planned: int | None  # num_rounds of the run's config

    @property
    def refresh_s(self) -> int:
        return REFRESH_S if self.kind == "live" else 0


def _sent(entry: Mapping[str, Any]) -> str:
    """``sent to SITES at TIME`` of a ledger's ``open_round`` or ``interrupted`` entry."""
    return (f"sent to {', '.join(entry.get('sites', [])) or 'no site'} at "
            f"{entry.get('sent', '?')}")


def _finished(run_dir: Path, ledger: dict[str, Any] | None) -> bool:
    """Whether the final adapter's privacy.json covers the ledger's last round (and no
    round is open): the coordinator writes it once, after its last round."""
    path = run_dir / "adapter" / "privacy.json"
    if not path.exists() or (ledger or {}).get("open_round"):
        return False
    try:
        final = PrivacyGuarantee.from_file(path)
    except ConfigError:
        return False  # the guarantee section names the unreadable file
    last = int(ledger["rounds"][-1]["round"]) if ledger and ledger["rounds"] else 0
    return final.rounds == last


def run_state(run_dir: Path, ledger: dict[str, Any] | None, cfg: Mapping[str, Any],
              live: bool) -> RunState:
    """Where the run stands, from the files on disk (``live``: rendered by the running
    coordinator between rounds)."""
    inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
    planned = inner.get("num_rounds") if isinstance(inner.get("num_rounds"), int) else None
    rounds = {int(e["round"]) for e in (ledger or {}).get("rounds", [])}
    done = f"{len(rounds)}" + (f" of {planned}" if planned else "") + " round(s) recorded"
    if rounds and ledger:
        g = ledger["rounds"][-1]
        done += (f", global ε {float(g['global_epsilon']):.3f} (δ "
                 f"{float(g['global_delta']):.1e})")
    sent = (ledger or {}).get("open_round")
    now = f"; round {sent['round']} was {_sent(sent)}" if sent else ""
    if _finished(run_dir, ledger):
        return RunState("finished", f"Finished: {done}; the final adapter (adapter/) is "
                        "written. This page no longer reloads itself.", len(rounds), planned)
    if live:
        timeout = inner.get("round_timeout")
        stale = (f" A round ends within its timeout ({timeout:g} s): a page whose render time "
                 "stays unchanged much longer means the coordinator stopped."
                 if isinstance(timeout, (int, float)) else "")
        return RunState("live", f"In progress: {done}{now}. The coordinator re-renders this "
                        f"report as each round starts; the page reloads itself every "
                        f"{REFRESH_S} s until the run has finished.{stale}", len(rounds),
                        planned)
    return RunState("stopped", f"Not finished: {done}{now}; no final adapter yet. Either the "
                    "coordinator is still running (this copy was rendered outside it, e.g. by "
                    "`dpfl-server report`) or it was stopped, crashed or restarted; a restarted "
                    "coordinator resumes after the last released round. This page does not "
                    "reload itself.", len(rounds), planned)


@dataclass(frozen=True)
class SiteSpend:
    """One site's spend: this run's, its lifetime (last report) and on record (ledger)."""

    site: str
    this_run: float
    lifetime: float
    on_record: float
    budget: float
    rounds: int  # rounds this run's ledger holds a report of the site for
    exact: bool  # whether the start of this run is known (else the lifetime counts)
    how: str


def _local_epochs(cfg: Mapping[str, Any]) -> int:
    inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
    epochs = inner.get("local_epochs", 1)
    return epochs if isinstance(epochs, int) and epochs >= 1 else 1


def _from_site_log(records: list[dict[str, Any]], reported: float) -> float | None:
    """The lifetime ε before the round whose local record reports ``reported`` after it."""
    for rec in records:
        eps, added = rec.get("epsilon"), rec.get("epsilon_round")
        if isinstance(eps, (int, float)) and isinstance(added, (int, float)) \
                and math.isclose(eps, reported, rel_tol=1e-9):
            return max(float(eps) - float(added), 0.0)
    return None


def _all_on_record(ledger: dict[str, Any], upto: int) -> bool:
    """Whether every round this run sent up to round ``upto`` is on the ledger with a report
    from every site that may have trained it: none interrupted (a ledger older dpfl wrote
    cannot say), none unanswered, no reply without a report."""
    if "interrupted" not in ledger or any(int(i["round"]) <= upto
                                          for i in ledger["interrupted"]):
        return False
    return all(k in e["sites"] for e in ledger["rounds"] if int(e["round"]) <= upto
               for k in (e.get("rejected") or {}))


def _start(first_round: int, first: dict[str, Any], epochs: int, clean: bool,
           records: list[dict[str, Any]]) -> tuple[float | None, str]:
    """The site's lifetime ε before this run's first round, and how it is known. Only a
    report that counts exactly one round's steps proves a start of 0 whatever happened
    before it; the other two ways need every earlier round of this run on record
    (``clean``), or an unrecorded attempt the site trained would be counted as before it."""
    reported = float(first.get("reported_epsilon", first["epsilon"]))
    steps, q = int(first.get("steps", -1)), float(first.get("sample_rate", 0.0))
    one_round = epochs * int(1 / q) if 0 < q <= 1 else None
    if first.get("trained") is not False and one_round is not None and steps == one_round:
        return 0.0, (f"new to training: its first report (round {first_round}) counts one "
                     f"round's {steps} steps, so it held no ε before this run")
    if clean and first.get("trained") is False:
        return reported, (f"its first report (round {first_round}) trained nothing: the "
                          "lifetime ε it held before this run")
    from_log = _from_site_log(records, reported) if clean else None
    if from_log is not None:
        return from_log, f"the site's own round log: lifetime ε {from_log:.4g} before round " \
                         f"{first_round}"
    return None, (f"not known: its first report (round {first_round}) counts {steps} steps, "
                  f"not one round's {one_round}: ε spent before this run" + (
                      "" if clean else ", or in an attempt at a round this run sent that "
                      "is not on the ledger,") + " is not on this ledger, so the whole "
                  "lifetime ε is counted")


def site_spend(ledger: dict[str, Any], cfg: Mapping[str, Any],
               site_dirs: Mapping[str, str | Path] | None = None) -> list[SiteSpend]:
    """Each site's ε this run and lifetime, from this run's ledger (and, where given, the
    site's own ``rounds.jsonl``); conservative: never less than the ledger records."""
    out = []
    for name, site in sorted(ledger["sites"].items()):
        reports = [(int(e["round"]), e["sites"][name]) for e in ledger["rounds"]
                   if name in e["sites"]]
        if not reports:
            continue
        records = (read_records(Path(site_dirs[name]) / "rounds.jsonl",
                                f"site {name}'s round log")
                   if site_dirs and name in site_dirs else [])
        start, how = _start(*reports[0], _local_epochs(cfg),
                            _all_on_record(ledger, reports[0][0]), records)
        on_record = float(site["epsilon"])
        since_first = on_record - float(reports[0][1]["epsilon"])
        if start is None:
            how += f" (at least {since_first:.4g} was spent after round {reports[0][0]})"
        this_run = on_record if start is None else max(on_record - start, since_first, 0.0)
        out.append(SiteSpend(name, this_run,
                             float(site.get("reported_epsilon", site["epsilon"])), on_record,
                             float(site["budget"]), len(reports), start is not None, how))
    return out


def spend_rows(spend: list[SiteSpend]) -> list[list[Any]]:
    """Rows of the per-site table: a this-run value not known exactly is marked ≤."""
    return [[s.site, s.this_run if s.exact else f"≤ {s.this_run:.4g}", s.lifetime,
             s.on_record, s.budget, s.rounds, s.how] for s in spend]


SPEND_HEADERS = ["site", "ε this run", "ε lifetime (last report)", "ε on record (ledger)",
                 "budget", "rounds reported", "how this run's ε is known"]


def unrecorded(ledger: dict[str, Any] | None, live: bool) -> list[str]:
    """One line per round whose spend may not be (all) on the ledger: interrupted, re-run,
    still open, or with sampled sites that did not answer in time."""
    if ledger is None:
        return []
    rerun = sorted({int(e["round"]) for e in ledger["rounds"] if e.get("rerun")})
    lines = [f"Round {i['round']}: {_sent(i)}; "
             f"{i.get('reason', 'no reply reached the ledger')}."
             for i in ledger.get("interrupted", [])]
    lines += [f"Round {r} was run more than once (re-run after an interrupted attempt or a "
              "coordinator restart): the sites trained it again and spent ε for each attempt "
              "they trained." for r in rerun]
    for e in ledger["rounds"]:
        lines += [f"Round {e['round']}: {k.strip('<>')} ({v}): those sites may have trained."
                  for k, v in sorted((e.get("rejected") or {}).items())
                  if k.startswith("<") and "unanswered" in k]
    sent = ledger.get("open_round")
    if sent:
        lines.append(f"Round {sent['round']}: {_sent(sent)}; " + (
                         "in progress, replies awaited." if live else
                         "no reply has reached the ledger: the coordinator is still in this "
                         "round, or was stopped, crashed or restarted during it."))
    return lines
