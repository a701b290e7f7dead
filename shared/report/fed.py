"""Report sections of a federated run directory (written by ``dpfl.server.rounds``).

Read from disk only: ``ledger.json`` (the coordinator's privacy ledger, the authority on ε),
``metrics.jsonl`` (one line per released round: accepted/rejected counts),
``samples_round_NNN.png`` and ``adapter/privacy.json``. Training losses are not released to
the coordinator; they are drawn only from site state directories (``rounds.jsonl``) passed
in explicitly by an operator who holds them (the simulation does). The run's state, each
site's ε this run beside its lifetime ε, and the rounds whose spend may not be on record come
from :mod:`dpfl.shared.report.live`; the coordinator re-renders the report as each round
starts, and while the run goes on the page reloads itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpfl.shared.errors import ConfigError, StateError
from dpfl.shared.federation.ledger import read_ledger
from dpfl.shared.privacy.guarantee import COVERS, DOES_NOT_COVER, PrivacyGuarantee
from dpfl.shared.report.live import (
    MAY_HAVE_SPENT_MORE,
    SPEND_HEADERS,
    THIS_RUN_VS_LIFETIME,
    run_state,
    site_spend,
    spend_rows,
    unrecorded,
)
from dpfl.shared.report.render import Doc, Plot, Series, read_records

PARALLEL = ("Every record lives at exactly one site, so by parallel composition the global "
            "model is (max_i ε_i, max_i δ_i)-DP at the record level, where ε_i is site i's "
            "cumulative spend from its own accountant over all its rounds.")


def load_ledger(path: Path) -> dict[str, Any] | None:
    """The ledger's contents, schema-checked by its one reader
    (:func:`~dpfl.shared.federation.ledger.read_ledger`); None if there is none yet."""
    if not path.exists():
        return None
    return read_ledger(path)


def _last_per_round(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per round: a re-run round (crash before release) counts at its last record."""
    out: dict[int, dict[str, Any]] = {}
    for entry in rounds:
        out[int(entry["round"])] = entry
    return [out[r] for r in sorted(out)]


def epsilon_series(ledger: dict[str, Any]) -> list[Series]:
    """Per-site cumulative ε after each round (from a site's first report on, carried over
    rounds it sat out), each site's budget (dashed) and the global ε, all from the ledger."""
    rounds = _last_per_round(ledger["rounds"])
    names = sorted(ledger["sites"])
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    known: dict[str, float] = {}
    xs: dict[str, list[float]] = {n: [] for n in names}
    ys: dict[str, list[float]] = {n: [] for n in names}
    for entry in rounds:
        known.update({s: float(v["epsilon"]) for s, v in entry["sites"].items()})
        for s, eps in known.items():
            xs.setdefault(s, []).append(entry["round"])
            ys.setdefault(s, []).append(eps)
    series = [Series(f"ε {n}", xs[n], ys[n], color=colors.get(n)) for n in names if xs[n]]
    span = [rounds[0]["round"], rounds[-1]["round"]] if rounds else [0, 1]
    budgets = {n: float(ledger["sites"][n]["budget"]) for n in names}
    if len(set(budgets.values())) == 1:
        budget = budgets[names[0]]
        series.append(Series(f"budget (every site, ε = {budget:g})", span, [budget] * 2,
                             style="dashed", color="grey"))
    else:
        series += [Series(f"budget {n}", span, [b, b], style="dashed", color=colors[n])
                   for n, b in budgets.items()]
    series.append(Series("global ε (max over sites)", [e["round"] for e in rounds],
                         [float(e["global_epsilon"]) for e in rounds], style="wide",
                         color="black"))
    return series


def _no_rounds(doc: Doc, ledger: dict[str, Any] | None, live: bool) -> None:
    """The guarantee section before any round's replies reached the ledger."""
    if ledger is None:
        doc.p("No privacy ledger (ledger.json) yet: this coordinator has not sent a round to "
              "any site (the ledger is written before a round's instructions go out), and "
              "nothing trained on private data was released.", note=True)
        return
    lost = unrecorded(ledger, live)
    doc.p("No round's replies have reached the privacy ledger yet: nothing trained on private "
          "data was released" + (", but rounds were sent to sites:" if lost else "."),
          note=True)
    doc.bullets(lost)
    if lost:
        doc.p(MAY_HAVE_SPENT_MORE, note=True)


