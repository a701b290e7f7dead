"""``dpfl-client audit``: an empirical lower bound on the privacy loss of DP-LoRA as built.

Two tests on one training run, on the audit's *own copy* of the data, under a temporary
ledger that is deleted afterwards (no real site's budget is spent, no real ledger is read or
written):

* white-box, one run (Steinke, Nasr, Jagielski, NeurIPS 2023): Dirac gradient canaries
  through the real Opacus DP-SGD path (:mod:`dpfl.shared.privacy.audit`) give ε̂, a lower
  bound on ε at 95 % confidence, to set beside the ε the accountant claims;
* black-box: a loss-threshold membership-inference attack on the adapter that run releases
  (:mod:`dpfl.shared.privacy.mia`): the silo is split at random into members (trained on)
  and held-out images; ROC curve and TPR at 1 % FPR.

Writes ``RUN_DIR/audit/``: ``audit.json`` (:data:`AUDIT_JSON`, read back by the report),
``audit.md`` and ``mia_roc.png``; then re-renders the run's report, which gains an audit
section.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfl.shared.data.encode import encode_silo, in_base_classes
from dpfl.shared.data.labels import read_label_map
from dpfl.shared.data.readers import DEFAULT_IMAGE_POLICY, IMAGE_POLICIES, fit_to_model
from dpfl.shared.data.sources import load_source
from dpfl.shared.errors import ConfigError
from dpfl.shared.io import atomic_write_json
from dpfl.shared.ldm.lora import LoraSpec
from dpfl.shared.ldm.models import load_ldm
from dpfl.shared.privacy.audit import AuditConfig, whitebox_audit
from dpfl.shared.privacy.auditrecord import AUDIT_FORMAT, AUDIT_JSON, NO_BUDGET
from dpfl.shared.privacy.dpsgd import DPConfig
from dpfl.shared.privacy.mia import membership_inference, plot_roc
from dpfl.shared.report.build import try_write_report
from dpfl.shared.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditJob:
    """What ``dpfl-client audit`` needs besides the LoRA, DP and audit settings.

    Attributes:
        data: data source (image folder, .npz, IDX, ``fmnist:private``...): the audit reads
            its own copy; nothing is written back.
        model: base model directory.
        run_dir: run directory the results go to (``RUN_DIR/audit/``); a training run's
            directory gets an audit section in its report.
        limit: use a seeded random subset of this many examples (0: all), split in half
            into members and held-out images.
        draws: (timestep, noise) draws per image for the attack's loss (>= 1, default 8).
        label_map: JSON label map, as for ``train``.
        image_policy: how images not of the base model's size are fitted, as for ``train``
            (:func:`dpfl.shared.data.readers.fit_to_model`).
    """

    data: str
    model: str
    run_dir: str
    limit: int = 0
    draws: int = 8
    label_map: str | None = None
    image_policy: str = DEFAULT_IMAGE_POLICY

    def __post_init__(self) -> None:
        if self.limit < 0 or self.draws < 1:
            raise ConfigError(f"limit must be >= 0 and draws >= 1, got {self.limit}, "
                              f"{self.draws}")
        if self.image_policy not in IMAGE_POLICIES:
            raise ConfigError(f"image_policy must be one of {list(IMAGE_POLICIES)}, got "
                              f"{self.image_policy!r}")


def split_members(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random half of ``range(n)`` as members, the rest held out (both sorted)."""
    if n < 4:
        raise ConfigError(f"the audit needs at least 4 images (members and held-out), got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def run_audit(job: AuditJob, lora: LoraSpec, dp: DPConfig, cfg: AuditConfig,
              progress: bool = True) -> dict[str, Any]:
    """Both tests on one run; writes ``RUN_DIR/audit`` and returns the audit's record."""
    t0 = time.time()
    ldm = load_ldm(job.model)
    ds = in_base_classes(ldm, load_source(job.data, base_card=ldm.card),
                         read_label_map(job.label_map))
    if job.limit and job.limit < len(ds):
        ds = ds.subset(np.sort(np.random.default_rng(dp.seed).permutation(len(ds))[:job.limit]))
    ds = fit_to_model(ds, ldm.spec, job.image_policy)
    latents, labels = encode_silo(ldm, ds)
    members, heldout = split_members(len(ds), dp.seed)
    white, model = whitebox_audit(ldm, latents[members], labels[members], lora, dp, cfg,
                                  progress=progress)
    mia = membership_inference(model.eval(), ldm.scheduler, (latents[members], labels[members]),
                               (latents[heldout], labels[heldout]), draws=job.draws,
                               seed=dp.seed)
    out_dir = Path(job.run_dir) / Path(AUDIT_JSON).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_roc(mia, out_dir / "mia_roc.png", f"loss-threshold MIA, claimed ε = "
             f"{white['claimed_epsilon']:.2f}")
    record = {"format": AUDIT_FORMAT, "note": NO_BUDGET, "data": ds.source,
              "image_fit": ds.fitted or None,
              "whitebox": white, "mia": {k: v for k, v in mia.items() if k not in ("fpr", "tpr")},
              "settings": {"lora": dataclasses.asdict(lora), "dp": dataclasses.asdict(dp),
                           "audit": dataclasses.asdict(cfg), "job": dataclasses.asdict(job)},
              "threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 1)}
    atomic_write_json(Path(job.run_dir) / AUDIT_JSON, record)
    if not (Path(job.run_dir) / "config.json").exists():  # an audit-only run directory
        RunDir(job.run_dir).write_config({"audit": record["settings"]}, data=ds.source)
    (out_dir / "audit.md").write_text(summary_markdown(record), encoding="utf-8")
    try_write_report(job.run_dir)  # logs, never raises
    return record


def summary_markdown(record: dict[str, Any]) -> str:
    """The short Markdown beside audit.json."""
    w, m = record["whitebox"], record["mia"]
    noise = w["noise_check"]
    return "\n".join([
        "# dpfl privacy audit", "", record["note"], "",
        "| claimed ε (δ) | ε̂ one-run, white-box (95 %) | ε at measured noise σ⁺ "
        "| MIA TPR @ 1 % FPR | MIA AUC |",
        "|---|---|---|---|---|",
        f"| {w['claimed_epsilon']:.3f} ({w['delta']:g}) | {w['epsilon_lower_bound']:.3f} "
        f"| {noise['epsilon_at_sigma_upper']:.3f} | {m['tpr_at_fpr']['0.01']:.3f} "
        f"| {m['auc']:.3f} |", "",
        f"{w['canaries']} canaries ({w['included']} included), {w['steps']} steps at "
        f"q = {w['sample_rate']:.4g}, σ = {w['sigma']:.4g}; best guess: "
        f"{w['guess']['correct']} of {w['guess']['guesses']} correct. MIA: "
        f"{m['members']} members vs {m['heldout']} held-out, {m['draws']} draws each. "
        f"{record['seconds']} s on {record['threads']} thread(s).",
        "", "![ROC](mia_roc.png)", ""])


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, default=str)
