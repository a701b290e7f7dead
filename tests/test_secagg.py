"""Secure aggregation (SecAgg+) composed with the sites' DP-SGD: configuration, the sites'
self-checks, and a real simulated federation (Flower's simulation engine, tiny models, CPU)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from safetensors.numpy import load_file

from dpfl.server.secagg import masked_shape_problem
from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import FedConfig
from dpfl.shared.ldm.models import build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant

from .test_federation import ALLOWED_METRICS, tiny_sites

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bad, words", [
    (dict(client_dp_clip=0.1), "client-dp-clip"),
    (dict(min_train_nodes=1), "min-train-nodes >= 2"),
    (dict(secagg_threshold=0.5), "secagg-threshold"),
    (dict(secagg_max_weight=0.0), "secagg-max-weight"),
    (dict(secagg_min_contributions=1), "secagg-min-contributions"),
    (dict(secagg_min_contributions=3), "min-train-nodes >= 3")])
def test_secagg_config_refuses_what_it_cannot_do(bad, words):
    with pytest.raises(ConfigError, match=words):
        FedConfig(**{"secagg": True, "min_train_nodes": 2, **bad})
    FedConfig(secagg=True, min_train_nodes=2)
    assert FedConfig.from_run_config({"secagg": "true", "min-train-nodes": 2}).secagg


def test_secure_train_withholds_what_the_coordinator_can_no_longer_check(monkeypatch,
                                                                         task_identity):
    """The site puts its own update through the protocol's update check, with the SecAgg+
    range and the run's norm bound taken from the round's config, before masking; a failing
    update travels as a zero vector of weight 0 and the reason in the site record (the
    check's own rejections are in test_protocol.py)."""
    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from dpfl.client import secagg as client_secagg
    from dpfl.shared.federation.config import RoundPlan

    ref = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}

    class FakeSite:
        cfg = type("Cfg", (), {"site_id": "h1"})
        update = {}

        def base_model(self, fingerprint):
            return None

        def local_silo(self, ldm):
            return (np.zeros((40, 1)), None)

        def train_round(self, plan, adapter):
            return self.update, {"num-examples": 40, "epsilon": 1.0, "trained": 1}

    def reply(update, max_norm):
        site = FakeSite()
        site.update = update
        config = {**RoundPlan(base_fingerprint="sha256:x").to_record(), "server-round": 1,
                  "dpfl-adapter-keys": "a\nb", "dpfl-secagg-max-weight": 64.0,
                  "dpfl-secagg-clip-range": 8.0, "dpfl-max-update-norm": max_norm}
        params = compat.parameters_to_arrayrecord(ndarrays_to_parameters(list(ref.values())),
                                                  keep_input=True)
        msg = Message(content=RecordDict({"fitins.parameters": params,
                                          "fitins.config": ConfigRecord(config)}),
                      dst_node_id=1, message_type="train")
        out = client_secagg.secure_train(site, msg).content
        return (out.metric_records["fitres.num_examples"]["num_examples"],
                dict(out.config_records["site"]))

    good = {"a": np.full((2, 3), 0.1, np.float32), "b": np.ones(4, np.float32)}
    assert reply(good, 0.0) == (40, {"site-id": "h1"})  # 0: no norm bound
    weight, record = reply({**good, "b": np.full(4, 9.0, np.float32)}, 0.0)
    assert weight == 0 and "beyond the SecAgg+ range 8" in record["withheld"]
    weight, record = reply(good, 0.2)  # distance sqrt(6 * 0.1**2) = 0.245
    assert weight == 0 and "exceeds the bound 0.2" in record["withheld"]
    assert reply(good, 0.25) == (40, {"site-id": "h1"})


