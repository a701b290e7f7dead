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
are not, so the clipping lives here: FlatClip, ``min(1, S / norm)``, where an update of norm 0
needs no clipping. Flower's helper divides by that norm.) The rule delta < 1 / number of sites
is checked against the sites connected before each round (:meth:`ClientLevelDP.check_sites`).

Order within a round (:class:`dpfl.server.rounds.PlainRound`): everything that can fail comes
first (:meth:`ClientLevelDP.clipped_mean`: clip and average, no noise); then the spend is
committed durably (:class:`~dpfl.shared.privacy.accountant.PersistentAccountant`); only then is
the noise drawn (:meth:`ClientLevelDP.release`). A round whose clipped mean cannot be computed
commits nothing, and a round that would exceed the client-level budget is not run. (A round
kept back by ``min-replies`` still commits its release, as before: conservative.) The noise
always comes from the operating system's CSPRNG
(:func:`dpfl.shared.privacy.securenoise.secure_noise`, Opacus' secure-mode construction): the
coordinator has nothing to reproduce, so never a seeded PRNG.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpfl.shared.errors import BudgetExhausted, ConfigError
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.securenoise import secure_noise

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

    def check_sites(self, sites: int) -> None:
        """Refuse (:class:`ConfigError`) a delta that is not below 1 / ``sites``, the number
        of sites in the federation: a delta that large allows one whole site's update to be
        revealed. Checked before a round, so nothing is spent on a refused one."""
        delta = self.accountant.delta
        if sites >= 1 and delta * sites >= 1:
            raise ConfigError(f"client-dp-delta={delta:g} must be < 1 / number of sites = "
                              f"{1 / sites:.3g} for the {sites} sites connected; lower it")

    def commit_release(self) -> ClientLevelSpend:
        """Record one release durably: after :meth:`clipped_mean`, before :meth:`release`."""
        self.accountant.commit(self.noise_multiplier, 1.0, 1)
        return self.spend()

    def clipped_mean(self, reference: dict[str, np.ndarray],
                     updates: list[dict[str, np.ndarray]], sampled: int
                     ) -> dict[str, np.ndarray]:
        """``reference + (sum of clipped deltas) / sampled`` in float64, without noise: the
        part of a release that can fail, so it runs before anything is committed."""
        if sampled < 1 or len(updates) > sampled:
            raise ValueError(f"{len(updates)} updates from {sampled} sampled sites")
        keys = sorted(reference)
        ref = [reference[k].astype(np.float64) for k in keys]
        total = [np.zeros_like(r) for r in ref]
        for update in updates:
            delta = [update[k].astype(np.float64) - r for k, r in zip(keys, ref)]
            norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta))
            scale = 1.0 if norm <= self.clip else self.clip / norm  # norm 0: nothing to clip
            for acc, d in zip(total, delta):
                acc += scale * d
        log.info("client-level DP: %d of %d sampled update(s) clipped to %g", len(updates),
                 sampled, self.clip)
        return {k: r + t / sampled for k, r, t in zip(keys, ref, total)}

    def release(self, reference: dict[str, np.ndarray], mean: dict[str, np.ndarray],
                sampled: int) -> dict[str, np.ndarray]:
        """``mean + N(0, (z S / sampled)^2)`` from the OS CSPRNG, in the reference's dtypes;
        only after :meth:`commit_release`."""
        std = self.noise_multiplier * self.clip / sampled
        log.info("client-level DP: noise std %.4g (z %g, clip %g, %d sampled)", std,
                 self.noise_multiplier, self.clip, sampled)
        return {k: (m + secure_noise(std, torch.from_numpy(m)).numpy()
                    ).astype(reference[k].dtype)
                for k, m in mean.items()}

    def aggregate(self, reference: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]],
                  sampled: int) -> dict[str, np.ndarray]:
        """``reference + (sum of clipped deltas) / sampled + N(0, (z S / sampled)^2)``, without
        accounting (the round loop commits between :meth:`clipped_mean` and :meth:`release`)."""
        return self.release(reference, self.clipped_mean(reference, updates, sampled), sampled)
