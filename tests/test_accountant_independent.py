"""Our ε against an independent implementation: Microsoft's ``prv-accountant`` (Gopi,
Lee, Wutschitz, "Numerical Composition of Differential Privacy", NeurIPS 2021; the code
Opacus' PRV accountant was ported from, and an RDP accountant after TF Privacy), a pinned
test dependency. (Google's ``dp-accounting`` cannot be installed with our pins: every release
wants attrs < 24 or numpy < 2.)

For several (σ, q, steps) histories, one of several segments among them: our reported ε is
never below the independent one by more than the accountants' own error (never
under-reported) and is close to it; and the RDP ε, a looser bound, is never below the
near-exact PRV ε. The RDP curve is also computed here from its definition by numerical
integration (Mironov, Talwar, Zhang 2019: A_α = E_{z~N(0,σ²)}[((1-q) + q e^{(2z-1)/2σ²})^α]),
not from the series both Opacus and prv-accountant take from TF Privacy.
"""

import numpy as np
import pytest
from scipy import integrate

from dpfl.shared.privacy.accountant import epsilon_of

prv_accountant = pytest.importorskip("prv_accountant")
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant  # noqa: E402
from prv_accountant.other_accountants import RDP  # noqa: E402

DELTA = 1e-5
EPS_ERROR = 0.01  # both PRV accountants' ε discretisation error
HISTORIES = [
    [(1.0, 0.01, 1000)],
    [(0.8, 0.02, 300)],
    [(2.0, 0.1, 50)],
    [(0.6, 1 / 93, 92)],
    [(1.1, 0.01, 200), (0.7, 0.05, 50), (1.5, 0.01, 400)],  # a site whose σ and q changed
]


def _prvs(history):
    return [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
            for s, q, _ in history]


def _independent_prv(history):
    """(lower, estimate, upper) ε of the history by prv-accountant."""
    steps = [n for _, _, n in history]
    acc = PRVAccountant(prvs=_prvs(history), eps_error=EPS_ERROR, delta_error=DELTA / 1000,
                        max_self_compositions=steps)
    return acc.compute_epsilon(delta=DELTA, num_self_compositions=steps)


def _independent_rdp(history):
    return RDP(prvs=_prvs(history)).compute_epsilon(DELTA, [n for _, _, n in history])[2]


@pytest.mark.parametrize("history", HISTORIES, ids=lambda h: f"{len(h)}-segment")
def test_prv_epsilon_agrees_with_prv_accountant(history):
    ours = epsilon_of(history, DELTA, "prv")
    low, estimate, upper = _independent_prv(history)
    assert ours >= estimate - EPS_ERROR  # never under-reported
    assert ours == pytest.approx(upper, rel=0.01, abs=2 * EPS_ERROR)
    assert low <= ours


@pytest.mark.parametrize("history", HISTORIES, ids=lambda h: f"{len(h)}-segment")
def test_rdp_epsilon_agrees_with_independent_rdp_and_bounds_prv(history):
    ours = epsilon_of(history, DELTA, "rdp")
    reference = _independent_rdp(history)
    assert ours >= reference * (1 - 1e-3)  # Opacus' orders are a subset: never lower
    assert ours == pytest.approx(reference, rel=0.03)
    assert ours >= _independent_prv(history)[1]  # an upper bound on the near-exact ε


ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


def _log_a(q, sigma, alpha):
    """log A_α by quadrature, in log space around the integrand's peak."""
    def log_f(z):
        mix = np.logaddexp(np.log1p(-q) if q < 1 else -np.inf,
                           np.log(q) + (2 * z - 1) / (2 * sigma**2))
        return -z**2 / (2 * sigma**2) - np.log(sigma * np.sqrt(2 * np.pi)) + alpha * mix

    lo, hi = -15 * sigma, alpha + 15 * sigma
    grid = np.linspace(lo, hi, 20001)
    peak = grid[np.argmax(log_f(grid))]
    m = float(log_f(peak))
    val, _ = integrate.quad(lambda z: np.exp(log_f(z) - m), lo, hi, points=[0.0, peak],
                            limit=500, epsabs=0, epsrel=1e-10)
    return m + np.log(val)


def _quadrature_rdp_epsilon(history):
    """ε from the integrated RDP curve, with the RDP-to-DP conversion Opacus states (Balle
    et al. 2020)."""
    best = np.inf
    for a in ORDERS:
        rdp = sum(n * _log_a(q, s, a) / (a - 1) for s, q, n in history)
        best = min(best, rdp + np.log1p(-1 / a) - (np.log(DELTA) + np.log(a)) / (a - 1))
    return best


@pytest.mark.parametrize("history", HISTORIES, ids=lambda h: f"{len(h)}-segment")
def test_rdp_epsilon_agrees_with_the_rdp_curve_integrated_here(history):
    ours = epsilon_of(history, DELTA, "rdp")
    reference = _quadrature_rdp_epsilon(history)
    assert ours >= reference * (1 - 1e-6)  # never under-reported
    assert ours == pytest.approx(reference, rel=1e-6)