def _masked_reply(shapes, weight, examples):
    masked = [ndarray_to_bytes(np.zeros(s, np.int64)) for s in shapes]
    content = RecordDict({
        RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: masked}),
        "fitres.num_examples": MetricRecord({"num_examples": weight}),
        "metrics": MetricRecord({"num-examples": examples})})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_coordinator_screens_the_form_of_masked_replies(task_identity):
    shapes = [(2, 3), (4,)]
    assert masked_shape_problem(_masked_reply([(1,), (2, 3), (4,)], 40, 40), shapes, 64) is None
    assert masked_shape_problem(_masked_reply([(1,), (2, 3), (4,)], 0, 40), shapes, 64) is None
    assert "shapes" in masked_shape_problem(_masked_reply([(1,), (6,), (4,)], 40, 40), shapes, 64)
    assert "shapes" in masked_shape_problem(_masked_reply([(1,), (2, 3)], 40, 40), shapes, 64)
    assert "weight" in masked_shape_problem(_masked_reply([(1,), (2, 3), (4,)], 39, 40), shapes,
                                            64)
    assert "weight" in masked_shape_problem(_masked_reply([(1,), (2, 3), (4,)], 80, 80), shapes,
                                            64)


def _sites(tmp):
    base = save_ldm(build_ldm("tiny", seed=0), tmp / "base")
    sites = tiny_sites(tmp, base)
    cfg = dict(base_model=str(base), run_dir=str(tmp / "run"), num_rounds=2, batch_size=16,
               noise_multiplicity=2, target_epsilon=4.0, min_available_nodes=3,
               min_train_nodes=2, sample_steps=2, sample_every=0, lr=5e-3, secagg=True,
               secagg_max_weight=64.0)
    (tmp / "plain").mkdir()
    return sites, cfg


def _simulate(tmp, sites, cfg, **extra):
    args = dict(cfg=cfg, sites=sites, spy=str(tmp / "spy.jsonl"), plain=str(tmp / "plain"),
                **extra)
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.secagg_scenario", json.dumps(args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (tmp / "scenario.log").write_text(proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secagg")
    sites, cfg = _sites(tmp)
    # site-2 has nearly spent its budget: it takes part in round 1 with weight 0
    sites[2]["epsilon_budget"] = 2.0
    PersistentAccountant.open(tmp / "state2" / "accountant.json", kind="rdp", delta=1e-3,
                              budget=2.0).commit(2.2, 0.5, 5)
    _simulate(tmp, sites, cfg)
    return tmp


def _plain(tmp, site, rnd):
    with np.load(tmp / "plain" / f"{site}-r{rnd}.npz") as f:
        return dict(f)


def _weighted_mean(tmp, rnd, sites):
    plain = [_plain(tmp, s, rnd) for s in sites]
    weights = np.array([float(p["weight"]) for p in plain])
    vectors = [[p[k] for k in sorted(p) if k.startswith("vector:")] for p in plain]
    return [sum(w * v[i].astype(np.float64) for w, v in zip(weights, vectors)) / weights.sum()
            for i in range(len(vectors[0]))]


def test_secure_sum_equals_plain_fedavg_of_the_same_updates(secure_federation):
    tmp = secure_federation
    r1 = {s: _plain(tmp, s, 1) for s in ("site-0", "site-1", "site-2")}
    assert float(r1["site-2"]["weight"]) == 0  # exhausted: a zero vector of weight 0
    assert all(float(r1[s]["weight"]) == 48 for s in ("site-0", "site-1"))
    keys = sorted(k[len("global:"):] for k in r1["site-0"] if k.startswith("global:"))
    # round 1's released global = the weighted mean of what the sites masked in round 1,
    # up to SecAgg+ quantisation (step 16 / 2**22 per value and site, over sum n / max_weight)
    mean1 = _weighted_mean(tmp, 1, ["site-0", "site-1", "site-2"])
    received2 = _plain(tmp, "site-0", 2)
    step = 16 / 2**22 * 3 / (96 / 64)
    moved = 0.0
    for key, mean in zip(keys, mean1):
        got = received2[f"global:{key}"].astype(np.float64)
        np.testing.assert_allclose(got, mean, rtol=0, atol=step + 1e-6)
        moved = max(moved, float(np.abs(got - r1["site-0"][f"global:{key}"]).max()))
    assert moved > 100 * step  # the sites' updates are far above the quantisation error
    # round 2 (site-2 no longer sampled): the final checkpoint is the mean of two updates
    final = load_file(tmp / "run" / "global" / "adapter.safetensors")
    for key, mean in zip(keys, _weighted_mean(tmp, 2, ["site-0", "site-1"])):
        np.testing.assert_allclose(final[key].astype(np.float64), mean, rtol=0,
                                   atol=16 / 2**22 * 2 / (96 / 64) + 1e-6)
    assert not (tmp / "plain" / "site-2-r2.npz").exists()


