"""``dpfl-client status``: what a site has spent, read from its state directory only.

A hospital's privacy officer asks "how much of our budget is spent, and by which runs?".
The answer has two sources, both in the site's ``state-dir``:

* ``accountant.json``, the site's lifetime ledger (:class:`PersistentAccountant`): the
  (σ, q, steps) history, δ, the ε budget (the node config's ``epsilon-budget``, stored at the
  first round and unchangeable afterwards). Lifetime ε is recomputed from it by Opacus; it is
  what counts against the budget.
* ``rounds.jsonl`` (:data:`dpfl.client.site.ROUNDS_LOG`), one line per round the site trained:
  Flower run id, server round, steps, lifetime ε after the round and the increase the round
  caused.

Per run it shows ``epsilon_added`` (how far the run moved lifetime ε) and ``epsilon_alone``
(the ε of that run's steps as if the site had never trained before: what the run's own
ledger states when it is the site's first). ε composes sub-additively, so neither adds up
across runs to the lifetime figure. Steps the accountant holds that no round line covers
(a round interrupted after its commit, which the accountant counts before training, or a
``dpfl-client train`` run on the same ledger) are shown as ``unrecorded_steps``.

Nothing here writes: the state directory is only read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfl.client.site import ROUNDS_LOG
from dpfl.shared.errors import ConfigError, StateError
from dpfl.shared.io import read_jsonl
from dpfl.shared.privacy.accountant import PersistentAccountant, epsilon_of

ACCOUNTANT_FILE = "accountant.json"


@dataclass(frozen=True)
class SiteStatus:
    """A site's spend: its ledger, its round records and their per-run summary."""

    state_dir: Path
    ledger: PersistentAccountant
    rounds: list[dict[str, Any]]

    @property
    def epsilon(self) -> float:
        return self.ledger.epsilon()

    def runs(self) -> list[dict[str, Any]]:
        """One summary per run, in the order the site first trained for it."""
        groups: dict[Any, list[dict[str, Any]]] = {}
        for rec in self.rounds:
            groups.setdefault(rec.get("run"), []).append(rec)
        out = []
        for run, recs in groups.items():
            history = [(float(r["sigma"]), float(r["sample_rate"]), int(r["steps"]))
                       for r in recs if _has_plan(r)]
            alone = self._epsilon_alone(history) if len(history) == len(recs) else None
            nums = [r.get("round") for r in recs]
            out.append({"run": run, "rounds": nums,
                        "retrained": sorted({n for i, n in enumerate(nums)
                                             if n is not None and n in nums[:i]}),
                        "steps": sum(int(r["steps"]) for r in recs),
                        "epsilon_added": sum(float(r.get("epsilon_round") or 0.0) for r in recs)
                        if all("epsilon_round" in r for r in recs) else None,
                        "epsilon_alone": alone,
                        "epsilon_after": float(recs[-1]["epsilon"]),
                        "first": recs[0].get("time"), "last": recs[-1].get("time")})
        return out

    def _epsilon_alone(self, history: list[tuple[float, float, int]]) -> float | None:
        try:
            return epsilon_of(history, self.ledger.delta, self.ledger.kind)
        except ConfigError:  # a record Opacus cannot account for (hand-edited): not shown
            return None

    def to_json(self) -> dict[str, Any]:
        eps, led = self.epsilon, self.ledger
        recorded = sum(int(r["steps"]) for r in self.rounds)
        return {"state_dir": str(self.state_dir), "accountant": str(led.path),
                "kind": led.kind, "delta": led.delta, "budget": led.budget, "epsilon": eps,
                "budget_left": max(led.budget - eps, 0.0), "steps": led.steps,
                "unrecorded_steps": max(led.steps - recorded, 0),
                "runs": self.runs(), "rounds": [_shown(r) for r in self.rounds]}


#: round-record fields status leaves out: the training loss is a non-private statistic of
#: the silo (it stays in rounds.jsonl); status output is about spend and may be passed on
_NOT_SHOWN = ("mean_loss",)