def _spend(doc: Doc, ledger: dict[str, Any] | None, cfg: dict[str, Any],
           site_dirs: Mapping[str, str | Path] | None, live: bool) -> None:
    """Each site's ε this run beside its lifetime ε, and the rounds whose spend may not
    (all) be on the ledger."""
    if ledger is None or not ledger["rounds"]:
        return
    doc.h("Privacy spend per site: this run and lifetime")
    doc.table(SPEND_HEADERS, spend_rows(site_spend(ledger, cfg, site_dirs)))
    doc.p(THIS_RUN_VS_LIFETIME)
    lost = unrecorded(ledger, live)
    if lost:
        doc.p("Rounds whose spend may not all be on this ledger:", note=True)
        doc.bullets(lost)
    doc.p(MAY_HAVE_SPENT_MORE, note=True)


def _guarantee(doc: Doc, run_dir: Path, ledger: dict[str, Any] | None, live: bool) -> None:
    doc.h("Privacy guarantee")
    if ledger is None or not ledger["rounds"]:
        _no_rounds(doc, ledger, live)
        return
    sites = ledger["sites"]
    eps = max(float(s["epsilon"]) for s in sites.values())
    delta = max(float(s["delta"]) for s in sites.values())
    last = int(ledger["rounds"][-1]["round"])
    doc.p(f"Global guarantee after {last} round(s): (ε = {eps:.3f}, δ = {delta:.1e}). {PARALLEL}")
    doc.p("What it covers:")
    doc.bullets(COVERS)
    doc.p("What it does not cover:")
    doc.bullets(DOES_NOT_COVER)
    doc.table(["site", "ε", "budget", "δ", "steps", "examples", "σ", "q", "last round",
               "status"],
              [[n, float(s["epsilon"]), float(s["budget"]), f"{float(s['delta']):.1e}",
                s.get("steps"), s.get("examples"), s.get("sigma"), s.get("sample_rate"),
                s.get("last_round"), "exhausted" if s.get("exhausted") else "active"]
               for n, s in sorted(sites.items())])
    _client_level(doc, ledger)
    if ledger.get("flags"):
        doc.p("The ledger flagged:", note=True)
        doc.bullets([str(f) for f in ledger["flags"]])
    _final_adapter(doc, run_dir, eps, last)


def client_level_series(ledger: dict[str, Any]) -> list[Series]:
    """Client-level (DP-FedAvg) ε after each round and its budget, when the ledger has it."""
    rounds = [e for e in _last_per_round(ledger["rounds"]) if e.get("client_level")]
    if not rounds:
        return []
    xs = [e["round"] for e in rounds]
    budget = float(rounds[-1]["client_level"].get("budget", math.nan))
    return [Series("client-level ε", xs, [float(e["client_level"]["epsilon"]) for e in rounds],
                   color="C4"),
            Series("client-level budget", [xs[0], xs[-1]], [budget, budget], style="dashed",
                   color="C4")]


def _client_level(doc: Doc, ledger: dict[str, Any]) -> None:
    c = ledger.get("client_level")
    if not isinstance(c, dict):
        return
    doc.p(f"Client-level guarantee (DP-FedAvg at the coordinator; protects a whole site's "
          f"participation): (ε = {float(c['epsilon']):.3f}, δ = {float(c['delta']):.1e}) after "
          f"{c.get('releases')} noised release(s), noise multiplier z = "
          f"{c.get('noise_multiplier')}, clip S = {c.get('clip')}, budget ε = {c.get('budget')}.")
    series = client_level_series(ledger)
    if series:
        doc.plot(Plot("plot_client_level_epsilon.png", "client-level ε (DP-FedAvg)", "round",
                      "ε", series, integer_x=True, zero_y=True),
                 "Client-level ε after each round; dashed: its budget.")