def test_only_masked_vectors_and_privacy_scalars_leave_a_site(secure_federation):
    spy = [json.loads(line) for line in (secure_federation / "spy.jsonl").read_text()
           .splitlines()]
    stages = [r["stage"] for r in spy]
    assert stages.count("collect_masked_vectors") == 5  # 3 sites, then 2
    assert stages.count("setup") == stages.count("unmask") == 5
    for reply in spy:
        assert not reply["error"]
        assert all(n == 0 for n in reply["array_records"].values())  # no tensor in clear
        if reply["stage"] != "collect_masked_vectors":
            assert set(reply["config_records"]) == {RECORD_KEY_CONFIGS}
            assert not reply["metric_records"]
            continue
        assert reply["masked"] > 1  # masked weight + one masked tensor per adapter key
        assert set(reply["metric_records"]) == {"metrics", "fitres.num_examples"}
        assert set(reply["metric_records"]["metrics"]) == ALLOWED_METRICS
        assert reply["metric_records"]["fitres.num_examples"]["num_examples"] in (
            0, reply["metric_records"]["metrics"]["num-examples"])
        assert set(reply["config_records"]) == {RECORD_KEY_CONFIGS, "site", "fitres.metrics",
                                                "fitres.status"}
        assert reply["config_records"]["fitres.metrics"] == []
        assert set(reply["site"]) == {"site-id"}


def test_per_site_epsilon_reaches_the_ledger(secure_federation):
    tmp = secure_federation
    led = json.loads((tmp / "run" / "ledger.json").read_text())
    r1, r2 = led["rounds"]
    assert sorted(r1["sites"]) == ["site-0", "site-1", "site-2"]
    assert r1["rejected"] == {"site-2": "did not train (budget exhausted or refused)"}
    assert sorted(r2["sites"]) == ["site-0", "site-1"] and r2["rejected"] == {}
    for site in ("site-0", "site-1"):
        assert r2["sites"][site]["epsilon"] > r1["sites"][site]["epsilon"] > 0
        own = PersistentAccountant.load(tmp / f"state{site[-1]}" / "accountant.json")
        assert led["sites"][site]["epsilon"] == pytest.approx(own.epsilon(), rel=1e-9)
    assert led["global"]["epsilon"] == max(s["epsilon"] for s in led["sites"].values())
    metrics = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["accepted"] for m in metrics] == [2, 2]
    assert math.isfinite(metrics[-1]["global_epsilon"])


