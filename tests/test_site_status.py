"""What a site's operator sees (issue #16, site side): one INFO line per round, no Opacus
"turn secure RNG on" warning while dpfl's own secure noise is on, and ``dpfl-client status``
on a state directory written by real tiny training (and never modified by it)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dpfl.client.cli import main
from dpfl.client.site import RoundTag, Site
from dpfl.shared.data.readers import ImageSet, write_npz
from dpfl.shared.federation.config import RoundPlan, SiteConfig
from dpfl.shared.io import append_jsonl, read_jsonl
from dpfl.shared.ldm.lora import LoraSpec, adapter_state, spec_for_plan, wrap_unet
from dpfl.shared.ldm.models import FASHION_MNIST_CLASSES, build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.dpsgd import DPConfig, train_lora

SITE_LOG = "dpfl.client.site"
OPACUS_WARNING = "Secure RNG turned off"
#: (run, round) the fixture trains, in order; the last one is refused (budget exhausted)
ROUNDS = [(7, 1), (7, 2), (9, 1), (9, 2)]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A secure-mode site that trained runs 7 (rounds 1, 2) and 9 (round 1) with a plan
    calibrated for 3 rounds at its whole budget, then was refused run 9's round 2."""
    root = tmp_path_factory.mktemp("site")
    ldm = build_ldm("tiny", seed=0)
    save_ldm(ldm, root / "base")
    rng = np.random.default_rng(0)
    write_npz(root / "silo.npz", ImageSet(rng.random((40, 28, 28, 1), dtype=np.float32),
                                          rng.integers(0, 10, 40), FASHION_MNIST_CLASSES))
    site = Site(SiteConfig(site_id="h1", data=str(root / "silo.npz"),
                           base_model=str(root / "base"), state_dir=str(root / "state"),
                           epsilon_budget=8.0, delta=1e-3, secure_mode=True, device="cpu"))
    plan = RoundPlan(num_rounds=3, batch_size=16, noise_multiplicity=1, target_epsilon=8.0,
                     base_fingerprint=ldm.fingerprint())
    torch.manual_seed(plan.seed)
    adapter = {k: v.numpy() for k, v in
               adapter_state(wrap_unet(build_ldm("tiny", seed=0).unet,
                                       spec_for_plan(plan))).items()}
    handler, logger = _Records(), logging.getLogger(SITE_LOG)
    logger.addHandler(handler)
    old_level, replies = logger.level, []
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for run, rnd in ROUNDS:
                site.round_tag = RoundTag(run, rnd)
                replies.append(site.train_round(plan, adapter))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return {"state": root / "state", "log": handler.records, "warnings": caught,
            "replies": replies}


def _lines(trained, level=logging.INFO) -> list[str]:
    return [r.getMessage() for r in trained["log"] if r.levelno == level]


# -- the site's log ------------------------------------------------------------------------
def test_every_trained_round_logs_one_line_with_its_spend(trained):
    records = read_jsonl(trained["state"] / "rounds.jsonl")
    ledger = PersistentAccountant.load(trained["state"] / "accountant.json")
    assert [(r["run"], r["round"]) for r in records] == ROUNDS[:3]
    lines = [m for m in _lines(trained) if ": trained " in m]
    assert len(lines) == 3
    before = 0.0
    for line, rec in zip(lines, records):
        assert line.startswith(f"site h1: run {rec['run']}, round {rec['round']}: trained "
                               f"{rec['steps']} steps, epsilon +{rec['epsilon'] - before:.4f} "
                               f"this round; lifetime epsilon {rec['epsilon']:.4f} of budget 8 "
                               f"(delta 0.001), {8 - rec['epsilon']:.4f} left; secure noise on "
                               "(OS CSPRNG)"), line
        assert rec["epsilon_round"] == pytest.approx(rec["epsilon"] - before)
        assert rec["secure_noise"] is True and rec["site"] == "h1" and rec["budget"] == 8.0
        before = rec["epsilon"]
    assert records[-1]["epsilon"] == pytest.approx(ledger.epsilon())
    assert sum(r["steps"] for r in records) == ledger.steps
    # the plan spends the whole budget in 3 rounds: the third says so, the fourth is refused
    assert "budget exhausted: one more such round would exceed it" in lines[2]
    assert records[2]["exhausted"] and not records[1]["exhausted"]
    (refused,) = _lines(trained, logging.WARNING)
    assert refused.startswith("site h1: run 9, round 2 refused, privacy budget exhausted: ")
    assert "over this client's budget of 8" in refused
    assert trained["replies"][3][0] is None


