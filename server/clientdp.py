"""Optional client-level DP on the coordinator: DP-FedAvg with fixed clipping.

Record-level DP (each site's DP-SGD, see :mod:`dpfl.shared.privacy.dpsgd`) protects every
image. Client-level DP (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018) protects a whole site's participation: the coordinator clips each site's
update to an L2 norm ``S``, averages with *equal* weights over the ``m`` sites it sampled (a fixed
denominator: a site that fails or is rejected counts as a zero update, so who answered does
not change the sensitivity), and adds Gaussian noise of standard deviation ``z * S / m``.

Accounting: add/remove-one-site adjacency, one Gaussian release of noise multiplier ``z``
per round, composed by Opacus' RDP accountant with sampling rate 1. No amplification by
site sampling is claimed: Flower samples a fixed number of sites without replacement, which
the Poisson-subsampled analysis does not cover, so the reported ε is an upper bound. (Flower's
own accountant for its fixed-clipping wrapper makes the same no-amplification choice; the
wrapper itself needs equal example weights and whole-model arrays, which our FFA-LoRA replies
are not, so the clipping comes from Flower's helper and the rest lives here.)

The spend is committed durably (:class:`~dpfl.shared.privacy.accountant.PersistentAccountant`)
before the noised aggregate exists, and a round that would exceed the client-level budget is
not run.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

from dpfl.shared.errors import BudgetExhausted
from dpfl.shared.privacy.accountant import PersistentAccountant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientLevelSpend:
    epsilon: float
    delta: float
    budget: float
    noise_multiplier: float
    clip: float
    releases: int

    def to_json(self) -> dict[str, float | int]:
        return {"epsilon": self.epsilon, "delta": self.delta, "budget": self.budget,
                "noise_multiplier": self.noise_multiplier, "clip": self.clip,
                "releases": self.releases}


class ClientLevelDP:
    """Clipping, noise and the durable accountant of DP-FedAvg at one coordinator."""

    def __init__(self, path: str | Path, *, clip: float, noise_multiplier: float, delta: float,
                 budget: float):
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = PersistentAccountant.open(path, kind="rdp", delta=delta,
                                                    budget=budget)
        # the noise must be unpredictable: never from a recorded seed or numpy's global state
        self._rng = np.random.default_rng(secrets.randbits(128))

    def spend(self) -> ClientLevelSpend:
        acc = self.accountant
        return ClientLevelSpend(acc.epsilon(), acc.delta, acc.budget, self.noise_multiplier,
                                self.clip, acc.steps)

    def can_release(self) -> bool:
        """Whether one more round fits the client-level budget."""
        try:
            self.accountant.check_budget(self.noise_multiplier, 1.0, 1)
            return True
        except BudgetExhausted as exc:
            log.warning("client-level DP: %s", exc)
            return False

    def commit_release(self) -> ClientLevelSpend:
        """Record one release durably; call before :meth:`aggregate` output is used."""
        self.accountant.commit(self.noise_multiplier, 1.0, 1)
        return self.spend()

    def aggregate(self, reference: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]],
                  sampled: int) -> dict[str, np.ndarray]:
        """``reference + (sum of clipped deltas) / sampled + N(0, (z S / sampled)^2)``."""
        if sampled < 1 or len(updates) > sampled:
            raise ValueError(f"{len(updates)} updates from {sampled} sampled sites")
        keys = sorted(reference)
        ref = [reference[k].astype(np.float64) for k in keys]
        total = [np.zeros_like(r) for r in ref]
        for update in updates:
            clipped = [update[k].astype(np.float64) for k in keys]
            compute_clip_model_update(param1=clipped, param2=ref, clipping_norm=self.clip)
            for acc, c, r in zip(total, clipped, ref):
                acc += c - r
        std = compute_stdv(self.noise_multiplier, self.clip, sampled)
        log.info("client-level DP: %d of %d sampled update(s) clipped to %g, noise std %.4g",
                 len(updates), sampled, self.clip, std)
        return {k: (r + t / sampled + self._rng.normal(0.0, std, r.shape)
                    ).astype(reference[k].dtype)
                for k, r, t in zip(keys, ref, total)}