def _shown(rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` without :data:`_NOT_SHOWN`, non-finite numbers as None (strict JSON)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in rec.items() if k not in _NOT_SHOWN}


def _has_plan(rec: dict[str, Any]) -> bool:
    return all(isinstance(rec.get(k), (int, float)) for k in ("sigma", "sample_rate"))


def read_status(state_dir: str | Path) -> SiteStatus:
    """The spend recorded in ``state_dir``; :class:`ConfigError` when it is not a site's
    state directory, :class:`StateError` (naming the file) when its ledger or round log is
    corrupt. Reads only."""
    root = Path(state_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"state directory {root} does not exist or is not a directory; give "
                          "the site's state-dir (node config 'state-dir', 'dpfl-client join "
                          "--state-dir')")
    ledger_file = root / ACCOUNTANT_FILE
    if not ledger_file.is_file():
        raise ConfigError(f"{root} holds no {ACCOUNTANT_FILE}: not a site's state directory, "
                          "or the site has not trained yet (nothing spent)")
    ledger = PersistentAccountant.load(ledger_file)  # StateError when corrupt
    try:
        ledger.epsilon()
    except ConfigError as exc:
        raise StateError(f"privacy accountant state {ledger_file}: {exc}") from exc
    return SiteStatus(root, ledger, _read_rounds(root / ROUNDS_LOG))


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    """The site's round records (none when the file is absent), checked line by line."""
    if not path.exists():
        return []
    try:
        records = read_jsonl(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"round log {path} is unreadable or corrupt ({exc})") from exc
    for i, rec in enumerate(records, 1):
        ok = isinstance(rec, dict) and isinstance(rec.get("steps"), int) and rec["steps"] >= 0 \
            and isinstance(rec.get("epsilon"), (int, float)) and math.isfinite(rec["epsilon"])
        if not ok:
            raise StateError(f"round log {path}, line {i}: expected a JSON object with integer "
                             f"'steps' and numeric 'epsilon', got {str(rec)[:200]}")
    return records


# -- text -------------------------------------------------------------------------------
def _cell(v: Any, fmt: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, fmt or ".4f")
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in [header, *rows]]


def _rounds_span(rounds: list[Any]) -> str:
    """``1-3`` for rounds 1, 2, 3; otherwise every round as recorded (``1,2,2,3``)."""
    nums = [r for r in rounds if isinstance(r, int)]
    if len(nums) == len(rounds) > 1 and nums == list(range(nums[0], nums[-1] + 1)):
        return f"{nums[0]}-{nums[-1]}"
    return ",".join(_cell(r) for r in rounds)


def render_text(status: SiteStatus) -> str:
    """The status as a privacy officer reads it: lifetime spend, then runs, then rounds."""
    d = status.to_json()
    lines = [f"site state {d['state_dir']} (ledger {d['accountant']}, {d['kind']} accountant)",
             f"lifetime: epsilon {d['epsilon']:.4f} of budget {d['budget']:g} "
             f"(delta {d['delta']:g}), {d['budget_left']:.4f} left; {d['steps']} DP-SGD steps"]
    if d["unrecorded_steps"]:
        lines.append(f"  {d['unrecorded_steps']} step(s) in the ledger have no round record "
                     "(a round interrupted after its commit, or 'dpfl-client train' on this "
                     "ledger): they count in the lifetime epsilon")
    if not d["rounds"]:
        return "\n".join([*lines, "no round records (rounds.jsonl absent or empty)"]) + "\n"
    lines += ["", "runs (epsilon added: increase of lifetime epsilon; alone: the run's steps "
              "on their own):"]
    lines += _table(["run", "rounds", "steps", "eps added", "eps alone", "lifetime after",
                     "last round (UTC)"],
                    [[_cell(r["run"]), _rounds_span(r["rounds"]), str(r["steps"]),
                      _cell(r["epsilon_added"]), _cell(r["epsilon_alone"]),
                      _cell(r["epsilon_after"]), _cell(r["last"])] for r in d["runs"]])
    for r in d["runs"]:
        if r["retrained"]:
            lines.append(f"  run {_cell(r['run'])}: round(s) {r['retrained']} trained more than "
                         "once (a restarted round); each training counts")
    lines += ["", "rounds:"]
    lines += _table(["time (UTC)", "run", "round", "steps", "sigma", "q", "eps round",
                     "eps lifetime", "secure noise"],
                    [[_cell(r.get("time")), _cell(r.get("run")), _cell(r.get("round")),
                      str(r["steps"]), _cell(r.get("sigma"), ".4g"),
                      _cell(r.get("sample_rate"), ".4g"), _cell(r.get("epsilon_round")),
                      _cell(r["epsilon"]), _secure(r.get("secure_noise"))]
                     for r in d["rounds"]])
    return "\n".join(lines) + "\n"


def _secure(v: Any) -> str:
    return "-" if v is None else ("on" if v else "OFF")
