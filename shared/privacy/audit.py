"""White-box empirical privacy audit of DP-SGD as built: one training run, m canaries.

Paper: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS
2023, arXiv 2305.08846). Each of m canaries is included independently with probability 1/2;
after one training run the auditor scores every canary, guesses the k+ highest scores IN
and the k- lowest OUT, abstains on the rest, and counts its v correct guesses out of r. If
the mechanism is (ε, δ)-DP, their main theorem (approximate-DP version) bounds

    P[v correct] <= f(v) + 2 m δ max_{i=1..v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, e^ε / (1 + e^ε)) >= u],

so ε̂, the largest ε whose bound is still <= 1 - confidence, is a lower bound on the true ε
at that confidence (:func:`one_run_epsilon`). Several (k+, k-) are tried with a Bonferroni
correction, so picking the best of them keeps the confidence.

Canaries are gradient-space "Dirac" canaries: a per-example gradient of norm C on one
coordinate of the trainable parameters, one coordinate each (LoRA ``lora_A`` coordinates
first: with ``lora_B`` starting at zero, real data barely touches them). They go through the
real path of :func:`dpfl.shared.privacy.dpsgd.dp_sgd`: each IN canary is Poisson-sampled at
the run's rate q at every step, appended as K identical rows to the per-row gradients before
the noise-multiplicity reduction (:data:`dpfl.shared.privacy.multiplicity.GRAD_SAMPLE_HOOKS`),
then clipped, summed and noised by Opacus' optimizer. The score of a canary is the sum over
steps of the released noisy gradient on its coordinate, read after the noise
(:data:`dpfl.shared.privacy.dpsgd.OPTIMIZER_HOOKS`).

The OUT canaries' coordinates also give the noise actually added: its 95 % upper confidence
bound σ⁺ (chi-square) and ε(σ⁺) from the run's accountant. This parametric check assumes a
Gaussian mechanism of sensitivity C; the one-run bound assumes nothing. At m = 1000 the
one-run bound mostly stays below the claim of a mechanism with half its noise, which the
noise check catches every time (docs/audit.md).

The audit spends no real budget: it trains on its own copy of the data with a temporary
ledger in a temporary directory, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from dpfl.shared.errors import ConfigError
from dpfl.shared.privacy import dpsgd, multiplicity
from dpfl.shared.privacy.accountant import PersistentAccountant, epsilon_of

#: test-only broken mechanisms (never reachable from a command line)
INJECTIONS = ("rows-clipped-separately", "noise-halved", "no-noise")
_NOISE_FACTOR = {"noise-halved": 0.5, "no-noise": 0.0}
_SCRATCH_BUDGET = 1e9  # the temporary ledger's budget: the audit must never be refused


@dataclass(frozen=True)
class AuditConfig:
    """Settings of the white-box audit.

    Attributes:
        canaries: m, the number of Dirac canaries (>= 10, default 1000); each needs its own
            trainable coordinate, and Opacus holds K x (sampled canaries) extra gradient rows.
        confidence: confidence of the lower bound ε̂ (0.5 < c < 1, default 0.95).
        guesses: fractions of m tried as k+ (k- is 0 or k+), Bonferroni-corrected.
        seed: seed of the canaries' inclusion and sampling (``None``: OS entropy).
    """

    canaries: int = 1000
    confidence: float = 0.95
    guesses: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) \
                or self.canaries < 10:
            raise ConfigError(f"canaries must be an integer >= 10, got {self.canaries!r}")
        if not 0.5 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0.5, 1), got {self.confidence!r}")
        if not self.guesses or not all(0 < g <= 0.5 for g in self.guesses):
            raise ConfigError(f"guesses must be fractions in (0, 0.5], got {self.guesses!r}")


# -- the bound ----------------------------------------------------------------------------
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Bound on P[>= v of r guesses correct] for an (ε, δ)-DP mechanism with m canaries."""
    p = 1.0 / (1.0 + math.exp(-eps))
    f_v = float(stats.binom.sf(v - 1, r, p))
    if v <= 0 or delta == 0:
        return min(1.0, f_v)
    i = np.arange(1, v + 1)
    gaps = stats.binom.sf(v - i - 1, r, p) - f_v  # f(v - i) - f(v)
    return min(1.0, f_v + 2 * m * delta * float(np.max(gaps / i)))


def one_run_epsilon(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """ε̂: the largest ε (to 1e-4) with :func:`p_value` <= 1 - confidence; 0 if none."""
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    beta = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= beta:
        low, high = high, 2 * high
    while high - low > 1e-4:
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) <= beta else (low, mid)
    return low


