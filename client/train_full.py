"""``dpfl-client train-full``: DP-SGD on every UNet parameter, one silo -> one whole model.

The baselines that show what public pretraining and LoRA are worth next to DP-LoRA
(``dpfl-client train``), under the same DP-SGD, ledger and run directory:

``--init scratch`` (default)
    DPDM's from-scratch baseline (Dockhorn et al., "Differentially Private Diffusion
    Models", TMLR 2023): a randomly initialised UNet with the base model's architecture,
    trained on the private silo only. Protocol difference: DPDM works in pixel space; here
    the UNet denoises the latents of the base model's **public** autoencoder, so the
    autoencoder saw public data and the UNet saw none.
``--init base``
    DP full fine-tuning of the public base UNet (DP-LDM's comparison for adapters).

Writes a run directory::

    config.json        resolved configuration (mode "full", init, EMA) and package versions
    metrics.jsonl      one line per DP step (loss) and per epoch (epsilon), and a final line
    samples_before.png class grid of the starting UNet (pure noise for a scratch UNet)
    samples_after.png  class grid of the trained model
    model/             the whole trained LDM, diffusers format (loads like any base model):
                       the base model's public vae/ and scheduler/, the DP-trained unet/,
                       model_card.json (protocol) and privacy.json (the guarantee and its
                       scope, dpfl.shared.privacy.guarantee)
    accountant.json    the client's privacy ledger (committed before training starts)

Rerunning in the same run directory continues the same ledger (ε accumulates) and trains a
new model from the same initialisation, which replaces ``model/``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from dpfl.client.train import TrainJob, open_silo_and_ledger
from dpfl.shared.data.encode import encode_silo
from dpfl.shared.errors import ConfigError
from dpfl.shared.ldm.models import (
    LatentDiffusion,
    fingerprint_modules,
    fresh_unet,
    load_ldm,
    save_ldm,
)
from dpfl.shared.ldm.sampling import class_grid
from dpfl.shared.privacy.dpsgd import DPConfig
from dpfl.shared.privacy.full import train_full
from dpfl.shared.privacy.guarantee import SCOPE_UNET, PrivacyGuarantee
from dpfl.shared.rundir import RunDir

log = logging.getLogger(__name__)

#: --init choice -> what the UNet starts from, as stated in config.json and the model card
INITS = {
    "scratch": "random initialisation (DPDM's from-scratch baseline); latent space of the "
               "base model's public autoencoder, which saw public data while the UNet saw "
               "none (DPDM itself is pixel-space)",
    "base": "the public base model's UNet (DP full fine-tuning)",
}


def _start(base: LatentDiffusion, init: str, seed: int) -> LatentDiffusion:
    if init not in INITS:
        raise ConfigError(f"init must be one of {sorted(INITS)}, got {init!r}")
    unet = fresh_unet(base.unet, seed) if init == "scratch" else base.unet
    return dataclasses.replace(base, unet=unet, card={})


def _write_model(trained: LatentDiffusion, path: Path, card: dict[str, Any],
                 privacy: PrivacyGuarantee) -> Path:
    """Write the model beside ``path`` and swap it in, so ``path`` is never half-written."""
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_ldm(trained, partial, card=card)
    privacy.write(partial / "privacy.json")
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)
    return path


def run_train_full(job: TrainJob, dp: DPConfig, init: str = "scratch", ema_decay: float = 0.999,
                   progress: bool = True) -> dict[str, Any]:
    """Run the job (``job.model`` gives the public autoencoder, scheduler, class names and
    UNet architecture; its UNet weights only with ``init="base"``); returns a summary."""
    rd = RunDir(job.run_dir)
    base = load_ldm(job.model)
    start = _start(base, init, dp.seed)
    ds, accountant, acc_path = open_silo_and_ledger(job, dp, rd, base)
    rd.write_config({"job": dataclasses.asdict(job), "mode": "full", "init": init,
                     "ema_decay": ema_decay, "dp": dataclasses.asdict(dp)},
                    examples=len(ds), data=ds.source, protocol=INITS[init],
                    base_fingerprint=base.card.get("fingerprint"))
    grid = dict(per_class=job.per_class, steps=job.sample_steps, guidance=job.guidance,
                seed=dp.seed)
    class_grid(start, rd / "samples_before.png",
               title="random UNet (scratch)" if init == "scratch" else "base model", **grid)
    latents, labels = encode_silo(base, ds)
    result = train_full(start, latents, labels, dp, accountant, ema_decay, progress=progress)
    for rec in result.history:
        rd.log(**rec)
    # the ledger already holds these steps (committed before training)
    unet = fresh_unet(base.unet)
    unet.load_state_dict(result.unet_state)
    trained = dataclasses.replace(base, unet=unet.eval(), card={})
    privacy = PrivacyGuarantee.from_accountant(accountant, scope=SCOPE_UNET,
                                               base_fingerprint=base.card.get("fingerprint"),
                                               examples=result.examples)
    card = {"trained_by": "dpfl-client train-full", "init": init, "protocol": INITS[init],
            "init_seed": dp.seed if init == "scratch" else None, "data": ds.source,
            "examples": len(ds), "ema_decay": ema_decay, "privacy": privacy.to_json(),
            "autoencoder": {"from": str(job.model),
                            "fingerprint": fingerprint_modules({"vae": base.vae})},
            "base_fingerprint": base.card.get("fingerprint")}
    model_dir = _write_model(trained, rd / "model", card, privacy)
    rd.log(final=True, steps=result.steps, sigma=result.sigma, sample_rate=result.sample_rate,
           epsilon=result.epsilon, delta=result.delta, mean_loss=result.mean_loss,
           ledger_steps=accountant.steps)
    class_grid(trained, rd / "samples_after.png",
               title=f"DP full ({init}) eps={result.epsilon:.2f} delta={result.delta:g}",
               **grid)
    return {"epsilon": result.epsilon, "delta": result.delta, "steps": result.steps,
            "sigma": result.sigma, "examples": result.examples, "init": init,
            "run_dir": str(rd.path), "model": str(model_dir), "accountant": str(acc_path),
            "fingerprint": trained.card["fingerprint"]}