def test_a_site_that_drops_before_masking_costs_only_its_own_update(tmp_path):
    sites, cfg = _sites(tmp_path)
    _simulate(tmp_path, sites, {**cfg, "num_rounds": 1},
              fail=["site-1", 1, "collect_masked_vectors"])
    assert not (tmp_path / "plain" / "site-1-r1.npz").exists()  # it never trained
    led = json.loads((tmp_path / "run" / "ledger.json").read_text())
    (r1,) = led["rounds"]
    assert sorted(r1["sites"]) == ["site-0", "site-2"]
    ((who, why),) = r1["rejected"].items()  # named by node: it never replied with its name
    assert who.startswith("node-") and "drops out" in why
    # its pairwise masks were recovered from the others' key shares: the release is the
    # weighted mean of the two surviving updates
    keys = sorted(k[len("global:"):] for k in _plain(tmp_path, "site-0", 1)
                  if k.startswith("global:"))
    final = load_file(tmp_path / "run" / "global" / "adapter.safetensors")
    for key, mean in zip(keys, _weighted_mean(tmp_path, 1, ["site-0", "site-2"])):
        np.testing.assert_allclose(final[key].astype(np.float64), mean, rtol=0,
                                   atol=16 / 2**22 * 2 / (96 / 64) + 1e-6)


def test_masked_update_without_a_recorded_report_stays_out_of_the_sum(tmp_path, task_identity):
    """A site whose privacy report cannot be recorded is dropped before unmasking (SecAgg+
    then treats it as a dropout): no aggregate may contain an update whose spend is not on
    the ledger. A weight-0 reply still takes part, its masks must cancel."""
    from dpfl.server.secagg import SecureRound
    from dpfl.server.strategy import NodeSites
    from dpfl.shared.federation.config import RoundPlan
    from dpfl.shared.federation.ledger import PrivacyLedger

    shapes = [(2, 3), (4,)]
    good, unreported, idle = (_masked_reply([(1,), (2, 3), (4,)], w, w) for w in (40, 40, 0))
    for msg, site in ((good, "h0"), (unreported, "h1"), (idle, "h2")):
        msg.content["site"] = ConfigRecord({"site-id": site})
    cfg = FedConfig(secagg=True, min_train_nodes=2, secagg_max_weight=64.0)
    secure = SecureRound(None, cfg, RoundPlan(), PrivacyLedger(tmp_path / "ledger.json"),
                         NodeSites(tmp_path / "nodes.json"))
    kept, rejected, accepted = secure._screen(1, [good, unreported, idle], [], shapes,
                                              reported={"h0", "h2"})
    assert kept == [good, idle] and accepted == 1
    assert "malformed privacy report" in rejected["h1"]


def test_unmasked_aggregate_is_checked_before_release(tmp_path):
    """The released aggregate passes the protocol's update check (float64 is fine: it is
    dequantised); one that fails keeps the global adapter, and the outcome says why."""
    from dpfl.server.secagg import SecureRound, _Recorded
    from dpfl.server.strategy import NodeSites
    from dpfl.shared.federation.config import RoundPlan
    from dpfl.shared.federation.ledger import PrivacyLedger

    cfg = FedConfig(secagg=True, min_train_nodes=2, max_update_norm=1.0)
    secure = SecureRound(None, cfg, RoundPlan(), PrivacyLedger(tmp_path / "ledger.json"),
                         NodeSites(tmp_path / "nodes.json"))
    adapter = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32),
               "frozen": np.ones(2, np.float32)}
    keys = ["a", "b"]  # what travelled; "frozen" stays as it was
    recorded = _Recorded(2, {"h2": "did not train (budget exhausted or refused)"}, {"round": 1})

    out = secure._release(1, adapter, keys, [np.full((2, 3), 0.1), np.ones(4)], recorded)
    assert out.accepted == 2 and out.rejected == recorded.rejected and out.entry == {"round": 1}
    assert out.adapter["a"].dtype == np.float32 and np.allclose(out.adapter["a"], 0.1)
    assert out.adapter["frozen"] is adapter["frozen"] and out.client_level is None
    assert secure._release(1, adapter, keys, None, recorded).adapter is adapter
    for aggregate, why in [([np.full((2, 3), np.nan), np.ones(4)], "non-finite"),
                           ([np.full((2, 3), 0.5), np.ones(4)], "exceeds the bound 1"),
                           ([np.zeros((3, 2)), np.ones(4)], "shape"),
                           ([np.zeros((2, 3))], "1 tensors for 2 adapter keys")]:
        out = secure._release(1, adapter, keys, aggregate, recorded)
        assert out.adapter is adapter and out.accepted == 0
        assert why in out.rejected["<aggregate>"] and "h2" in out.rejected


