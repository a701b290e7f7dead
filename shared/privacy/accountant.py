"""A durable per-client privacy accountant: bookkeeping here, maths from Opacus.

One accountant per client for the client's whole life (never per round: a fresh accountant
each round under-reports ε, as in Flower's Opacus example). It stores the DP-SGD history
``[(noise_multiplier σ, sample_rate q, steps)]`` with δ, the ε budget and the accountant kind
(``prv``, the default for a new ledger: Gopi, Lee and Wutschitz, "Numerical Composition of
Differential Privacy", NeurIPS 2021 / Opacus ``PRVAccountant``; ``rdp``: Mironov 2017 /
Opacus ``RDPAccountant``), and ε is always recomputed by Opacus from that history.

Both kinds are upper bounds on the ε of the same mechanism (the PRV accountant's is the
upper end of its error bound, never its point estimate), so which one a ledger uses changes
the number reported, never the noise that was added. A ledger keeps its kind for life:
opening it without naming a kind continues with the stored one (a ledger made before ``prv``
became the default stays ``rdp``), and naming another kind is refused.

Steps are *committed before they are taken* (:meth:`PersistentAccountant.commit`): the state
file is replaced atomically before training starts, so a crash can only over-report ε, and
nothing derived from the steps can exist before the steps are on disk.

Speed: ε of a history is memoised, and so is each (σ, q)'s per-step Rényi DP curve, which
Opacus' PRV accountant recomputes several times per call to size its grid
(:func:`_prv_half_width`, the same numbers as Opacus' ``compute_safe_domain_size``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import Domain

from dpfl.shared.errors import BudgetExhausted, ConfigError, StateError
from dpfl.shared.io import atomic_write_json
from dpfl.shared.privacy.choices import DEFAULT_ACCOUNTANT

log = logging.getLogger(__name__)

KINDS = {"rdp": RDPAccountant, "prv": PRVAccountant}
FORMAT = "dpfl-accountant/1"
#: a ledger's DP-SGD history: [(noise multiplier σ, sample rate q, steps)]
History = list[tuple[float, float, int]]


def _validate(kind: str, delta: float, budget: float) -> None:
    if kind not in KINDS:
        raise ConfigError(f"accountant must be one of {sorted(KINDS)}, got {kind!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(budget, (int, float)) and budget > 0 and math.isfinite(budget)):
        raise ConfigError(f"epsilon budget must be a finite number > 0, got {budget!r}")


def _merge(history: History, sigma: float, q: float, steps: int) -> History:
    """History with ``steps`` more steps at (σ, q), merged into the last entry like Opacus."""
    out = list(history)
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, out[-1][2] + steps)
    else:
        out.append((sigma, q, steps))
    return out


#: the most grid points Opacus' PRV accountant may discretise a history on (about 16.8
#: million; each array is then ~130 MiB). Past it the PRV needs ever more memory: a tiny σ
#: asks for exabytes. Realistic σ (>= 0.5) with up to 10^5 steps needs a few million.
PRV_MAX_POINTS = 2**24
#: Opacus' PRV defaults (``PRVAccountant.get_epsilon``): ε error, and δ error as δ / 1000
_PRV_EPS_ERROR, _PRV_DELTA_ERROR = 0.01, 1e-3
#: the Rényi orders Opacus' RDP accountant (and the PRV accountant's grid sizing) use
_ALPHAS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    """Opacus' RDP of one step at (σ, q) over :data:`_ALPHAS` (read-only, memoised: the
    series for q near 1/2 cost about a second)."""
    curve = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                                orders=list(_ALPHAS)), dtype=float)
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(history: History, delta: float) -> float:
    """ε of ``history`` by Opacus' RDP accountant (``RDPAccountant.get_epsilon``: the same
    sum of per-step RDP times steps, the same conversion), from the memoised curves."""
    rdp = sum([_rdp_per_step(s, q) * n for s, q, n in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(_ALPHAS), rdp=rdp, delta=delta)
    return float(eps)


def _prv_half_width(history: History, delta_error: float) -> float:
    """Half-width of the privacy-loss domain Opacus' PRV accountant discretises ``history``
    on: Opacus' ``compute_safe_domain_size`` (Gopi et al., remark 5.6), line for line, with
    the RDP bounds it needs taken from the memoised curves."""
    total = sum(n for _, _, n in history)
    half_width = _rdp_epsilon(history, delta_error / 4)
    for s, q, _ in history:
        half_width = max(half_width, _rdp_epsilon([(s, q, 1)], delta_error / (8 * total)))
    return max(half_width, _PRV_EPS_ERROR) + 3


def _prv_mesh(total_steps: int, delta_error: float) -> float:
    """Grid spacing of Opacus' PRV accountant (``PRVAccountant._get_domain``)."""
    return _PRV_EPS_ERROR / math.sqrt(total_steps * math.log(12 / delta_error) / 2)