def _final_adapter(doc: Doc, run_dir: Path, eps: float, last: int) -> None:
    path = run_dir / "adapter" / "privacy.json"
    if not path.exists():
        doc.p("No final adapter yet (adapter/privacy.json is missing): the run has not finished "
              "or stopped early; the guarantee above covers every round recorded so far.",
              note=True)
        return
    try:
        final = PrivacyGuarantee.from_file(path)  # also the privacy.json of older dpfl
    except ConfigError as exc:
        raise StateError(f"final adapter's privacy record is unreadable: {exc}") from exc
    f_eps, f_rounds = final.epsilon, final.rounds
    if f_rounds == last and f_eps is not None and math.isclose(f_eps, eps):
        doc.p("The final adapter (adapter/, privacy.json) carries this guarantee.")
    else:
        doc.p(f"adapter/privacy.json states ε = {f_eps} after {f_rounds} round(s), but the "
              f"ledger holds ε = {eps:.4f} after {last}: the ledger is ahead of the released "
              "adapter (a round was recorded but not released, e.g. after a crash); the "
              "ledger's value is the one to state.", note=True)


def _rounds(doc: Doc, ledger: dict[str, Any] | None, metrics: list[dict[str, Any]]) -> None:
    if ledger is None or not ledger["rounds"]:
        return
    doc.h("Privacy spend over rounds")
    doc.plot(Plot("plot_epsilon.png", "ε per site and global ε", "round", "ε",
                  epsilon_series(ledger), integer_x=True, zero_y=True),
             "Cumulative ε per site (from the ledger) and the global ε; dashed: budgets.")
    released = {int(m["round"]): m for m in metrics if "round" in m}
    names = sorted(ledger["sites"])
    rows = []
    for e in ledger["rounds"]:
        m = released.get(int(e["round"]), {})
        rej = e.get("rejected") or {}
        rows.append([e["round"], "yes" if e.get("rerun") else "", float(e["global_epsilon"]),
                     f"{float(e['global_delta']):.1e}",
                     *[e["sites"][n]["epsilon"] if n in e["sites"] else "" for n in names],
                     m.get("accepted", "not released"), len(rej)])
    doc.table(["round", "re-run", "global ε", "global δ", *[f"ε {n}" for n in names],
               "accepted", "rejected"], rows)
    counts = [(int(m["round"]), int(m.get("accepted", 0)), len(m.get("rejected") or {}))
              for m in released.values()]
    if counts:
        counts.sort()
        doc.plot(Plot("plot_updates.png", "site updates per round", "round", "updates",
                      [Series("accepted", [c[0] for c in counts], [c[1] for c in counts],
                              color="C2"),
                       Series("rejected", [c[0] for c in counts], [c[2] for c in counts],
                              color="C3")], bars=True, integer_x=True),
                 "Updates aggregated (accepted) and rejected (validation or no reply).")
    doc.table(["round", "site / update", "reason rejected"],
              [[e["round"], k, v] for e in ledger["rounds"]
               for k, v in sorted((e.get("rejected") or {}).items())])


