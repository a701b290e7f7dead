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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfl.shared.data.encode import encode_silo, in_base_classes
from dpfl.shared.data.labels import read_label_map
from dpfl.shared.data.readers import DEFAULT_IMAGE_POLICY, IMAGE_POLICIES, ImageSet, fit_to_model
from dpfl.shared.data.sources import load_source
from dpfl.shared.errors import ConfigError
from dpfl.shared.ldm.lora import LoraSpec, adapter_state, merged_unet, save_adapter, wrap_unet
from dpfl.shared.ldm.models import LatentDiffusion, load_ldm
from dpfl.shared.ldm.sampling import class_grid
from dpfl.shared.ldm.warmup import WarmupConfig, warm_up
from dpfl.shared.privacy import poisson
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.classmeans import release_class_means
from dpfl.shared.privacy.dpsgd import DPConfig, calibrate_sigma, train_lora
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
        image_policy: how images not of the base model's size are fitted to it, one of
            ``IMAGE_POLICIES`` (``refuse``, the default, ``resize``, ``center-crop``;
            :func:`dpfl.shared.data.readers.fit_to_model`); recorded in the run's config.
        warmup_sigma: DP-FETA's warm-up (:mod:`dpfl.shared.privacy.classmeans`): before
            DP-SGD, release the silo's class means with this noise multiplier (one Gaussian
            mechanism, committed to the ledger first) and train the adapters on them; DP-SGD's
            σ is then calibrated so that both together reach the target ε. 0 (default): off.
        warmup_clip: latent clip norm of the release (0, default: sqrt of the latent size,
            the norm of a typical normalised latent).
        warmup_steps: adapter training steps on the means (post-processing, no budget).
        ema_decay: the adapter written is the EMA of the DP iterates at this decay (0,
            default: the last iterate; :func:`dpfl.shared.privacy.dpsgd.train_lora`).
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
    image_policy: str = DEFAULT_IMAGE_POLICY
    warmup_sigma: float = 0.0
    warmup_clip: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.limit < 0 or self.sample_steps < 1 or self.per_class < 1 or self.guidance < 0:
            raise ConfigError("limit must be >= 0, sample_steps and per_class >= 1, guidance >= 0")
        if not (self.warmup_sigma >= 0 and self.warmup_clip >= 0 and self.warmup_steps >= 0):
            raise ConfigError("warmup_sigma, warmup_clip and warmup_steps must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.image_policy not in IMAGE_POLICIES:
            raise ConfigError(f"image_policy must be one of {list(IMAGE_POLICIES)}, got "
                              f"{self.image_policy!r}")


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
    ds = fit_to_model(ds, ldm.spec, job.image_policy)  # refused here, before the ledger
    budget = job.budget if job.budget is not None else dp.target_epsilon
    if budget is None:
        raise ConfigError("give an epsilon budget (--budget) when sigma is set directly")
    acc_path = Path(job.accountant_file) if job.accountant_file else rd / "accountant.json"
    accountant = PersistentAccountant.open(acc_path, kind=dp.accountant, delta=dp.delta,
                                           budget=budget)
    return ds, accountant, acc_path


def warm_start(job: TrainJob, ldm: LatentDiffusion, latents: torch.Tensor,
               labels: torch.Tensor, lora: LoraSpec, dp: DPConfig,
               accountant: PersistentAccountant, rd: RunDir
               ) -> tuple[dict[str, torch.Tensor] | None, DPConfig]:
    """With ``job.warmup_sigma``: release the silo's DP class means (committed to
    ``accountant`` first), warm adapters up on them, and return their state and ``dp`` with
    σ calibrated for what is left of the target after the release. Otherwise ``(None, dp)``."""
    if not job.warmup_sigma:
        return None, dp
    if dp.noise_multiplier is None and dp.target_epsilon is not None:
        # σ for DP-SGD such that release + DP-SGD together reach the target (checked
        # before anything is released: a target the release alone exceeds is refused)
        release = [(float(job.warmup_sigma), 1.0, 1)]
        q = poisson.sample_rate(len(latents), dp.batch_size)
        steps = dp.planned_steps or poisson.dp_steps(len(latents), dp.batch_size, dp.epochs)
        sigma = calibrate_sigma(dp.target_epsilon, dp.delta, q, steps, dp.accountant,
                                prior=list(accountant.history) + release)
        dp = dataclasses.replace(dp, noise_multiplier=sigma)
    clip = job.warmup_clip or math.sqrt(latents[0].numel())
    means = release_class_means(latents, labels, ldm.spec.num_classes, clip,
                                job.warmup_sigma, accountant)
    mean_latents, classes = means.means()
    model = wrap_unet(ldm.unet, lora)
    losses: list[float] = []
    if len(classes):
        losses = warm_up(model, ldm.scheduler, torch.from_numpy(mean_latents),
                         torch.from_numpy(classes), ldm.spec.null_class,
                         WarmupConfig(steps=job.warmup_steps, seed=dp.seed))
    else:  # spent, and recorded; the adapters start from the base model as without it
        log.warning("warm-up: no class has a noisy count above %.1f (three noise standard "
                    "deviations at sigma=%g); DP-SGD starts from the base model. More "
                    "examples per class or a smaller sigma (a larger share of the budget) "
                    "would let counts clear the noise",
                    max(1.0, 3 * means.count_std), job.warmup_sigma)
    rd.log(stage="warmup", classes=classes.tolist(), sigma=job.warmup_sigma, clip=clip,
           epsilon=accountant.epsilon(), steps=len(losses),
           loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)
    return adapter_state(model), dp


def run_train(job: TrainJob, lora: LoraSpec, dp: DPConfig, progress: bool = True) -> dict[str, Any]:
    """Run the job; returns a summary (ε, steps, paths)."""
    rd = RunDir(job.run_dir)
    ldm = load_ldm(job.model)
    ds, accountant, acc_path = open_silo_and_ledger(job, dp, rd, ldm)
    rd.write_config({"job": dataclasses.asdict(job), "lora": dataclasses.asdict(lora),
                     "dp": dataclasses.asdict(dp)}, examples=len(ds), data=ds.source,
                    image_fit=ds.fitted or None, base_fingerprint=ldm.card.get("fingerprint"))
    grid = dict(per_class=job.per_class, steps=job.sample_steps, guidance=job.guidance,
                seed=dp.seed)
    class_grid(ldm, rd / "samples_before.png", title="base model", **grid)
    latents, labels = encode_silo(ldm, ds)
    init, dp = warm_start(job, ldm, latents, labels, lora, dp, accountant, rd)
    result = train_lora(ldm, latents, labels, lora, dp, accountant, init_adapter=init,
                        progress=progress, ema_decay=job.ema_decay)
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