def _prv_points(history: History, delta: float) -> float:
    """Grid points Opacus' PRV accountant would allocate for ``history``; infinite when σ = 0."""
    delta_error = delta * _PRV_DELTA_ERROR
    total = sum(n for _, _, n in history)
    return 2 * _prv_half_width(history, delta_error) / _prv_mesh(total, delta_error)


class _SizedPRVAccountant(PRVAccountant):
    """Opacus' PRV accountant, told the domain :func:`_prv_half_width` already computed
    instead of recomputing it (its one slow part); the discretisation, the composition and
    the choice of the *upper* ε bound (``get_epsilon``) are Opacus' own."""

    def __init__(self, history: History, delta_error: float):
        super().__init__()
        self.history = [tuple(h) for h in history]
        self._delta_error = delta_error
        self._half_width = _prv_half_width(history, delta_error)

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        if (eps_error, delta_error) != (_PRV_EPS_ERROR, self._delta_error):
            raise RuntimeError("the PRV domain was sized for other error bounds")
        mesh = _prv_mesh(sum(num_self_compositions), delta_error)
        return Domain.create_aligned(-self._half_width, self._half_width, mesh)


def _check_computable(history: History, delta: float, kind: str) -> None:
    """Refuse, before Opacus runs, a history whose ε cannot be computed: σ = 0 (no noise,
    no (ε, δ) guarantee at all) for every kind, and for ``prv`` a σ so small that Opacus
    would need more than :data:`PRV_MAX_POINTS` grid points (it would die of an overflow or
    an out-of-memory error instead)."""
    for s, q, n in history:
        if not (s > 0 and math.isfinite(s)) or not 0 < q <= 1 or not n >= 0:
            raise ConfigError(f"the {kind} accountant cannot account for sigma={s!r}, q={q!r}, "
                              f"steps={n!r}: sigma must be a finite number > 0 (sigma=0 adds "
                              "no noise and gives no (epsilon, delta) guarantee), 0 < q <= 1")
    if kind != "prv":
        return
    points = _prv_points(history, delta)
    if not points <= PRV_MAX_POINTS:
        sigmas = ", ".join(f"{s:g}" for s in sorted({h[0] for h in history}))
        raise ConfigError(f"the prv accountant cannot account for sigma={sigmas} over "
                          f"{sum(h[2] for h in history)} steps: it would discretise on "
                          f"{points:.3g} points (at most {PRV_MAX_POINTS}); such a small sigma "
                          "means an epsilon far above any sensible budget. Raise sigma (or "
                          "lower target-epsilon), or use the rdp accountant")


def epsilon_of(history: History, delta: float, kind: str) -> float:
    """ε of a history at δ by Opacus' accountant of the given kind (for ``prv`` the upper
    end of its error bound, as ``PRVAccountant.get_epsilon``); a history it cannot compute
    (σ = 0, or a σ too small for ``prv``) raises :class:`ConfigError`. Memoised."""
    if kind not in KINDS:
        raise ConfigError(f"accountant must be one of {sorted(KINDS)}, got {kind!r}")
    steps = tuple((float(s), float(q), int(n)) for s, q, n in history if n)
    return _epsilon(steps, float(delta), kind)


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, kind: str) -> float:
    if not history:
        return 0.0
    hist = list(history)
    _check_computable(hist, delta, kind)
    if kind == "rdp":
        return _rdp_epsilon(hist, delta)
    delta_error = delta * _PRV_DELTA_ERROR
    acc = _SizedPRVAccountant(hist, delta_error)
    return float(acc.get_epsilon(delta=delta, eps_error=_PRV_EPS_ERROR,
                                 delta_error=delta_error))


def ledger_kind(path: str | Path, kind: str | None = None) -> str:
    """The accountant kind a client's ledger at ``path`` uses: ``kind`` when given, else the
    stored ledger's own kind, else (no ledger yet) :data:`DEFAULT_ACCOUNTANT`."""
    if kind is not None:
        return kind
    path = Path(path)
    return PersistentAccountant.load(path).kind if path.exists() else DEFAULT_ACCOUNTANT


