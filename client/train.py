"""``dpfl-client train``: central (non-federated) DP-LoRA fine-tuning, one silo -> one adapter.

The setting of DP-LDM (Lyu et al., 2024) and DP-LoRA (Tsai et al., 2024): a public base LDM,
LoRA adapters trained with DP-SGD (noise multiplicity as in DPDM, Dockhorn et al., 2023) on one
private silo. Writes a run directory::

    config.json        resolved configuration and package versions
    metrics.jsonl      one line per DP step (loss) and per epoch (epsilon), and a final line
    samples_before.png class grid of the base model
    samples_after.png  class grid with the adapter
    adapter/           peft adapter directory (adapter_config.json + safetensors) and
                       privacy.json, the guarantee it carries (dpfl.shared.privacy.guarantee)
    accountant.json    the client's privacy ledger (committed before training starts)
    report/            report.html (self-contained) and report.md with plots
                       (dpfl.shared.report.build)

Rerunning in the same run directory continues the same ledger (ε accumulates).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpfl.shared.data.encode import encode_silo, in_base_classes
from dpfl.shared.data.labels import read_label_map
from dpfl.shared.data.readers import ImageSet
from dpfl.shared.data.sources import load_source
from dpfl.shared.errors import ConfigError
from dpfl.shared.ldm.lora import LoraSpec, merged_unet, save_adapter
from dpfl.shared.ldm.models import LatentDiffusion, load_ldm
from dpfl.shared.ldm.sampling import class_grid
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.dpsgd import DPConfig, train_lora
from dpfl.shared.privacy.guarantee import SCOPE_ADAPTER, PrivacyGuarantee
from dpfl.shared.report.build import try_write_report
from dpfl.shared.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """Everything ``dpfl-client train`` (and ``train-full``) needs besides the LoRA and DP
    settings.

    Attributes:
        data: data source (image folder, .npz, IDX, ``fmnist:private``...); its classes
            are matched to the base model's by name (:mod:`dpfl.shared.data.labels`), and
            ``fmnist:private`` is the private part of the base model's own split.
        model: base model directory (diffusers format).
        run_dir: output run directory.
        limit: use only the first ``limit`` examples of a seeded shuffle (0: all).
        budget: ε budget of the client's ledger (default: the DP target ε).
        accountant_file: ledger path (default ``RUN_DIR/accountant.json``).
        sample_steps, per_class, guidance: DDIM settings of the sample grids.
        label_map: JSON label map {"silo class": "base class"} for classes not named
            exactly after a base class (None: names only).
    """

    data: str
    model: str
    run_dir: str
    limit: int = 0
    budget: float | None = None
    accountant_file: str | None = None
    sample_steps: int = 50
    per_class: int = 8
    guidance: float = 1.0
    label_map: str | None = None

    def __post_init__(self) -> None:
        if self.limit < 0 or self.sample_steps < 1 or self.per_class < 1 or self.guidance < 0:
            raise ConfigError("limit must be >= 0, sample_steps and per_class >= 1, guidance >= 0")


def open_silo_and_ledger(job: TrainJob, dp: DPConfig, rd: RunDir, ldm: LatentDiffusion
                         ) -> tuple[ImageSet, PersistentAccountant, Path]:
    """The job's silo in the base model's classes (seeded subset when ``job.limit``) and its
    ledger (opened or created). A silo whose classes do not match the base model's, or a
    private split other than the base model's, is refused before the ledger is opened."""
    ds = in_base_classes(ldm, load_source(job.data, base_card=ldm.card),
                         read_label_map(job.label_map))
    if job.limit and job.limit < len(ds):
        idx = np.random.default_rng(dp.seed).permutation(len(ds))[:job.limit]
        ds = ds.subset(np.sort(idx))
    budget = job.budget if job.budget is not None else dp.target_epsilon
    if budget is None:
        raise ConfigError("give an epsilon budget (--budget) when sigma is set directly")
    acc_path = Path(job.accountant_file) if job.accountant_file else rd / "accountant.json"
    accountant = PersistentAccountant.open(acc_path, kind=dp.accountant, delta=dp.delta,
                                           budget=budget)
    return ds, accountant, acc_path


def run_train(job: TrainJob, lora: LoraSpec, dp: DPConfig, progress: bool = True) -> dict[str, Any]:
    """Run the job; returns a summary (ε, steps, paths)."""
    rd = RunDir(job.run_dir)
    ldm = load_ldm(job.model)
    ds, accountant, acc_path = open_silo_and_ledger(job, dp, rd, ldm)
    rd.write_config({"job": dataclasses.asdict(job), "lora": dataclasses.asdict(lora),
                     "dp": dataclasses.asdict(dp)}, examples=len(ds), data=ds.source,
                    base_fingerprint=ldm.card.get("fingerprint"))
    grid = dict(per_class=job.per_class, steps=job.sample_steps, guidance=job.guidance,
                seed=dp.seed)
    class_grid(ldm, rd / "samples_before.png", title="base model", **grid)
    latents, labels = encode_silo(ldm, ds)
    result = train_lora(ldm, latents, labels, lora, dp, accountant, progress=progress)
    for rec in result.history:
        rd.log(**rec)
    # the ledger already holds these steps (committed before training)
    save_adapter(result.model, rd / "adapter")
    PrivacyGuarantee.from_accountant(
        accountant, scope=SCOPE_ADAPTER, base_fingerprint=ldm.card.get("fingerprint"),
        examples=result.examples).write(rd / "adapter" / "privacy.json")
    rd.log(final=True, steps=result.steps, sigma=result.sigma, sample_rate=result.sample_rate,
           epsilon=result.epsilon, delta=result.delta, mean_loss=result.mean_loss,
           ledger_steps=accountant.steps)
    tuned = dataclasses.replace(ldm, unet=merged_unet(result.model).eval())
    class_grid(tuned, rd / "samples_after.png",
               title=f"DP-LoRA eps={result.epsilon:.2f} delta={result.delta:g}", **grid)
    report = try_write_report(rd.path)  # logs, never raises: the results are on disk
    return {"epsilon": result.epsilon, "delta": result.delta, "steps": result.steps,
            "sigma": result.sigma, "examples": result.examples, "run_dir": str(rd.path),
            "adapter": str(rd / "adapter"), "privacy": str(rd / "adapter" / "privacy.json"),
            "accountant": str(acc_path), "report": str(report) if report else None}
