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

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from dpfl.shared.data.encode import encode_silo
from dpfl.shared.data.labels import read_label_map
from dpfl.shared.data.readers import DEFAULT_IMAGE_POLICY, fit_to_model
from dpfl.shared.data.sources import load_source
from dpfl.shared.errors import (
    BudgetExhausted,
    DataError,
    IncompatibleAdapter,
    ModelError,
)
from dpfl.shared.federation.config import RoundPlan, SiteConfig
from dpfl.shared.federation.protocol import SiteReport
from dpfl.shared.io import append_jsonl, atomic_write_bytes, ensure_dir
from dpfl.shared.ldm.lora import spec_for_plan, travelling_keys
from dpfl.shared.ldm.models import LatentDiffusion, load_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant, ledger_kind
from dpfl.shared.privacy.choices import resolve_delta
from dpfl.shared.privacy.dpsgd import DPConfig, train_lora
from dpfl.shared.privacy.poisson import dp_steps

log = logging.getLogger(__name__)


def check_proposal(global_adapter: dict[str, np.ndarray], ldm: LatentDiffusion) -> None:
    """Refuse a proposed adapter larger than the UNet it adapts (no LoRA layout is): an
    oversized message is not trained on. Exact keys and shapes are checked when it loads."""
    size = sum(int(np.asarray(v).size) for v in global_adapter.values())
    limit = sum(p.numel() for p in ldm.unet.parameters())
    if size > limit:
        raise IncompatibleAdapter(f"the proposed adapter has {size:,} values in "
                                  f"{len(global_adapter)} tensors, more than the base UNet's "
                                  f"{limit:,} parameters; refusing to train on it")


