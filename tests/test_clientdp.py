"""Client-level DP (DP-FedAvg) at the coordinator: clipping, fixed denominator, noise scale,
durable accounting that never under-reports, budget stop, and the ledger beside record-level."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from dpfl.server.clientdp import ClientLevelDP
from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import FedConfig
from dpfl.shared.federation.ledger import PrivacyLedger
from dpfl.shared.federation.protocol import SiteReport


def _cdp(tmp_path, **kw):
    args = dict(clip=1.0, noise_multiplier=1e-9, delta=1e-3, budget=1e12)
    return ClientLevelDP(tmp_path / "cdp.json", **{**args, **kw})


def test_each_update_is_clipped_and_the_denominator_is_the_sample(tmp_path):
    cdp = _cdp(tmp_path)
    ref = {"a": np.zeros(3, np.float32), "b": np.ones((2, 2), np.float32)}
    far = {"a": np.array([300.0, 0, 0], np.float32), "b": ref["b"] + 400.0}  # norm 850
    near = {"a": np.array([0, 0.3, 0], np.float32), "b": ref["b"].copy()}
    out = cdp.aggregate(ref, [far, near], sampled=4)  # 2 answered of 4 sampled
    d_far = np.concatenate([far["a"], (far["b"] - 1).ravel()])
    clipped = d_far / np.linalg.norm(d_far)  # scaled to norm 1, direction kept
    np.testing.assert_allclose(out["a"], (clipped[:3] + near["a"]) / 4, atol=1e-6)
    np.testing.assert_allclose(out["b"], 1 + clipped[3:].reshape(2, 2) / 4, atol=1e-6)
    assert out["a"].dtype == np.float32


def test_noise_has_std_z_clip_over_sampled_and_is_not_reproducible(tmp_path):
    ref = {"w": np.zeros(200_000, np.float32)}
    a = _cdp(tmp_path, noise_multiplier=2.0, clip=0.5).aggregate(ref, [], sampled=4)["w"]
    b = _cdp(tmp_path, noise_multiplier=2.0, clip=0.5).aggregate(ref, [], sampled=4)["w"]
    assert a.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert abs(a.mean()) < 0.005
    assert not np.allclose(a, b)  # fresh OS entropy each time, no recorded seed


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Tight epsilon of a mu-GDP mechanism (Dong, Roth, Su): the exact value for composed
    Gaussian mechanisms, a lower bound for any sound accountant."""
    def tradeoff_gap(e: float) -> float:
        return norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta

    return brentq(tradeoff_gap, 0.0, 500.0)


@pytest.mark.parametrize("z,rounds", [(1.0, 3), (4.0, 20)])
def test_epsilon_is_sound_durable_and_budget_stops_rounds(tmp_path, z, rounds):
    cdp = _cdp(tmp_path, noise_multiplier=z, budget=1e6)
    for _ in range(rounds):
        spend = cdp.commit_release()
    exact = _gaussian_epsilon(math.sqrt(rounds) / z, 1e-3)
    assert spend.releases == rounds
    assert exact <= spend.epsilon <= exact * 1.6 + 0.5  # never under the true value
    again = ClientLevelDP(tmp_path / "cdp.json", clip=1.0, noise_multiplier=z, delta=1e-3,
                          budget=1e6)
    assert again.spend() == spend  # survives a coordinator restart
    (tmp_path / "b").mkdir()
    tight = _cdp(tmp_path / "b", noise_multiplier=z, budget=spend.epsilon * 1.0001)
    for _ in range(rounds):
        assert tight.can_release()
        tight.commit_release()
    assert not tight.can_release()


def test_ledger_reports_client_level_beside_record_level(tmp_path):
    led = PrivacyLedger(tmp_path / "ledger.json")
    rep = SiteReport("h1", 1.5, 1e-5, 10.0, 1.1, 0.1, 10, 100)
    cl = {"epsilon": 7.2, "delta": 1e-3, "budget": 10.0, "noise_multiplier": 1.0, "clip": 0.1,
          "releases": 1}
    led.record_round(1, [rep], client_level=cl)
    again = PrivacyLedger.load_or_create(tmp_path / "ledger.json")
    assert again.client_level == cl and again.rounds[0]["client_level"] == cl
    assert again.global_guarantee() == (1.5, 1e-5)  # record level unchanged by it
    assert "client-level" in again.table() and "7.200" in again.table()


@pytest.mark.parametrize("bad", [{"client_dp_clip": -1.0},
                                 {"client_dp_clip": 0.1, "client_dp_noise": 0.0},
                                 {"client_dp_clip": 0.1, "client_dp_delta": 1.0},
                                 {"client_dp_clip": 0.1, "client_dp_epsilon": -2.0}])
def test_client_dp_config_out_of_range_is_refused(bad):
    with pytest.raises(ConfigError, match="client-dp"):
        FedConfig(**bad)
