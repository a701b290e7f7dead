"""Report sections of a central DP-LoRA run directory (written by ``dpfl-client train``).

Read from disk only: ``metrics.jsonl`` (a line per DP step with the loss, per epoch with ε,
and a final line per run; a rerun in the same directory appends a new run whose steps count
from 1 again), the client's accountant state (the authority on ε: the curve is recomputed
by Opacus from its (σ, q, steps) history), the ``privacy.json`` the trained adapter or model
carries (``adapter/`` or ``model/``, checked against the accountant) and
``samples_before.png`` / ``samples_after.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dpfl.shared.errors import ConfigError, StateError
from dpfl.shared.privacy.accountant import PersistentAccountant, epsilon_of
from dpfl.shared.privacy.guarantee import COVERS, DOES_NOT_COVER, PrivacyGuarantee
from dpfl.shared.report.render import Doc, Plot, Series

#: points of the ε-over-steps curve (plus every run boundary); each is one accountant call,
#: about 0.5 s under PRV for a long history, and the curve is smooth and concave
CURVE_POINTS = 16


def split_runs(records: list[dict[str, Any]]) -> tuple[Series, Series, list[dict[str, Any]]]:
    """(loss per step, ε per epoch, final lines) with steps counted across runs."""
    loss_x, loss_y, eps_x, eps_y, finals = [], [], [], [], []
    offset = last = 0
    for r in records:
        if r.get("final"):
            finals.append(r)
            offset, last = offset + int(r.get("steps", last)), 0
            continue
        if not isinstance(r.get("step"), int):
            continue
        if r["step"] < last:  # a new run after one that stopped without its final line
            offset, last = offset + last, 0
        last = r["step"]
        if "loss" in r:
            loss_x.append(offset + r["step"])
            loss_y.append(float(r["loss"]))
        elif "epsilon" in r:
            eps_x.append(offset + r["step"])
            eps_y.append(float(r["epsilon"]))
    return (Series("loss per step", loss_x, loss_y, color="C0"),
            Series("ε logged per epoch", eps_x, eps_y, style="points", color="C1"), finals)


def epsilon_curve(acc: PersistentAccountant, points: int = CURVE_POINTS) -> Series:
    """ε after k steps, k = 0..all steps of the accountant's history (Opacus, at its δ)."""
    total = acc.steps
    ks = sorted({round(total * i / points) for i in range(points + 1)}
                | {sum(h[2] for h in acc.history[:j + 1]) for j in range(len(acc.history))})
    ys = []
    for k in ks:
        prefix, left = [], k
        for sigma, q, n in acc.history:
            if left <= 0:
                break
            prefix.append((sigma, q, min(n, left)))
            left -= n
        ys.append(epsilon_of(prefix, acc.delta, acc.kind))
    return Series(f"ε ({acc.kind} accountant)", [float(k) for k in ks], ys, color="C3")


def _accountant_path(run_dir: Path, cfg: dict[str, Any]) -> Path:
    given = ((cfg.get("config") or {}).get("job") or {}).get("accountant_file")
    if not given:
        return run_dir / "accountant.json"
    path = Path(given)
    return path if path.is_absolute() or path.exists() else run_dir / path