def _reported(site, weight, examples=40):
    """A masking-stage reply of ``site`` with weight ``weight`` and a full privacy report."""
    from dpfl.shared.federation.protocol import SiteReport

    msg = _masked_reply([(1,), (2, 3), (4,)], weight, examples)
    report = SiteReport(site, 1.0, 1e-5, 10.0, 1.1, 0.1, 10, examples, trained=bool(weight))
    msg.content["metrics"] = MetricRecord(report.to_metrics())
    msg.content["site"] = ConfigRecord({"site-id": site})
    return msg


def _secure_round(tmp_path, **cfg):
    from dpfl.server.secagg import SecureRound
    from dpfl.server.strategy import NodeSites
    from dpfl.shared.federation.config import RoundPlan
    from dpfl.shared.federation.ledger import PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "ledger.json")
    cfg = FedConfig(**{"secagg": True, "min_train_nodes": 2, "secagg_max_weight": 64.0, **cfg})
    return SecureRound(None, cfg, RoundPlan(), ledger, NodeSites(tmp_path / "nodes.json")), ledger


def test_one_real_update_is_never_unmasked(tmp_path, task_identity):
    """Issue 13, item 2: masks came off once max(1, min-replies) updates were accepted, and
    min-replies defaults to 1: beside sites that withheld or were exhausted (weight 0), the
    "sum" was one site's update in clear. Now fewer than secagg-min-contributions (>= 2)
    real updates unmask nothing; every site's spend is still on record, with the reason."""
    shapes = [(2, 3), (4,)]
    secure, ledger = _secure_round(tmp_path)
    one = [_reported("h0", 40), _reported("h1", 0), _reported("h2", 0)]
    kept, recorded = secure._record(1, [], one, shapes)
    assert kept == [] and recorded.accepted == 1
    assert "fewer than 2" in recorded.rejected["<secagg-min-contributions>"]
    on_disk = json.loads((tmp_path / "ledger.json").read_text())
    assert sorted(on_disk["rounds"][0]["sites"]) == ["h0", "h1", "h2"]
    assert "<secagg-min-contributions>" in on_disk["rounds"][0]["rejected"]
    assert secure._release(1, {"a": np.zeros((2, 3)), "b": np.zeros(4)}, ["a", "b"], None,
                           recorded).accepted == 0
    two = [_reported("h0", 40), _reported("h1", 40), _reported("h2", 0)]
    kept, recorded = secure._record(2, [], two, shapes)
    assert kept == two and recorded.accepted == 2
    assert "<secagg-min-contributions>" not in recorded.rejected
    # configurable upward
    (tmp_path / "three").mkdir()
    secure, _ = _secure_round(tmp_path / "three", min_train_nodes=3, secagg_min_contributions=3)
    kept, recorded = secure._record(1, [], two, shapes)
    assert kept == [] and "fewer than 3" in recorded.rejected["<secagg-min-contributions>"]


def test_too_few_sampled_sites_train_nothing(tmp_path, task_identity):
    """When sampling found fewer sites than a sum needs (the others exhausted), the round
    does not start: no site trains, nothing is spent, the ledger says why."""
    secure, ledger = _secure_round(tmp_path)
    adapter = {"a": np.zeros((2, 3), np.float32)}
    msgs = [Message(content=RecordDict(), dst_node_id=1, message_type="train")]
    out = secure.run(1, adapter, msgs)  # the grid (None) is never touched
    assert out.adapter is adapter and out.accepted == 0
    assert "not started: 1 site(s) sampled" in out.rejected["<secagg>"]
    assert ledger.last_round == 1 and ledger.rounds[0]["sites"] == {}