def _match_rounds(records: list[dict[str, Any]], points: list[tuple[int, float]]
                  ) -> list[int | None]:
    """The federation round of each local record, matched by the ε the site reported."""
    out: list[int | None] = []
    for r in records:
        eps = r.get("epsilon")
        hit = [rnd for rnd, e in points
               if isinstance(eps, (int, float)) and math.isclose(e, eps, rel_tol=1e-9)]
        out.append(hit[-1] if hit else None)
    return out


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def site_losses(site_dirs: Mapping[str, str | Path], ledger: dict[str, Any] | None
                ) -> tuple[list[Series], list[list[Any]], list[str]]:
    """Mean training loss per round from each site's ``rounds.jsonl`` (series, rows, notes)."""
    series: list[Series] = []
    rows: list[list[Any]] = []
    notes: list[str] = []
    for i, (name, folder) in enumerate(sorted(site_dirs.items())):
        path = Path(folder) / "rounds.jsonl"
        records = read_records(path, f"site {name}'s round log")
        if not records:
            notes.append(f"site {name}: no {path}")
            continue
        points = [(int(e["round"]), float(e["sites"][name]["epsilon"]))
                  for e in (ledger or {}).get("rounds", []) if name in e["sites"]]
        rounds = _match_rounds(records, points)
        if any(r is not None for r in rounds):
            other = sum(r is None for r in rounds)
            if other:
                notes.append(f"site {name}: {other} local round(s) not in this federation's "
                             "ledger (an earlier run of the same site) are left out")
            xs: list[tuple[int, dict[str, Any]]] = [
                (r, rec) for r, rec in zip(rounds, records) if r is not None]
        else:
            notes.append(f"site {name}: no local round matches this ledger's ε for {name}; "
                         "rounds are numbered locally (1, 2, ...)")
            xs = [(j + 1, rec) for j, rec in enumerate(records)]
        series.append(Series(name, [x for x, _ in xs],
                             [_num(rec.get("mean_loss")) for _, rec in xs], color=f"C{i % 10}"))
        rows += [[name, x, rec.get("steps"), rec.get("epsilon"), rec.get("mean_loss")]
                 for x, rec in xs]
    return series, rows, notes


def _losses(doc: Doc, ledger: dict[str, Any] | None,
            site_dirs: Mapping[str, str | Path] | None) -> None:
    doc.h("Training loss")
    if not site_dirs:
        doc.p("Sites keep their training loss local on purpose: it is computed on private data "
              "without noise and is never sent to the coordinator (it stays in each site's "
              "state/rounds.jsonl). Re-render with `dpfl-server report RUN_DIR --site "
              "NAME=STATE_DIR` where the site state directories are at hand.")
        return
    doc.p("Site-local training loss (non-private diagnostics from the sites' own "
          "state/rounds.jsonl): this report must not leave the sites' trust boundary.",
          note=True)
    series, rows, notes = site_losses(site_dirs, ledger)
    if series:
        doc.plot(Plot("plot_site_loss.png", "mean training loss per round at each site",
                      "round", "mean loss", series, integer_x=True),
                 "Mean DP-SGD training loss per round.")
    doc.table(["site", "round", "steps", "ε after", "mean loss"], rows)
    doc.bullets(notes)


def _grids(doc: Doc, run_dir: Path) -> None:
    found = []
    for path in run_dir.glob("samples_round_*.png"):
        m = re.fullmatch(r"samples_round_(\d+)\.png", path.name)
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        return
    doc.h("Sample grids per round")
    for rnd, path in sorted(found):
        doc.image(path, "base model (round 0)" if rnd == 0 else
                  f"global model after round {rnd}")


def federated_sections(doc: Doc, run_dir: Path,
                       site_dirs: Mapping[str, str | Path] | None = None,
                       cfg: dict[str, Any] | None = None, live: bool = False) -> None:
    """The run's state, guarantee, ε this run and lifetime, ε over rounds, accepted/rejected,
    (site) losses and grids of a federation. ``live``: rendered by the running coordinator
    between rounds; unless the run has finished, the page then reloads itself."""
    ledger = load_ledger(run_dir / "ledger.json")
    metrics = read_records(run_dir / "metrics.jsonl", "round metrics")
    state = run_state(run_dir, ledger, cfg or {}, live)
    doc.refresh_s = state.refresh_s
    if state.kind == "live":
        doc.title += f" (live: {state.recorded}" + (
            f" of {state.planned}" if state.planned else "") + " rounds recorded)"
    doc.h("Run status")
    doc.p(state.text, note=state.kind != "finished")
    _spend(doc, ledger, cfg or {}, site_dirs, live)
    _guarantee(doc, run_dir, ledger, live)
    _rounds(doc, ledger, metrics)
    _losses(doc, ledger, site_dirs)
    _grids(doc, run_dir)