def best_guess(scores: np.ndarray, included: np.ndarray, delta: float,
               cfg: AuditConfig) -> dict[str, Any]:
    """Guess top-k+ IN and bottom-k- OUT for each (k+, k-) of ``cfg.guesses``; the largest
    ε̂, each at confidence ``1 - (1 - c) / tries`` (Bonferroni)."""
    m = len(scores)
    order = np.argsort(scores, kind="stable")
    tries = [(max(1, round(g * m)), km) for g in cfg.guesses for km in (0, max(1, round(g * m)))]
    conf = 1.0 - (1.0 - cfg.confidence) / len(tries)
    best: dict[str, Any] = {"epsilon": 0.0, "k_in": 0, "k_out": 0, "correct": 0, "guesses": 0}
    for k_in, k_out in tries:
        v = int(included[order[m - k_in:]].sum() + (~included[order[:k_out]]).sum())
        eps = one_run_epsilon(m, k_in + k_out, v, delta, conf)
        if eps > best["epsilon"] or best["guesses"] == 0:
            best = {"epsilon": eps, "k_in": k_in, "k_out": k_out, "correct": v,
                    "guesses": k_in + k_out}
    return best


# -- the canaries -------------------------------------------------------------------------
def canary_coordinates(named: list[tuple[str, torch.nn.Parameter]], m: int,
                       rng: np.random.Generator) -> list[tuple[int, int]]:
    """m distinct (parameter index, flat index) pairs, ``lora_A`` coordinates first."""
    preferred: list[tuple[int, int]] = []
    rest: list[tuple[int, int]] = []
    for i, (name, p) in enumerate(named):
        (preferred if "lora_A" in name else rest).extend((i, j) for j in range(p.numel()))
    if m > len(preferred) + len(rest):
        raise ConfigError(f"{m} canaries need as many trainable coordinates, the model has "
                          f"{len(preferred) + len(rest)}; use fewer canaries or a larger "
                          "LoRA rank")
    pool = [preferred[j] for j in rng.permutation(len(preferred))]
    pool += [rest[j] for j in rng.permutation(len(rest))]
    return pool[:m]


class CanaryRun:
    """Dirac canaries inside one DP-SGD run: inclusion, per-step sampling, rows, scores.

    Install with :meth:`installed`; ``noise_factor`` (tests only) scales the noise the
    optimizer adds, to simulate a broken mechanism.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], q: float, clip: float,
                 cfg: AuditConfig, noise_factor: float = 1.0):
        self.rng = np.random.default_rng(cfg.seed if cfg.seed is not None
                                         else secrets.randbits(63))
        self.params = [p for _, p in named]
        coords = canary_coordinates(named, cfg.canaries, self.rng)
        self.param_of = np.array([c[0] for c in coords])
        self.flat_of = torch.tensor([c[1] for c in coords])
        self.included = self.rng.random(cfg.canaries) < 0.5
        self.q, self.clip, self.noise_factor = q, clip, noise_factor
        self.scores = np.zeros(cfg.canaries)
        self.out_sq, self.out_n, self.steps = 0.0, 0, 0
        self.sigma: float | None = None
        self._pending: np.ndarray | None = None

    @contextlib.contextmanager
    def installed(self):
        multiplicity.GRAD_SAMPLE_HOOKS.append(self.add_rows)
        dpsgd.OPTIMIZER_HOOKS.append(self.attach)
        try:
            yield self
        finally:
            multiplicity.GRAD_SAMPLE_HOOKS.remove(self.add_rows)
            dpsgd.OPTIMIZER_HOOKS.remove(self.attach)

    def attach(self, opt) -> None:
        """Chain :meth:`read` onto the optimizer's step hook (runs after noise, per step)."""
        self.sigma = float(opt.noise_multiplier)
        opt.noise_multiplier = self.sigma * self.noise_factor
        previous = opt.step_hook

        def hook(o) -> None:
            if previous is not None:
                previous(o)
            self.read(o)

        opt.attach_step_hook(hook)

    def add_rows(self, params: list[torch.nn.Parameter], k: int) -> None:
        """Append K rows per canary sampled in this logical step (first physical batch)."""
        if self._pending is None:  # a new logical step: Poisson-sample the IN canaries
            drawn = self.included & (self.rng.random(len(self.included)) < self.q)
            self._pending = np.flatnonzero(drawn)
        if not len(self._pending):
            return
        chosen, self._pending = self._pending, np.zeros(0, dtype=int)
        rows = k * len(chosen)
        for idx, p in enumerate(self.params):
            mine = chosen[self.param_of[chosen] == idx]
            extra = torch.zeros((rows, p.numel()), dtype=p.dtype, device=p.device)
            slots = np.flatnonzero(self.param_of[chosen] == idx)
            for s, c in zip(slots, mine):
                extra[s * k:(s + 1) * k, int(self.flat_of[c])] = self.clip
            extra = extra.view(rows, *p.shape)
            gs = p.grad_sample  # type: ignore[attr-defined]
            # into the existing tensor: a new list entry would change Opacus' count of
            # accumulated iterations, hence its gradient scale
            if isinstance(gs, list):
                gs[-1] = torch.cat([gs[-1], extra])
            else:
                p.grad_sample = torch.cat([gs, extra])  # type: ignore[attr-defined]

    def read(self, opt) -> None:
        """Add the noisy update on each canary's coordinate, in units of C / batch."""
        unit = opt.expected_batch_size * opt.accumulated_iterations / self.clip
        values = np.zeros(len(self.scores))
        for idx, p in enumerate(self.params):
            mine = np.flatnonzero(self.param_of == idx)
            if len(mine):
                flat = p.grad.detach().reshape(-1)[self.flat_of[mine].to(p.grad.device)]
                values[mine] = flat.double().cpu().numpy() * unit
        self.scores += values
        out = values[~self.included]
        self.out_sq, self.out_n = self.out_sq + float(out @ out), self.out_n + len(out)
        self.steps += 1
        self._pending = None

    def noise_upper(self, confidence: float) -> float:
        """Upper confidence bound on the noise multiplier actually added (chi-square on the
        OUT canaries' coordinates, where the update is noise plus data interference)."""
        if self.out_n == 0:
            return math.inf
        chi = float(stats.chi2.ppf(1.0 - confidence, self.out_n))
        return math.sqrt(self.out_sq / chi)


