"""One self-contained report per run directory, rendered from what is on disk.

:func:`write_report` reads a run directory (federated: ``ledger.json``, ``metrics.jsonl``,
``samples_round_NNN.png``, ``adapter/privacy.json``; central: ``metrics.jsonl``,
``accountant.json``, ``adapter/privacy.json`` or ``model/privacy.json``,
``samples_before/after.png``; either: ``config.json`` and an optional ``evaluation.json``;
every ``privacy.json`` through its one reader,
:meth:`~dpfl.shared.privacy.guarantee.PrivacyGuarantee.from_file`) and writes
``RUN_DIR/report/``: ``report.md`` with its PNGs beside it and ``report.html`` with every
image embedded (one file to mail). Nothing is taken from a live process, so a report can
be re-rendered any time, also for a crashed or resumed run; a federation's coordinator
re-renders it as each round starts (``live``), and the page reloads itself until the run has
finished.

A file the report needs that is corrupt raises :class:`~dpfl.shared.errors.StateError`
naming it; a missing optional file is stated in the report. Callers at the end of a run
catch and log a failure: a report must never cost a run its results.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpfl.shared.errors import StateError
from dpfl.shared.privacy.auditrecord import AUDIT_JSON, read_audit
from dpfl.shared.report.render import Doc, flatten, read_json, read_records, write_doc
from dpfl.shared.rundir import versions

log = logging.getLogger(__name__)

REPORT_DIR = "report"
TITLES = {"federated": "federated DP-LoRA run", "central": "central DP-LoRA run",
          "run": "run"}


def run_kind(run_dir: Path, cfg: dict[str, Any]) -> str:
    """``federated``, ``central`` or ``run`` (anything else with a config or images)."""
    inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
    if ((run_dir / "ledger.json").exists() or "num_rounds" in inner
            or any(run_dir.glob("samples_round_*.png"))):
        return "federated"
    if "dp" in inner or (run_dir / "accountant.json").exists() \
            or (run_dir / "samples_before.png").exists():
        return "central"
    return "run"


def _load_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.exists():
        return {}
    cfg = read_json(path, "run configuration")
    if not isinstance(cfg, dict):
        raise StateError(f"run configuration {path} is not a JSON object")
    return cfg


def build_report(run_dir: str | Path, site_dirs: Mapping[str, str | Path] | None = None,
                 live: bool = False) -> Doc:
    """The report of ``run_dir`` as a document (its plots carry the series they draw).
    ``live``: rendered by a federation's coordinator between rounds (see
    :mod:`dpfl.shared.report.live`)."""
    from dpfl.shared.report.fed import federated_sections

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StateError(f"run directory {run_dir} does not exist")
    cfg = _load_config(run_dir)
    kind = run_kind(run_dir, cfg)
    if kind == "run" and not cfg and not any(run_dir.glob("*.png")):
        raise StateError(f"{run_dir} holds no dpfl run (no config.json, ledger.json, "
                         "accountant.json or images); give the run directory itself")
    if kind == "central":
        from dpfl.shared.report.central import (  # Opacus (seconds)
            central_sections,
            trains_whole_unet,
        )
    whole_unet = kind == "central" and trains_whole_unet(cfg)
    title = "central DP run of the whole UNet" if whole_unet else TITLES[kind]
    doc = Doc(f"dpfl {title}: {run_dir.resolve().name}")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc.p(f"Run directory {run_dir.resolve()}; started {cfg.get('started', 'unknown')}; "
          f"report rendered {now} from the files on disk.")
    if kind == "federated":
        federated_sections(doc, run_dir, site_dirs, cfg, live)
    elif kind == "central":
        central_sections(doc, run_dir, cfg, read_records(run_dir / "metrics.jsonl", "metrics"))
    else:
        for png in sorted(run_dir.glob("*.png")):
            doc.image(png, png.name)
    _evaluation(doc, run_dir)
    _audit(doc, run_dir)
    _configuration(doc, cfg)
    return doc


def write_report(run_dir: str | Path, site_dirs: Mapping[str, str | Path] | None = None,
                 live: bool = False) -> Path:
    """Render ``RUN_DIR/report/report.md`` and ``report.html``; returns the HTML's path.

    ``site_dirs`` (site name -> site state directory) adds the sites' local training losses
    to a federated report; only an operator who holds those directories can pass them.
    ``live``: the federation's coordinator renders it between rounds; until the run has
    finished, the HTML page then reloads itself (the run's state is read from disk).
    """
    doc = build_report(run_dir, site_dirs, live)
    path = write_doc(doc, Path(run_dir) / REPORT_DIR)
    log.info("report written: %s", path)
    return path


def try_write_report(run_dir: str | Path, site_dirs: Mapping[str, str | Path] | None = None,
                     live: bool = False) -> Path | None:
    """:func:`write_report` for the end of a run, or between a federation's rounds
    (``live``): a failure is logged as a warning and returns None, so a report can never
    cost a run its results (all already on disk)."""
    try:
        return write_report(run_dir, site_dirs, live)
    except Exception as exc:  # noqa: BLE001 - any failure; the run's files are untouched
        log.warning("could not write the report of %s (%s: %s); re-render it with "
                    "`dpfl-server report %s`", run_dir, type(exc).__name__, exc, run_dir)
        return None


def _png_refs(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in _png_refs(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in _png_refs(v)]
    return [obj] if isinstance(obj, str) and obj.lower().endswith(".png") else []


def _evaluation_files(run_dir: Path) -> list[Path]:
    """``evaluation.json`` in the run directory or one folder below it (``--out RUN/eval``)."""
    found = [run_dir / "evaluation.json"] + sorted(run_dir.glob("*/evaluation.json"))
    return [p for p in found if p.is_file() and p.parent.name != REPORT_DIR]


def _find_png(ref: str, where: Path, run_dir: Path) -> Path | None:
    ref_path = Path(ref)
    for cand in (ref_path if ref_path.is_absolute() else where / ref_path,
                 where / ref_path.name, ref_path, run_dir / ref_path):
        if cand.is_file():
            return cand
    return None


def _metric_rows(data: dict[str, Any]) -> list[tuple[str, Any]]:
    """Top-level scalars, and the numbers one level down (settings sections left out)."""
    rows = [(k, v) for k, v in data.items() if isinstance(v, (int, float, str, bool))
            and not str(v).lower().endswith(".png")]
    return rows + [(f"{k}.{kk}", vv) for k, v in data.items()
                   if isinstance(v, dict) and k not in ("config", "versions")
                   for kk, vv in v.items()
                   if isinstance(vv, (int, float)) and not isinstance(vv, bool)]


def _evaluation(doc: Doc, run_dir: Path) -> None:
    """Each evaluation.json: its scalar fields (numbers one level down) and the PNGs it names.
    The schema belongs to ``dpfl.shared.eval.evaluate``; only its shape is assumed here."""
    for path in _evaluation_files(run_dir):
        data = read_json(path, "evaluation results")
        doc.h(f"Evaluation ({path.relative_to(run_dir)})")
        if not isinstance(data, dict):
            doc.p(f"{path.name} holds no JSON object; nothing to show.", note=True)
            continue
        doc.table(["metric", "value"], _metric_rows(data))
        for ref in dict.fromkeys(_png_refs(data)):
            png = _find_png(ref, path.parent, run_dir)
            if png is None:
                doc.p(f"{path.name} refers to {ref}, which does not exist.", note=True)
            else:
                doc.image(png, f"{path.parent.name}/{png.name}" if path.parent != run_dir
                          else png.name)


def _audit(doc: Doc, run_dir: Path) -> None:
    """Claimed ε beside the audit's lower bound ε̂, and the attack's ROC (``dpfl-client
    audit``), when the run directory holds an audit record."""
    rec = read_audit(run_dir)
    if rec is None:
        return
    w, m = rec.get("whitebox", {}), rec.get("mia", {})
    noise = w.get("noise_check", {})
    doc.h("Empirical privacy audit")
    doc.p(rec.get("note", ""), note=True)
    doc.table(["claimed ε", "δ", "ε̂ (one run, white box)", "confidence", "ε at measured noise",
               "MIA TPR @ 1% FPR", "MIA AUC"],
              [[w.get("claimed_epsilon"), w.get("delta"), w.get("epsilon_lower_bound"),
                w.get("confidence"), noise.get("epsilon_at_sigma_upper"),
                m.get("tpr_at_fpr", {}).get("0.01"), m.get("auc")]])
    if w.get("epsilon_lower_bound", 0) > w.get("claimed_epsilon", float("inf")):
        doc.p("ε̂ exceeds the claimed ε: the mechanism as built leaks more than its "
              "accountant says. Do not release what it trained.", note=True)
    doc.p(f"White box: {w.get('canaries')} Dirac gradient canaries through the real DP-SGD "
          f"path (Steinke, Nasr and Jagielski, NeurIPS 2023), {w.get('steps')} steps at q = "
          f"{w.get('sample_rate')}, σ = {w.get('sigma')}. Black box: loss-threshold membership "
          f"inference on the released adapter, {m.get('members')} members vs "
          f"{m.get('heldout')} held-out images. {rec.get('seconds')} s.")
    roc = run_dir / Path(AUDIT_JSON).parent / "mia_roc.png"
    if roc.exists():
        doc.image(roc, "ROC of the loss-threshold membership-inference attack (log-log).")


def _configuration(doc: Doc, cfg: dict[str, Any]) -> None:
    doc.h("Configuration")
    if not cfg:
        doc.p("No config.json in the run directory.", note=True)
    else:
        extra = {k: v for k, v in cfg.items() if k not in ("config", "versions")}
        # a key resolved at run time (the base model's fingerprint) is listed once, with
        # its resolved value, not again as the config's empty placeholder
        inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
        inner = {k: v for k, v in inner.items() if k not in extra}
        doc.table(["key", "value"], flatten(extra) + flatten(inner))
    doc.h("Versions")
    run_versions = cfg.get("versions") if isinstance(cfg.get("versions"), dict) else {}
    now = versions()
    names = list(run_versions) + [n for n in now if n not in run_versions]
    doc.table(["package", "run", "report renderer"],
              [[n, run_versions.get(n, ""), now.get(n, "")] for n in names])
