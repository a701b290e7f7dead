"""One hospital site: its base model copy, its silo, its accountant, one round of training.

Plain Python, no Flower: ``client/app.py`` translates messages to and from these calls.

What leaves the site per round: the DP-trained adapter tensors (only those the plan says
travel: all of them, or with FFA-LoRA only B and the class embedding) and scalar privacy
metrics. Never images, latents, per-example gradients or losses of single examples.

The noise seed is drawn from the operating system's entropy, never from anything the
coordinator knows (round numbers, site names): noise the coordinator could regenerate
would give no privacy.
"""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from dpfl.shared.accountant import PersistentAccountant
from dpfl.shared.dp import DPConfig, encode_silo, train_lora
from dpfl.shared.errors import BudgetExhausted, ModelError
from dpfl.shared.fedconfig import RoundPlan, SiteConfig
from dpfl.shared.io import atomic_write_bytes
from dpfl.shared.lora import spec_for_plan
from dpfl.shared.models import LatentDiffusion, load_ldm
from dpfl.shared.sources import load_source

log = logging.getLogger(__name__)


class Site:
    """A site's persistent state lives in ``cfg.state_dir``; this object only caches it."""

    def __init__(self, cfg: SiteConfig):
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._ldm: LatentDiffusion | None = None
        self._silo: tuple[torch.Tensor, torch.Tensor] | None = None

    def base_model(self, fingerprint: str) -> LatentDiffusion:
        """The local base model, refused unless its weights match the coordinator's."""
        if self._ldm is not None and self._ldm.card.get("verified") == fingerprint:
            return self._ldm
        if not fingerprint:
            raise ModelError("the coordinator announced no base model fingerprint; refusing "
                             "to train against an unverified base")
        ldm = load_ldm(self.cfg.base_model, verify_fingerprint=fingerprint)
        ldm.card["verified"] = fingerprint
        self._ldm, self._silo = ldm, None
        return ldm

    def silo(self, ldm: LatentDiffusion) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the site's images under the frozen encoder, cached on the site's disk."""
        if self._silo is not None:
            return self._silo
        cache = self.state_dir / f"latents-{ldm.card['verified'].split(':')[-1][:16]}.safetensors"
        if cache.exists():
            t = load_file(cache)
            self._silo = (t["latents"], t["labels"])
        else:
            data = load_source(self.cfg.data)
            z, y = encode_silo(ldm, data)
            # atomic: a site killed while writing must not find a torn cache on restart
            atomic_write_bytes(cache, save_tensors({"latents": z.contiguous(),
                                                    "labels": y.contiguous()}))
            self._silo = (z, y)
        return self._silo

    def accountant(self) -> PersistentAccountant:
        return PersistentAccountant.open(self.state_dir / "accountant.json",
                                         kind=self.cfg.accountant, delta=self.cfg.delta,
                                         budget=self.cfg.epsilon_budget)

    def dp_config(self, plan: RoundPlan, n: int) -> DPConfig:
        steps_per_round = plan.local_epochs * math.ceil(n / min(plan.batch_size, n))
        return DPConfig(
            clip=plan.clip, target_epsilon=min(plan.target_epsilon, self.cfg.epsilon_budget),
            delta=self.cfg.delta, accountant=self.cfg.accountant,
            batch_size=min(plan.batch_size, n), max_physical_batch=self.cfg.max_physical_batch,
            noise_multiplicity=plan.noise_multiplicity, lr=plan.lr, epochs=plan.local_epochs,
            planned_steps=plan.num_rounds * steps_per_round, secure_mode=self.cfg.secure_mode,
            seed=secrets.randbits(63), device=self.cfg.device)

    def _metrics(self, acc: PersistentAccountant, n: int, sigma: float, q: float,
                 trained: bool, exhausted: bool) -> dict[str, Any]:
        """Scalars that may leave the site: privacy bookkeeping and the silo size (the FedAvg
        weight). The training loss is a non-private statistic of the silo and stays here."""
        return {"num-examples": n, "epsilon": acc.epsilon(), "delta": acc.delta,
                "budget": acc.budget, "sigma": sigma, "sample-rate": q, "steps": acc.steps,
                "trained": int(trained), "exhausted": int(exhausted)}

    def train_round(self, plan: RoundPlan, global_adapter: dict[str, np.ndarray]
                    ) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
        """DP-train from the global adapter; returns (update or None, scalar metrics)."""
        ldm = self.base_model(plan.base_fingerprint)
        z, y = self.silo(ldm)
        acc = self.accountant()
        dp = self.dp_config(plan, len(z))
        init = {k: torch.from_numpy(np.array(v)) for k, v in global_adapter.items()}
        try:
            res = train_lora(ldm, z, y, spec_for_plan(plan), dp, acc, init_adapter=init,
                             progress=False)
        except BudgetExhausted as exc:
            log.warning("site %s: %s", self.cfg.site_id, exc)
            last = acc.history[-1] if acc.history else (0.0, 0.0, 0)
            return None, self._metrics(acc, len(z), last[0], last[1], False, True)
        steps_per_round = res.steps
        try:
            acc.check_budget(res.sigma, res.sample_rate, steps_per_round)
            exhausted = False
        except BudgetExhausted:
            exhausted = True
        update = {k: v.numpy() for k, v in res.adapter.items()
                  if not (plan.ffa and "lora_A" in k)}
        log.info("site %s: trained %d steps, epsilon %.3f of %g%s", self.cfg.site_id, res.steps,
                 res.epsilon, acc.budget, " (budget exhausted after this round)" if exhausted else "")
        self._log_local(res)
        return update, self._metrics(acc, res.examples, res.sigma, res.sample_rate, True,
                                     exhausted)

    def _log_local(self, res) -> None:
        """Keep the (non-private) training loss on the site's own disk."""
        from dpfl.shared.io import append_jsonl

        append_jsonl(self.state_dir / "rounds.jsonl",
                     {"steps": res.steps, "epsilon": res.epsilon, "sigma": res.sigma,
                      "sample_rate": res.sample_rate, "mean_loss": res.mean_loss})