# -- the audit run ------------------------------------------------------------------------
def whitebox_audit(ldm, latents: torch.Tensor, labels: torch.Tensor, lora, dp, cfg: AuditConfig,
                   progress: bool = False, _inject: str | None = None
                   ) -> tuple[dict[str, Any], Any]:
    """Train LoRA adapters with canaries on this copy of the data, under a temporary
    ledger; returns (the audit's figures, the trained peft model on CPU).

    ``_inject`` (tests only, one of :data:`INJECTIONS`) breaks the mechanism on purpose.
    """
    from dpfl.shared.ldm.lora import wrap_unet
    from dpfl.shared.ldm.models import resolve_device
    from dpfl.shared.privacy.dpsgd import check_silo, dp_sgd

    if _inject is not None and _inject not in INJECTIONS:
        raise ConfigError(f"unknown injection {_inject!r}; one of {INJECTIONS}")
    check_silo(latents, labels, dp)
    model = wrap_unet(ldm.unet, lora).to(resolve_device(dp.device))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    q = _sample_rate(latents, dp)
    run = CanaryRun(named, q, dp.clip, cfg, _NOISE_FACTOR.get(_inject or "", 1.0))
    with tempfile.TemporaryDirectory(prefix="dpfl-audit-") as tmp:
        scratch = PersistentAccountant.open(Path(tmp) / "accountant.json", kind=dp.accountant,
                                            delta=dp.delta, budget=_SCRATCH_BUDGET)
        with run.installed(), _rows_clipped_separately(_inject == "rows-clipped-separately"):
            stats_ = dp_sgd(ldm, model, latents, labels, dp, scratch, progress, "audit")
    model.to("cpu")
    return _figures(run, stats_, dp, cfg, _inject), model


def _sample_rate(latents: torch.Tensor, dp) -> float:
    from dpfl.shared.privacy import poisson

    return poisson.sample_rate(int(latents.shape[0]), dp.batch_size)


@contextlib.contextmanager
def _rows_clipped_separately(on: bool):
    multiplicity._INJECT_ROWS_CLIPPED_SEPARATELY = on
    try:
        yield
    finally:
        multiplicity._INJECT_ROWS_CLIPPED_SEPARATELY = False


def _figures(run: CanaryRun, st: dict[str, Any], dp, cfg: AuditConfig,
             inject: str | None) -> dict[str, Any]:
    guess = best_guess(run.scores, run.included, st["delta"], cfg)
    sigma_up = run.noise_upper(cfg.confidence)
    hist = [(sigma_up, st["sample_rate"], st["steps"])]
    try:
        eps_noise = epsilon_of(hist, st["delta"], dp.accountant) if sigma_up > 1e-3 \
            else math.inf
    except (ConfigError, ValueError, OverflowError, MemoryError):
        eps_noise = math.inf
    return {"claimed_epsilon": st["epsilon"], "delta": st["delta"],
            "epsilon_lower_bound": guess["epsilon"], "confidence": cfg.confidence,
            "canaries": cfg.canaries, "included": int(run.included.sum()),
            "guess": guess, "sigma": st["sigma"], "sample_rate": st["sample_rate"],
            "steps": st["steps"], "examples": st["examples"],
            "noise_check": {"sigma_upper": sigma_up, "epsilon_at_sigma_upper": eps_noise,
                            "samples": run.out_n},
            "injected_bug": inject}