def test_dpfl_secure_noise_gets_no_opacus_warning(trained):
    assert not [w for w in trained["warnings"] if OPACUS_WARNING in str(w.message)]


def test_without_secure_mode_both_warnings_stay(tiny_ldm, tmp_path, caplog):
    acc = PersistentAccountant.open(tmp_path / "a.json", delta=1e-3, budget=50)
    dp = DPConfig(noise_multiplier=1.0, delta=1e-3, batch_size=4, max_physical_batch=4,
                  noise_multiplicity=1, secure_mode=False, device="cpu")
    z, y = torch.randn(8, 4, 8, 8), torch.randint(0, 10, (8,))
    with warnings.catch_warnings(record=True) as caught, \
            caplog.at_level(logging.WARNING, logger="dpfl.shared.privacy.dpsgd"):
        warnings.simplefilter("always")
        train_lora(tiny_ldm, z, y, LoraSpec(rank=1), dp, acc, progress=False)
    assert "secure_mode is OFF" in caplog.text
    assert [w for w in caught if OPACUS_WARNING in str(w.message)]


def test_the_client_app_tags_rounds_from_the_message(task_identity):
    from flwr.app import ConfigRecord, Message, RecordDict

    from dpfl.client.app import round_tag

    for key in ("config", "fitins.config"):  # a plain round, a SecAgg+ round
        msg = Message(content=RecordDict({key: ConfigRecord({"server-round": 3})}),
                      dst_node_id=1, message_type="train")
        assert str(round_tag(msg)) == "run 1, round 3"  # task_identity: run 1
    assert str(RoundTag()) == "run -, round -"


def test_a_deployed_site_logs_dpfl_lines_to_stderr(capsys):
    """The SuperNode passes its ClientApp's stderr on to ``dpfl-client join``: without a
    handler there, Python would show only warnings and drop every per-round line."""
    from dpfl.client.app import site_log

    root = logging.getLogger("dpfl")
    handlers, level = list(root.handlers), root.level
    logging.getLogger().addHandler(seen_twice := _Records())  # e.g. Opacus' basicConfig
    try:
        site_log()
        site_log()  # once per process
        assert len(root.handlers) == len(handlers) + 1
        logging.getLogger(SITE_LOG).info("site h1: run 7, round 1: trained 3 steps")
        assert re.search(r"INFO dpfl\.client\.site: site h1: run 7, round 1: trained 3 steps\n$",
                         capsys.readouterr().err)
        assert not seen_twice.records
    finally:
        logging.getLogger().removeHandler(seen_twice)
        root.handlers[:] = handlers
        root.setLevel(level)
        root.propagate = True


# -- dpfl-client status --------------------------------------------------------------------
def _status(state, *extra, ok=True):
    res = CliRunner().invoke(main, ["status", "--state-dir", str(state), *extra])
    assert (res.exit_code == 0) == ok, res.output
    return res.output