def _read_cache(cache: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached (latents, labels), or None (with a warning) when the cache is unusable: it is
    derived from the silo by the public encoder, so it is rebuilt, never trusted."""
    try:
        t = load_tensors(cache.read_bytes())
        z, y = t["latents"], t["labels"]
        if z.ndim != 4 or tuple(y.shape) != (z.shape[0],) or z.shape[0] == 0:
            raise ValueError(f"latents {tuple(z.shape)}, labels {tuple(y.shape)}")
        return z, y
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        log.warning("latent cache %s is unreadable (%s); encoding the silo again", cache, exc)
        return None


def _cache_name(ldm: LatentDiffusion, label_map: dict[str, str] | None,
                image_policy: str = DEFAULT_IMAGE_POLICY) -> str:
    """The latent cache's file name: the base model's fingerprint, how labels were matched
    (by name, with this label map) and how images were fitted to the model's size, so a
    cache of other labels or other image sizes is never reused (nor one written before the
    policy existed, when a smaller silo was padded without a word: it is read again)."""
    labels = json.dumps({"match": "by-name", "label-map": label_map,
                         "image-policy": image_policy}, sort_keys=True)
    tag = hashlib.sha256(labels.encode()).hexdigest()[:8]
    return f"latents-{ldm.card['verified'].split(':')[-1][:16]}-{tag}.safetensors"


#: the site's own record of every round it trained, one JSON line each (read by
#: ``dpfl-client status``, :mod:`dpfl.client.status`, and by the coordinator's report only
#: when a site hands its state directory over); it never leaves the site
ROUNDS_LOG = "rounds.jsonl"


@dataclass(frozen=True)
class RoundTag:
    """Which federated round a training call serves: Flower's run id and the server round,
    as the coordinator's message names them (``None``: not known, e.g. a direct call)."""

    run_id: int | None = None
    server_round: int | None = None

    def __str__(self) -> str:
        run = "-" if self.run_id is None else self.run_id
        rnd = "-" if self.server_round is None else self.server_round
        return f"run {run}, round {rnd}"


class Site:
    """A site's persistent state lives in ``cfg.state_dir``; this object only caches it.

    ``round_tag`` names the round being served (the ClientApp sets it from each training
    message); it only labels the site's log lines and its :data:`ROUNDS_LOG` records.

    How the site's images are fitted to the base model's size is ``cfg.image_policy`` (the
    node config's ``image-policy``, validated by :class:`SiteConfig`), a site setting never
    taken from the coordinator.
    """

    def __init__(self, cfg: SiteConfig):
        self.cfg = cfg
        self.image_policy = cfg.image_policy
        self.state_dir = ensure_dir(cfg.state_dir, f"state directory of site {cfg.site_id}")
        self._ldm: LatentDiffusion | None = None
        self._silo: tuple[torch.Tensor, torch.Tensor] | None = None
        self.round_tag = RoundTag()

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
        """Latents of the site's images under the frozen encoder and their labels as base
        model classes, matched by class name or the site's label map (never by position);
        cached on the site's disk."""
        if self._silo is not None:
            return self._silo
        label_map = read_label_map(self.cfg.label_map)
        cache = self.state_dir / _cache_name(ldm, label_map, self.image_policy)
        if cache.exists():
            self._silo = _read_cache(cache)
        if self._silo is None:
            data = fit_to_model(load_source(self.cfg.data, base_card=ldm.card), ldm.spec,
                                self.image_policy)  # logs any resize in the site's log
            z, y = encode_silo(ldm, data, label_map)
            # atomic: a site killed while writing must not find a torn cache on restart
            atomic_write_bytes(cache, save_tensors({"latents": z.contiguous(),
                                                    "labels": y.contiguous()}))
            self._silo = (z, y)
        return self._silo

    def local_silo(self, ldm: LatentDiffusion) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`silo` for a round: a :class:`DataError` names files, labels and sizes of
        single records, so its message is logged here and the error that goes back to the
        coordinator (Flower sends the exception text) says only that the data is unusable."""
        try:
            return self.silo(ldm)
        except DataError as exc:
            log.error("site %s: %s refused: its data cannot be used: %s", self.cfg.site_id,
                      self.round_tag, exc)
            raise DataError(f"site {self.cfg.site_id}: its data cannot be used for training; "
                            "the reason is in the site's own log (not sent, it may name "
                            "single records)") from exc

    def ledger_settings(self, n: int) -> tuple[str, float]:
        """(accountant kind, δ) of this site's ledger for a silo of ``n`` examples: the
        configured kind, else the ledger's own (``prv`` for a new one); δ as configured,
        ``auto`` being 1/(n ln n)."""
        kind = ledger_kind(self.state_dir / "accountant.json", self.cfg.accountant)
        return kind, resolve_delta(self.cfg.delta, n)

    def accountant(self, n: int) -> PersistentAccountant:
        kind, delta = self.ledger_settings(n)
        return PersistentAccountant.open(self.state_dir / "accountant.json", kind=kind,
                                         delta=delta, budget=self.cfg.epsilon_budget)

    def dp_config(self, plan: RoundPlan, n: int) -> DPConfig:
        """DP-SGD settings of a round; σ is calibrated for every round of the plan, each
        taking the steps Opacus' Poisson loader takes (the rule training commits)."""
        batch = min(plan.batch_size, n)
        steps_per_round = dp_steps(n, batch, plan.local_epochs)
        kind, delta = self.ledger_settings(n)
        return DPConfig(
            clip=plan.clip, target_epsilon=min(plan.target_epsilon, self.cfg.epsilon_budget),
            delta=delta, accountant=kind,
            batch_size=batch, max_physical_batch=self.cfg.max_physical_batch,
            noise_multiplicity=plan.noise_multiplicity, lr=plan.lr, epochs=plan.local_epochs,
            planned_steps=plan.num_rounds * steps_per_round, secure_mode=self.cfg.secure_mode,
            seed=secrets.randbits(63), device=self.cfg.device)

    def _metrics(self, acc: PersistentAccountant, n: int, sigma: float, q: float,
                 trained: bool, exhausted: bool) -> dict[str, Any]:
        """Scalars that may leave the site: privacy bookkeeping and the silo size (the FedAvg
        weight), as the protocol's :class:`SiteReport`. The training loss is a non-private
        statistic of the silo and stays here."""
        return SiteReport(site=self.cfg.site_id, epsilon=acc.epsilon(), delta=acc.delta,
                          budget=acc.budget, sigma=sigma, sample_rate=q, steps=acc.steps,
                          examples=n, exhausted=exhausted, trained=trained).to_metrics()

    def train_round(self, plan: RoundPlan, global_adapter: dict[str, np.ndarray]
                    ) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
        """DP-train from the global adapter; returns (update or None, scalar metrics)."""
        ldm = self.base_model(plan.base_fingerprint)
        check_proposal(global_adapter, ldm)
        z, y = self.local_silo(ldm)
        acc = self.accountant(len(z))
        before = acc.epsilon()
        dp = self.dp_config(plan, len(z))
        init = {k: torch.from_numpy(np.array(v)) for k, v in global_adapter.items()}
        try:
            res = train_lora(ldm, z, y, spec_for_plan(plan), dp, acc, init_adapter=init,
                             progress=False)
        except BudgetExhausted as exc:
            log.warning("site %s: %s refused, privacy budget exhausted: %s", self.cfg.site_id,
                        self.round_tag, exc)
            last = acc.history[-1] if acc.history else (0.0, 0.0, 0)
            return None, self._metrics(acc, len(z), last[0], last[1], False, True)
        steps_per_round = res.steps
        try:
            acc.check_budget(res.sigma, res.sample_rate, steps_per_round)
            exhausted = False
        except BudgetExhausted:
            exhausted = True
        update = {k: res.adapter[k].numpy() for k in travelling_keys(res.adapter, plan.ffa)}
        self._record_round(res, before, acc.budget, exhausted)
        return update, self._metrics(acc, res.examples, res.sigma, res.sample_rate, True,
                                     exhausted)

    def _record_round(self, res, before: float, budget: float, exhausted: bool) -> None:
        """The round's one INFO line for the site's operator, and its line in
        :data:`ROUNDS_LOG` (with the non-private training loss, which stays on this disk).
        ``epsilon`` is the lifetime ε after the round; ``epsilon_round`` what the round added
        to it (ε does not add up across rounds: it is the increase, not a separate ε)."""
        tag, secure = self.round_tag, self.cfg.secure_mode
        log.info("site %s: %s: trained %d steps, epsilon +%.4f this round; lifetime epsilon "
                 "%.4f of budget %g (delta %g), %.4f left; secure noise %s%s",
                 self.cfg.site_id, tag, res.steps, res.epsilon - before, res.epsilon, budget,
                 res.delta, max(budget - res.epsilon, 0.0),
                 "on (OS CSPRNG)" if secure else "OFF (torch PRNG, not for deployment)",
                 "; budget exhausted: one more such round would exceed it" if exhausted
                 else "")
        append_jsonl(self.state_dir / ROUNDS_LOG, {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "site": self.cfg.site_id, "run": tag.run_id, "round": tag.server_round,
            "steps": res.steps, "epsilon": res.epsilon, "epsilon_round": res.epsilon - before,
            "delta": res.delta, "budget": budget, "sigma": res.sigma,
            "sample_rate": res.sample_rate, "mean_loss": res.mean_loss,
            "secure_noise": secure, "exhausted": exhausted})
