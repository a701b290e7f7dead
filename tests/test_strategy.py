import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from dpfl.server.strategy import AdapterFedAvg

pytestmark = pytest.mark.usefixtures("task_identity")

# The update check itself (keys, shapes, dtypes, finiteness, norm) is tested on plain arrays in
# test_protocol.py; here: the strategy applies it to Flower replies.

REF = {"w.lora_A": np.zeros((2, 3), np.float32), "w.lora_B": np.zeros((3, 2), np.float32)}


def _reply(site, arrays, n, trained=1):
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": n, "trained": trained, "epsilon": 1.0}),
        "site": ConfigRecord({"site-id": site})})
    return Message(content=content, dst_node_id=0, message_type="train")


def test_weighted_fedavg_of_valid_replies_only():
    strat = AdapterFedAvg(excluded=lambda n: False)
    a = {k: np.full(v.shape, 1.0, np.float32) for k, v in REF.items()}
    b = {k: np.full(v.shape, 4.0, np.float32) for k, v in REF.items()}
    nan = {k: np.full(v.shape, np.nan, np.float32) for k, v in REF.items()}
    replies = [_reply("a", a, 100), _reply("b", b, 300), _reply("evil", nan, 10_000)]
    ok, rejected = strat.split_replies(1, replies, REF)
    assert [m.content["site"]["site-id"] for m in ok] == ["a", "b"]
    assert "non-finite" in rejected["evil"]
    agg, _ = strat.aggregate_valid(1, ok)
    # (100*1 + 300*4) / 400 = 3.25, by hand
    for v in agg.values():
        np.testing.assert_allclose(v.numpy(), 3.25)


def test_replies_that_did_not_train_are_not_averaged():
    strat = AdapterFedAvg(excluded=lambda n: False)
    ok, rejected = strat.split_replies(1, [_reply("a", REF, 10, trained=0)], REF)
    assert ok == [] and "did not train" in rejected["a"]
    assert strat.aggregate_valid(1, ok) == (None, None)


def test_error_reply_from_a_dead_node_is_rejected_not_fatal():
    """The SuperLink answers for a node that died mid-round with an error message that has
    no content; it must be logged as a rejection, named by the site the node was before."""
    from flwr.app import Error

    sent = Message(content=RecordDict(), dst_node_id=7, message_type="train")
    dead = Message(Error(code=0, reason="node unavailable"), reply_to=sent)
    strat = AdapterFedAvg(excluded=lambda n: False)
    live = _reply("a", REF, 10)
    sent.metadata.__dict__["_message_id"] = "m7"  # what the grid sets when it pushes
    dead.metadata.__dict__["_reply_to_message_id"] = "m7"
    ok, rejected = strat.split_replies(1, [dead, live], REF, {7: "h2"}, {"m7": 7})
    assert ok == [live]
    assert "node unavailable" in rejected["h2"]
    _, anonymous = strat.split_replies(1, [dead], REF, {}, {"m7": 7})
    assert list(anonymous) == ["node-7"]


def test_malformed_privacy_report_is_refused_not_fatal():
    """The report a Flower reply carries, read through SiteReport.from_metrics."""
    from dpfl.server.strategy import site_report

    full = {"epsilon": 1.5, "delta": 1e-5, "budget": 10.0, "sigma": 1.1, "sample-rate": 0.1,
            "steps": 7, "num-examples": 70, "exhausted": 0, "trained": 1}

    def reply(metrics):
        return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                           "site": ConfigRecord({"site-id": "h1"})}),
                       dst_node_id=0, message_type="train")

    good = site_report(reply(full))
    assert good.site == "h1" and good.epsilon == 1.5 and good.steps == 7
    missing = {k: v for k, v in full.items() if k != "sigma"}
    for bad in (missing, {**full, "epsilon": float("nan")}, {**full, "budget": -1.0},
                {**full, "num-examples": float("inf")}):
        assert site_report(reply(bad)) is None


