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


def test_zero_update_needs_no_clipping_and_does_not_crash(tmp_path):
    """Issue 13, item 5: Flower's clipping helper divides by the update's norm, so an update
    equal to the global adapter (norm 0) raised ZeroDivisionError. Norm 0: nothing to clip."""
    cdp = _cdp(tmp_path)
    ref = {"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.float32)}
    same = {k: v.copy() for k, v in ref.items()}
    moved = {"a": ref["a"] + np.array([0.0, 0.6, 0.0], np.float32), "b": ref["b"].copy()}
    out = cdp.aggregate(ref, [same, moved], sampled=2)
    np.testing.assert_allclose(out["a"], [1.0, 1.3, 1.0], atol=1e-6)
    np.testing.assert_allclose(out["b"], 0.0, atol=1e-6)


class _Grid:
    """Answers every instruction with the reply ``answer(node)`` builds."""

    def __init__(self, answer, nodes=2):
        self.answer, self.nodes = answer, nodes

    def get_node_ids(self):
        return list(range(1, self.nodes + 1))

    def send_and_receive(self, msgs, timeout=None):
        replies = []
        for msg in msgs:
            reply = self.answer(msg.metadata.dst_node_id)
            reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
            replies.append(reply)
        return replies


def _plain_round(tmp_path, cdp, updates):
    """A PlainRound over a grid whose node i replies with ``updates[i]`` and a full report."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from dpfl.server.rounds import PlainRound
    from dpfl.server.strategy import AdapterFedAvg, NodeSites

    def answer(node):
        report = SiteReport(f"h{node}", 1.0, 1e-5, 10.0, 1.1, 0.1, 10, 40)
        return Message(content=RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in updates[node].items()}),
            "metrics": MetricRecord(report.to_metrics()),
            "site": ConfigRecord({"site-id": f"h{node}"})}), dst_node_id=0, message_type="train")

    msgs = [Message(content=RecordDict(), dst_node_id=n, message_type="train") for n in updates]
    for n, msg in zip(updates, msgs):
        msg.metadata.__dict__["_message_id"] = f"m{n}"  # what the grid sets when it pushes
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    plain = PlainRound(_Grid(answer), FedConfig(client_dp_clip=0.5), ledger,
                       NodeSites(tmp_path / "nodes.json"),
                       AdapterFedAvg(excluded=lambda n: False), cdp)
    return plain, msgs, ledger


@pytest.mark.usefixtures("task_identity")
def test_round_with_a_real_zero_update_releases_and_spends_once(tmp_path):
    """The same crash in a real round came after the ledger and the client-level release
    were committed, so every crash burned client-level budget: now the round releases."""
    cdp = _cdp(tmp_path, clip=0.5, budget=1e30)
    adapter = {"w": np.zeros(4, np.float32)}
    far = {"w": np.array([3.0, 4.0, 0.0, 0.0], np.float32)}  # norm 5, clipped to 0.5
    plain, msgs, ledger = _plain_round(tmp_path, cdp, {1: dict(adapter), 2: far})
    out = plain.run(1, adapter, msgs)
    assert out.accepted == 2 and cdp.accountant.steps == 1 and ledger.last_round == 1
    np.testing.assert_allclose(out.adapter["w"], [0.15, 0.2, 0.0, 0.0], atol=1e-6)
    assert out.client_level["releases"] == 1


@pytest.mark.usefixtures("task_identity")
def test_a_round_that_cannot_release_commits_nothing(tmp_path, monkeypatch):
    """Everything that can fail comes before the commits: the client-level accountant and
    the ledger stay untouched when the round's aggregate cannot be prepared."""
    cdp = _cdp(tmp_path, clip=0.5, budget=1e30)
    adapter = {"w": np.zeros(4, np.float32)}
    plain, msgs, _ = _plain_round(tmp_path, cdp, {1: dict(adapter)})
    before = (tmp_path / "cdp.json").read_bytes() if (tmp_path / "cdp.json").exists() else None

    def broken(*args, **kwargs):
        raise RuntimeError("cannot prepare")

    monkeypatch.setattr(cdp, "clipped_mean", broken)
    with pytest.raises(RuntimeError, match="cannot prepare"):
        plain.run(1, adapter, msgs)
    assert cdp.accountant.steps == 0
    after = (tmp_path / "cdp.json").read_bytes() if (tmp_path / "cdp.json").exists() else None
    assert after == before
    assert not (tmp_path / "ledger.json").exists()


def test_client_level_noise_comes_from_the_os_csprng(tmp_path, monkeypatch):
    """Issue 13, item 7: the coordinator's noise is Opacus' secure-mode construction over
    os.urandom (dpfl.shared.privacy.securenoise), never a numpy generator."""
    import os

    drawn = []
    urandom = os.urandom

    def counting(n):
        drawn.append(n)
        return urandom(n)

    def forbidden(*args, **kwargs):
        raise AssertionError("client-level noise must not come from numpy's PRNG")

    cdp = _cdp(tmp_path, noise_multiplier=2.0, clip=0.5)
    monkeypatch.setattr(os, "urandom", counting)
    monkeypatch.setattr(np.random, "default_rng", forbidden)
    monkeypatch.setattr(np.random, "normal", forbidden)
    out = cdp.aggregate({"w": np.zeros(20_000, np.float32)}, [], sampled=4)["w"]
    assert sum(drawn) >= 4 * 8 * 20_000  # four 64-bit draws per value
    assert out.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.03)


def test_client_dp_delta_must_be_below_one_over_the_number_of_sites(tmp_path):
    """Issue 13, item 7: the documented rule is enforced at configuration, against the
    fewest sites a run has (max of min-train-nodes and min-available-nodes), and before
    every round against the sites connected, before anything is sent."""
    with pytest.raises(ConfigError, match="client-dp-delta=0.4 must be < 1 / number of sites"):
        FedConfig(client_dp_clip=0.1, client_dp_delta=0.4, min_available_nodes=3)
    with pytest.raises(ConfigError, match="client-dp-delta"):
        FedConfig(client_dp_clip=0.1, client_dp_delta=0.5, min_train_nodes=2)
    FedConfig(client_dp_clip=0.1, client_dp_delta=0.3, min_available_nodes=3)
    FedConfig(client_dp_delta=0.9, min_available_nodes=3)  # client-level DP off: no rule
    cdp = _cdp(tmp_path, delta=0.25)
    cdp.check_sites(3)
    with pytest.raises(ConfigError, match="client-dp-delta=0.25 must be < 1 / number of sites"):
        cdp.check_sites(4)


@pytest.mark.usefixtures("task_identity")
def test_round_is_refused_when_more_sites_connect_than_delta_allows(tmp_path):
    from types import SimpleNamespace

    from dpfl.server.rounds import sample
    from dpfl.server.strategy import AdapterFedAvg
    from dpfl.shared.federation.config import RoundPlan

    cfg = FedConfig(client_dp_clip=0.1, client_dp_delta=0.4)  # fine for the 1 site it asks for
    fed = SimpleNamespace(cfg=cfg, plan=RoundPlan())
    cdp = _cdp(tmp_path, delta=0.4, noise_multiplier=1.0)
    strategy = AdapterFedAvg(excluded=lambda n: False)
    assert len(sample(strategy, _Grid(None, nodes=2), fed, 1, {"w": np.zeros(2)}, cdp)) == 2
    with pytest.raises(ConfigError, match="for the 3 sites connected"):
        sample(strategy, _Grid(None, nodes=3), fed, 1, {"w": np.zeros(2)}, cdp)
    assert cdp.accountant.steps == 0