class PersistentAccountant:
    """A client's privacy ledger on disk (JSON, replaced atomically on every change).

    Use :meth:`open` to create or continue one. Attributes: ``path``, ``kind``, ``delta``,
    ``budget`` (ε the client may spend in total), ``history``.
    """

    def __init__(self, path: str | Path, *, kind: str, delta: float, budget: float,
                 history: History | None = None):
        _validate(kind, delta, budget)
        self.path = Path(path)
        self.kind = kind
        self.delta = float(delta)
        self.budget = float(budget)
        self.history: History = [(s, q, n) for s, q, n in history or []]

    # -- persistence --------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, kind: str | None = None, delta: float = 1e-5,
             budget: float = 10.0) -> PersistentAccountant:
        """Continue the ledger at ``path``, or create (and save) a new one there.

        ``kind``: the accountant; ``None`` (default) continues an existing ledger with its
        own kind and gives a new one :data:`DEFAULT_ACCOUNTANT` (``prv``). An existing ledger
        keeps its history; a kind or δ given must match it (a ledger never changes them: δ is
        part of every ε it ever reported, and its ε must not jump with a change of method), and
        the budget may only be given unchanged. A corrupt file raises :class:`StateError`: it
        is never silently replaced by a fresh ledger.
        """
        path = Path(path)
        kind = ledger_kind(path, kind)
        if not path.exists():
            acc = cls(path, kind=kind, delta=delta, budget=budget)
            acc.save()
            log.info("new privacy accountant %s (%s, delta=%g, budget eps=%g)", path, kind,
                     delta, budget)
            return acc
        acc = cls.load(path)
        if acc.kind != kind or acc.delta != float(delta) or acc.budget != float(budget):
            raise StateError(
                f"accountant {path} holds kind={acc.kind}, delta={acc.delta:g}, budget "
                f"eps={acc.budget:g}, but kind={kind}, delta={delta:g}, budget eps={budget:g} "
                "were requested; a client's ledger cannot change these (use the stored values; "
                "leave the accountant unset to continue with the ledger's own)")
        log.info("continuing privacy accountant %s: eps=%.4f spent of %g", path,
                 acc.epsilon(), acc.budget)
        return acc

    @classmethod
    def load(cls, path: str | Path) -> PersistentAccountant:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            history = [(float(s), float(q), int(n)) for s, q, n in d["history"]]
            if any(not (s >= 0 and 0 < q <= 1 and n >= 0) for s, q, n in history):
                raise ValueError("history holds out-of-range (sigma, q, steps) entries")
            return cls(path, kind=d["kind"], delta=d["delta"], budget=d["budget"],
                       history=history)
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            raise StateError(f"privacy accountant state {path} is unreadable or corrupt ({exc}); "
                             "restore it from a backup. Starting a fresh one would under-report "
                             "epsilon, so dpfl refuses to") from exc

    def save(self) -> None:
        try:
            atomic_write_json(self.path, self.to_json())
        except OSError as exc:
            raise StateError(f"cannot write privacy accountant state {self.path}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": self.kind, "delta": self.delta, "budget": self.budget,
                "history": [list(h) for h in self.history], "epsilon": self.epsilon(),
                "steps": self.steps}

    # -- accounting ---------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.history)

    def epsilon(self) -> float:
        """ε spent so far at this ledger's δ (Opacus)."""
        return epsilon_of(self.history, self.delta, self.kind)

    def predict_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε after ``steps`` more steps at (σ, q), without recording them."""
        return epsilon_of(_merge(self.history, noise_multiplier, sample_rate, steps),
                          self.delta, self.kind)

    def check_budget(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Predicted ε after the planned steps; :class:`BudgetExhausted` if over budget."""
        predicted = self.predict_epsilon(noise_multiplier, sample_rate, steps)
        if not predicted <= self.budget:  # a NaN prediction is refused too
            raise BudgetExhausted(
                f"training {steps} more steps (sigma={noise_multiplier:.4g}, q={sample_rate:.4g}) "
                f"would bring epsilon to {predicted:.4f}, over this client's budget of "
                f"{self.budget:g} (delta={self.delta:g}, ledger {self.path}); spent so far: "
                f"eps={self.epsilon():.4f} in {self.steps} steps. Train fewer steps, raise the "
                "noise, or stop here.")
        return predicted

    def commit(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record ``steps`` steps at (σ, q) and save durably; returns the new ε.

        Call before the steps are taken. Refuses (:class:`BudgetExhausted`) over budget.
        """
        if not (steps >= 0 and 0 < sample_rate <= 1 and noise_multiplier >= 0):  # NaN fails
            raise ConfigError(f"cannot record steps={steps}, q={sample_rate}, "
                              f"sigma={noise_multiplier}")
        self.check_budget(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return self.epsilon()
        self.history = _merge(self.history, float(noise_multiplier), float(sample_rate),
                              int(steps))
        self.save()
        eps = self.epsilon()
        log.info("privacy accountant %s: committed %d steps, eps=%.4f of %g", self.path, steps,
                 eps, self.budget)
        return eps
