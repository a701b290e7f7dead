"""Client dropout and stragglers, in process: the coordinator's real round loop
(``run_federation``) against a grid whose sites are real :class:`Site` objects (tiny model,
real DP training and accountants), with one site answering round 1 only after its timeout.

Policy under test (FedConfig): ``round-timeout`` is what the grid is given to wait;
``min-train-nodes`` sets how many sites are asked; a site that has not answered when the
round times out is recorded as unanswered and the round completes with the others; its
late reply, when it comes, answers a message of an old round and is dropped (never
averaged into a later round, never a second report in the ledger); what it spent stays in
its own accountant and is carried by its next report.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.numpy import load_file

from dpfl.client.site import Site
from dpfl.server.rounds import run_federation
from dpfl.shared.federation.config import FedConfig, RoundPlan, SiteConfig
from dpfl.shared.ldm.models import build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant

from .test_federation import tiny_sites

NODES = {11: "site-0", 12: "site-1", 13: "site-2"}
STRAGGLER = 13


class StragglerGrid:
    """Trains every message at once with the real sites; the straggler's round-1 reply is
    withheld (its round times out) and delivered with round 2's replies."""

    def __init__(self, sites: dict[int, Site]):
        self.sites = sites
        self.timeouts: list[float] = []
        self.late: list[Message] = []
        self.delivered: list[list[Message]] = []  # per round, what the coordinator got

    def get_node_ids(self):
        return list(self.sites)

    def _answer(self, msg: Message) -> Message:
        site = self.sites[msg.metadata.dst_node_id]
        plan = RoundPlan.from_record(dict(msg.content["config"]))
        adapter = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        update, metrics = site.train_round(plan, adapter)
        content = RecordDict({"metrics": MetricRecord(metrics),
                              "site": ConfigRecord({"site-id": site.cfg.site_id}),
                              "arrays": ArrayRecord({k: Array(v) for k, v in update.items()})})
        reply = Message(content=content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        rnd = len(self.timeouts)
        out = list(self.late)  # replies to messages of an earlier round, arriving now
        self.late = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink does
            reply = self._answer(msg)
            if rnd == 1 and msg.metadata.dst_node_id == STRAGGLER:
                self.late.append(reply)
            else:
                out.append(reply)
        self.delivered.append(out)
        return out


def _sites(tmp, base) -> dict[int, Site]:
    """The three tiny sites as real :class:`Site` objects, by the node id the grid uses."""
    return {node: Site(SiteConfig(**fields)) for node, fields in
            zip(NODES, tiny_sites(tmp, base, epsilon_budget=50.0))}


@pytest.fixture(scope="module")
def straggler(tmp_path_factory, task_identity):
    tmp = tmp_path_factory.mktemp("straggler")
    base = save_ldm(build_ldm("tiny", seed=0), tmp / "base")
    sites = _sites(tmp, base)
    cfg = FedConfig(base_model=str(base), run_dir=str(tmp / "run"), num_rounds=2,
                    batch_size=16, noise_multiplicity=1, target_epsilon=4.0, lr=5e-3,
                    min_available_nodes=3, min_train_nodes=3, round_timeout=7.5,
                    sample_every=0, sample_steps=2)
    grid = StragglerGrid(sites)
    run_federation(grid, cfg)
    return {"tmp": tmp, "grid": grid, "cfg": cfg, "run": tmp / "run"}


def test_the_grid_waits_round_timeout_and_the_round_completes_without_the_straggler(straggler):
    assert straggler["grid"].timeouts == [7.5, 7.5]
    led = json.loads((straggler["run"] / "ledger.json").read_text())
    r1, r2 = led["rounds"]
    assert set(r1["sites"]) == {"site-0", "site-1"}
    assert r1["rejected"] == {"<1 unanswered>": "no reply within 7.5s"}
    assert set(r2["sites"]) == set(NODES.values()) and r2["rejected"] == {}
    metrics = [json.loads(line) for line in
               (straggler["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["accepted"] for m in metrics] == [2, 3]  # not 4: the late update is not counted


def test_late_update_for_an_old_round_is_not_averaged(straggler):
    """Round 2's global adapter is FedAvg of exactly round 2's three replies."""
    late, *current = straggler["grid"].delivered[1]  # what round 2's send_and_receive gave
    asked = {m.metadata.reply_to_message_id for m in current}
    assert len(current) == 3 and late.metadata.reply_to_message_id not in asked
    assert late.metadata.src_node_id == STRAGGLER  # the late reply did reach the loop
    weights = np.array([m.content["metrics"]["num-examples"] for m in current], np.float64)
    saved = load_file(str(straggler["run"] / "global" / "adapter.safetensors"))
    late = {k: v.numpy() for k, v in late.content["arrays"].items()}
    differs = 0.0
    for key in current[0].content["arrays"]:
        stack = np.stack([m.content["arrays"][key].numpy() for m in current])
        expected = np.tensordot(weights / weights.sum(), stack.astype(np.float64), axes=1)
        np.testing.assert_allclose(saved[key], expected, rtol=1e-5, atol=1e-7)
        differs = max(differs, float(np.abs(late[key] - expected).max()))
    assert differs > 1e-4  # averaging the late update in would have shown


def test_the_stragglers_spend_is_accounted_and_reported_next_round(straggler):
    led = json.loads((straggler["run"] / "ledger.json").read_text())
    own = PersistentAccountant.load(straggler["tmp"] / "state2" / "accountant.json")
    other = PersistentAccountant.load(straggler["tmp"] / "state0" / "accountant.json")
    assert own.steps == other.steps  # the late round-1 training was committed like any
    rep = led["rounds"][1]["sites"]["site-2"]
    assert rep["steps"] == own.steps and rep["epsilon"] == pytest.approx(own.epsilon())
    assert led["sites"]["site-2"]["epsilon"] == pytest.approx(own.epsilon())
    assert not led["flags"]


def test_min_replies_keeps_the_global_adapter_but_records_the_spend(tmp_path, task_identity):
    """Round 1 has 2 accepted updates (the straggler is late) and min-replies is 3: no new
    global adapter is made from two sites, but what they spent is in the ledger."""
    base = save_ldm(build_ldm("tiny", seed=0), tmp_path / "base")
    sites = _sites(tmp_path, base)
    cfg = FedConfig(base_model=str(base), run_dir=str(tmp_path / "run"), num_rounds=1,
                    batch_size=16, noise_multiplicity=1, target_epsilon=4.0, lr=5e-3,
                    min_available_nodes=3, min_train_nodes=3, round_timeout=1.0,
                    min_replies=3, sample_every=0, sample_steps=2)
    run_federation(StragglerGrid(sites), cfg)
    saved = load_file(str(tmp_path / "run" / "global" / "adapter.safetensors"))
    b = [v for k, v in saved.items() if "lora_B" in k]
    assert b and all(np.abs(v).max() == 0 for v in b)  # still the initial adapter (B = 0)
    (r1,) = json.loads((tmp_path / "run" / "ledger.json").read_text())["rounds"]
    assert set(r1["sites"]) == {"site-0", "site-1"} and all(
        v["epsilon"] > 0 for v in r1["sites"].values())