def _inner(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("config") if isinstance(cfg.get("config"), dict) else {}


def trains_whole_unet(cfg: dict[str, Any]) -> bool:
    """Whether a central run's config.json is a ``dpfl-client train-full`` run."""
    return _inner(cfg).get("mode") == "full"


def trained_part(cfg: dict[str, Any]) -> tuple[str, str, str]:
    """(what is DP, 'before' caption, 'after' caption) of a central run: the LoRA adapter
    (``dpfl-client train``) or the whole UNet (``dpfl-client train-full``)."""
    if trains_whole_unet(cfg):
        init = _inner(cfg).get("init", "scratch")
        start = "the random UNet (scratch)" if init == "scratch" else "the base model"
        return ("the whole UNet (RUN_DIR/model)", f"{start}, before DP training",
                "after DP training of every UNet parameter")
    return ("the adapter", "base model (before fine-tuning)", "with the DP-LoRA adapter (after)")


def _guarantee(doc: Doc, acc: PersistentAccountant | None, cfg: dict[str, Any],
               finals: list[dict[str, Any]], path: Path) -> None:
    doc.h("Privacy guarantee")
    if acc is None:
        last = finals[-1] if finals else None
        doc.p(f"No accountant state at {path}; " + (
            f"the last run's final line states ε = {last['epsilon']:.3f}, δ = {last['delta']:g}."
            if last else "no run finished, so there is no guarantee to state."), note=True)
        return
    examples = cfg.get("examples", "the")
    doc.p(f"(ε = {acc.epsilon():.3f}, δ = {acc.delta:g}) at the record level: "
          f"{trained_part(cfg)[0]} is "
          f"differentially private with respect to each of the {examples} examples of the silo. "
          f"ε is computed by Opacus' {acc.kind.upper()} accountant from the whole (σ, q, steps) "
          f"history in {path.name} ({acc.steps} DP-SGD steps, {len(finals)} finished run(s) "
          f"in this directory), against the client's budget of ε = {acc.budget:g}.")
    doc.table(["σ (noise multiplier)", "q (sample rate)", "steps"],
              [[float(s), float(q), int(n)] for s, q, n in acc.history])
    doc.p("What it covers:")
    doc.bullets(COVERS)
    doc.p("What it does not cover:")
    doc.bullets(DOES_NOT_COVER)


def _released(doc: Doc, run_dir: Path, cfg: dict[str, Any], acc: PersistentAccountant) -> None:
    """Whether the trained adapter's (or model's) ``privacy.json`` states the accountant's
    guarantee, or lags behind it (a run committed to the ledger but did not finish)."""
    rel = "model/privacy.json" if trains_whole_unet(cfg) else "adapter/privacy.json"
    if not (run_dir / rel).exists():
        doc.p(f"No {rel}: no run has finished here (or an older dpfl wrote this run); the "
              "accountant above is the authority.", note=True)
        return
    try:
        stated = PrivacyGuarantee.from_file(run_dir / rel)
    except ConfigError as exc:
        raise StateError(f"the trained part's privacy record is unreadable: {exc}") from exc
    eps = acc.epsilon()
    if stated.steps == acc.steps and stated.epsilon is not None \
            and math.isclose(stated.epsilon, eps):
        part = trained_part(cfg)[0]
        doc.p(f"{part[:1].upper()}{part[1:]} carries this guarantee ({rel}).")
    else:
        doc.p(f"{rel} states ε = {stated.epsilon} after {stated.steps} step(s), but the "
              f"accountant holds ε = {eps:.4f} after {acc.steps}: the ledger is ahead of "
              "what was released (steps were committed but the run did not finish); the "
              "accountant's value is the one to state.", note=True)


def _runs_table(doc: Doc, finals: list[dict[str, Any]]) -> None:
    doc.table(["run", "steps", "σ", "q", "ε after", "δ", "mean loss"],
              [[i + 1, f.get("steps"), f.get("sigma"), f.get("sample_rate"), f.get("epsilon"),
                f.get("delta"), f.get("mean_loss")] for i, f in enumerate(finals)])


def central_sections(doc: Doc, run_dir: Path, cfg: dict[str, Any],
                     records: list[dict[str, Any]]) -> None:
    """Guarantee, ε over steps, loss curve and before/after grids of a central run."""
    path = _accountant_path(run_dir, cfg)
    acc = PersistentAccountant.load(path) if path.exists() else None  # StateError names it
    loss, eps_logged, finals = split_runs(records)
    _guarantee(doc, acc, cfg, finals, path)
    if acc is not None:
        _released(doc, run_dir, cfg, acc)
    _runs_table(doc, finals)
    doc.h("Privacy spend over steps")
    series = [eps_logged] if eps_logged.x else []
    if acc is not None and acc.steps:
        series.insert(0, epsilon_curve(acc))
        series.append(Series(f"budget (ε = {acc.budget:g})", [0.0, float(acc.steps)],
                             [acc.budget] * 2, style="dashed", color="grey"))
    if series:
        doc.plot(Plot("plot_epsilon.png", "ε over DP-SGD steps", "step", "ε", series,
                      zero_y=True),
                 "ε after each step (recomputed from the accountant's history) and as logged "
                 "at the end of each epoch; dashed: the budget.")
    doc.h("Training loss")
    doc.p("The loss is computed on private data without noise: a local diagnostic. This "
          "report therefore stays with the data holder; share the guarantee and the samples.",
          note=True)
    if loss.x:
        series = [loss] + ([_moving_average(loss, len(loss.x) // 10)] if len(loss.x) >= 20
                           else [])
        doc.plot(Plot("plot_loss.png", "training loss", "step", "loss", series),
                 "Diffusion loss per DP-SGD step (mean over the logical batch)"
                 + (" and its moving average." if len(series) > 1 else "."))
    else:
        doc.p("No loss was logged (metrics.jsonl is missing or holds no steps).")
    doc.h("Sample grids")
    _, before, after = trained_part(cfg)
    for name, caption in (("samples_before.png", before), ("samples_after.png", after)):
        if (run_dir / name).exists():
            doc.image(run_dir / name, caption)
        else:
            doc.p(f"{name} is missing (the run did not get that far).")


def _moving_average(s: Series, window: int) -> Series:
    ys = []
    for i in range(len(s.y)):
        chunk = [y for y in s.y[max(0, i - window + 1):i + 1] if math.isfinite(y)]
        ys.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return Series(f"moving average ({window} steps)", s.x, ys, color="C1")