def test_an_update_without_a_recorded_privacy_report_is_not_averaged():
    strat = AdapterFedAvg(excluded=lambda n: False)
    a = {k: np.full(v.shape, 1.0, np.float32) for k, v in REF.items()}
    replies = [_reply("a", a, 10), _reply("b", a, 10)]
    ok, rejected = strat.split_replies(1, replies, REF, reported={"a"})
    assert [m.content["site"]["site-id"] for m in ok] == ["a"]
    assert "malformed privacy report" in rejected["b"]


def test_updates_failing_the_check_or_the_weight_are_named_with_the_reason():
    strat = AdapterFedAvg(excluded=lambda n: False, max_update_norm=3.0)
    far = {k: v + 1.0 for k, v in REF.items()}  # distance sqrt(12) = 3.46
    near = {k: v + 0.5 for k, v in REF.items()}  # sqrt(3) = 1.73
    ok, rejected = strat.split_replies(1, [_reply("far", far, 10), _reply("half", near, 0.5),
                                           _reply("near", near, 10)], REF)
    assert [m.content["site"]["site-id"] for m in ok] == ["near"]
    assert rejected == {"far": "update norm 3.46 exceeds the bound 3",
                        "half": "num-examples must be a whole number >= 1, got 0.5"}


# --- enrolment (a deployment): a node is the site its key was listed as, with a weight bound


def _from(node, msg):
    """``msg``'s content as node ``node``'s reply to an instruction sent to it."""
    sent = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=msg.content, reply_to=sent)


def _enrolment():
    from dpfl.server.policy import Enrolled

    return {1: Enrolled("a", 1, "k1", 1000), 2: Enrolled("b", 2, "k2", 1000),
            3: Enrolled("big", 3, "k3", 500)}


def test_a_weight_above_the_enrolled_bound_is_rejected_and_the_others_averaged(tmp_path):
    from dpfl.server.strategy import NodeSites

    sites = NodeSites(tmp_path / "nodes.json", _enrolment())
    strat = AdapterFedAvg(excluded=lambda n: False)
    a = {k: np.full(v.shape, 1.0, np.float32) for k, v in REF.items()}
    b = {k: np.full(v.shape, 4.0, np.float32) for k, v in REF.items()}
    big = {k: np.full(v.shape, 100.0, np.float32) for k, v in REF.items()}
    replies = [_from(1, _reply("a", a, 100)), _from(2, _reply("b", b, 300)),
               _from(3, _reply("big", big, 10**9))]
    admitted, refused = sites.admit(1, replies)
    assert refused == {} and len(admitted) == 3
    ok, rejected = strat.split_replies(1, admitted, REF, max_examples=sites.max_examples)
    assert rejected == {"big": "num-examples 1000000000 exceeds the 500 examples the site "
                               "was enrolled with"}
    agg, _ = strat.aggregate_valid(1, ok)
    for v in agg.values():  # the weighted mean of a and b alone: (100*1 + 300*4) / 400
        np.testing.assert_allclose(v.numpy(), 3.25)
    # at its bound it is an ordinary site
    ok, rejected = strat.split_replies(1, [_from(3, _reply("big", big, 500))], REF,
                                       max_examples=sites.max_examples)
    assert len(ok) == 1 and rejected == {}


def test_a_node_answering_as_another_site_or_not_enrolled_is_refused(tmp_path, caplog):
    from dpfl.server.strategy import NodeSites

    sites = NodeSites(tmp_path / "nodes.json", _enrolment())
    replies = [_from(1, _reply("a", REF, 10)), _from(2, _reply("a", REF, 10)),
               _from(9, _reply("stranger", REF, 10))]
    admitted, refused = sites.admit(4, replies)
    assert [m.metadata.src_node_id for m in admitted] == [1]
    assert refused == {"b": "node 2 is enrolled as 'b' but answered as 'a'",
                       "node-9": "node 9 is not enrolled with this coordinator"}
    assert "round 4: reply refused (b)" in caplog.text
    assert sites.get(2) == "b" and sites.max_examples("nobody") == 0


def test_without_an_enrolment_every_reply_is_admitted_unbounded(tmp_path):
    from dpfl.server.strategy import NodeSites

    sites = NodeSites(tmp_path / "nodes.json")
    replies = [_from(9, _reply("anyone", REF, 10))]
    assert sites.admit(1, replies) == (replies, {})
    assert sites.max_examples("anyone") == float("inf")