def test_status_reports_lifetime_spend_and_every_run_and_round(trained):
    state = trained["state"]
    before = files(state)
    ledger = PersistentAccountant.load(state / "accountant.json")
    records = read_jsonl(state / "rounds.jsonl")
    got = json.loads(_status(state, "--json"))
    assert got["epsilon"] == pytest.approx(ledger.epsilon())
    assert (got["budget"], got["delta"], got["kind"]) == (8.0, 1e-3, "prv")
    assert got["budget_left"] == pytest.approx(8.0 - ledger.epsilon())
    assert got["steps"] == ledger.steps and got["unrecorded_steps"] == 0
    assert [(r["run"], r["round"]) for r in got["rounds"]] == ROUNDS[:3]
    r7, r9 = got["runs"]
    assert (r7["run"], r7["rounds"], r9["run"], r9["rounds"]) == (7, [1, 2], 9, [1])
    assert r7["retrained"] == r9["retrained"] == []
    assert "mean_loss" in records[0] and not any("mean_loss" in r for r in got["rounds"])
    assert r7["steps"] + r9["steps"] == ledger.steps
    # run 7 was the site's first: alone, its epsilon is the lifetime epsilon it reached
    assert r7["epsilon_alone"] == pytest.approx(r7["epsilon_added"]) == \
        pytest.approx(records[1]["epsilon"])
    assert r7["epsilon_added"] + r9["epsilon_added"] == pytest.approx(ledger.epsilon())
    # run 9's one round took run 7's first round's steps: alone, the same epsilon; added on
    # top of run 7 it raised lifetime epsilon by less (epsilon composes sub-additively)
    assert r9["epsilon_alone"] == pytest.approx(records[0]["epsilon"])
    assert r9["epsilon_alone"] > r9["epsilon_added"]
    text = _status(state)
    assert f"lifetime: epsilon {ledger.epsilon():.4f} of budget 8 (delta 0.001)" in text
    assert re.search(r"^\s+7\s+1-2\s+\d+\s", text, re.M), text
    assert re.search(r"^\s+9\s+1\s+\d+\s", text, re.M), text
    assert len([ln for ln in text.splitlines() if re.match(r"\s+\d{4}-\d\d-\d\dT", ln)]) == 3
    assert files(state) == before  # status only reads


def test_status_shows_interrupted_and_retrained_rounds(trained, tmp_path):
    """Run 9's round 1 was trained again after a restart (both count), and then a round was
    interrupted after its commit: the ledger is ahead of rounds.jsonl."""
    state = shutil.copytree(trained["state"], tmp_path / "state")
    acc = PersistentAccountant.load(state / "accountant.json")
    q = acc.history[-1][1]
    acc.commit(20.0, q, 3)  # much noise: within what is left
    again = {**read_jsonl(state / "rounds.jsonl")[-1], "sigma": 20.0, "epsilon": acc.epsilon()}
    append_jsonl(state / "rounds.jsonl", again)
    acc.commit(20.0, q, 2)  # the interrupted one
    got = json.loads(_status(state, "--json"))
    assert got["unrecorded_steps"] == 2 and got["epsilon"] == pytest.approx(acc.epsilon())
    assert got["runs"][1]["rounds"] == [1, 1] and got["runs"][1]["retrained"] == [1]
    assert got["runs"][1]["steps"] == 6
    text = _status(state)
    assert "2 step(s) in the ledger have no round record" in text
    assert "run 9: round(s) [1] trained more than once (a restarted round); each training " \
        "counts" in text


@pytest.mark.parametrize("case", ["missing", "not-a-site", "corrupt-ledger", "corrupt-rounds",
                                  "bad-round"])
def test_status_refuses_what_is_not_a_readable_state_dir(trained, tmp_path, case):
    state = tmp_path / "state"
    if case != "missing":
        shutil.copytree(trained["state"], state)
    if case == "not-a-site":
        (state / "accountant.json").unlink()
    elif case == "corrupt-ledger":
        (state / "accountant.json").write_text('{"format": "dpfl-accountant/1", "hist')
    elif case == "corrupt-rounds":
        lines = (state / "rounds.jsonl").read_text().splitlines()
        (state / "rounds.jsonl").write_text("\n".join([lines[0][:20], *lines[1:]]) + "\n")
    elif case == "bad-round":
        with open(state / "rounds.jsonl", "a") as f:
            f.write('{"steps": "four", "epsilon": 1.0}\n{"steps": 1, "epsilon": 1.0}\n')
    before = files(state) if state.exists() else None
    out = _status(state, ok=False) + _status(state, "--json", ok=False)
    expected = {"missing": f"state directory {state} does not exist",
                "not-a-site": f"{state} holds no accountant.json: not a site's state directory",
                "corrupt-ledger": f"privacy accountant state {state / 'accountant.json'} is "
                                  "unreadable or corrupt",
                "corrupt-rounds": f"round log {state / 'rounds.jsonl'} is unreadable or corrupt",
                "bad-round": f"round log {state / 'rounds.jsonl'}, line 4: expected a JSON "
                             "object with integer 'steps'"}[case]
    assert out.count(expected) == 2, out
    assert "Traceback" not in out
    assert (files(state) if state.exists() else None) == before
