"""The durable per-client accountant: Opacus' numbers, persistence, budget refusal."""

import json

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from dpfl.shared.errors import BudgetExhausted, ConfigError, StateError
from dpfl.shared.ldm.lora import LoraSpec
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.dpsgd import DPConfig, train_lora


@pytest.mark.parametrize("kind,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_opacus_and_grows(tmp_path, kind, cls):
    acc = PersistentAccountant.open(tmp_path / "a.json", kind=kind, delta=1e-5, budget=1e6)
    ref = cls()
    last = 0.0
    for chunk in (5, 20, 100):
        acc.commit(1.1, 0.01, chunk)
        for _ in range(chunk):
            ref.step(noise_multiplier=1.1, sample_rate=0.01)
        eps = acc.epsilon()
        assert eps == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)
        assert eps > last
        last = eps
    assert acc.steps == 125 and acc.history == [(1.1, 0.01, 125)]


def test_pinned_rdp_value(tmp_path):
    acc = PersistentAccountant.open(tmp_path / "a.json", delta=1e-5, budget=100)
    acc.commit(1.0, 0.01, 1000)
    # Opacus 1.6 RDP accountant, sigma=1, q=0.01, 1000 steps, delta=1e-5
    assert acc.epsilon() == pytest.approx(2.1013652716430564, rel=1e-9)


def _rdp(s, q, n, d):
    a = RDPAccountant()
    a.history = [(s, q, n)]
    return a.get_epsilon(d)


def test_state_round_trips_and_restart_continues(tmp_path):
    path = tmp_path / "ledger.json"
    acc = PersistentAccountant.open(path, delta=1e-5, budget=8)
    acc.commit(0.9, 0.02, 50)
    acc.commit(1.2, 0.02, 30)
    eps = acc.epsilon()
    again = PersistentAccountant.open(path, delta=1e-5, budget=8)  # a restarted client
    assert again.history == acc.history and again.epsilon() == pytest.approx(eps)
    again.commit(1.2, 0.02, 10)
    assert again.epsilon() > eps
    third = PersistentAccountant.load(path)
    assert third.steps == 90 and third.history[-1] == (1.2, 0.02, 40)
    assert json.loads(path.read_text())["epsilon"] == pytest.approx(third.epsilon())


def test_corrupt_state_is_an_error_never_a_fresh_start(tmp_path):
    path = tmp_path / "ledger.json"
    PersistentAccountant.open(path, delta=1e-5, budget=8).commit(1.0, 0.01, 10)
    path.write_text(path.read_text()[:40])
    with pytest.raises(StateError, match="ledger.json"):
        PersistentAccountant.open(path, delta=1e-5, budget=8)
    path.write_text(json.dumps({"format": "dpfl-accountant/1", "kind": "rdp", "delta": 1e-5,
                                "budget": 8, "history": [[1.0, 7.0, 3]]}))
    with pytest.raises(StateError):
        PersistentAccountant.load(path)


def test_mismatched_delta_or_kind_refused(tmp_path):
    path = tmp_path / "ledger.json"
    PersistentAccountant.open(path, delta=1e-5, budget=8)
    with pytest.raises(StateError, match="delta"):
        PersistentAccountant.open(path, delta=1e-6, budget=8)
    with pytest.raises(StateError):
        PersistentAccountant.open(path, kind="prv", delta=1e-5, budget=8)
    with pytest.raises(ConfigError):
        PersistentAccountant(tmp_path / "x.json", kind="rdp", delta=1e-5, budget=-1)


def test_budget_refusal_reports_spent_and_leaves_ledger_unchanged(tmp_path):
    acc = PersistentAccountant.open(tmp_path / "a.json", delta=1e-5, budget=2.0)
    acc.commit(1.0, 0.01, 200)
    spent = acc.epsilon()
    with pytest.raises(BudgetExhausted) as err:
        acc.commit(1.0, 0.01, 100000)
    msg = str(err.value)
    assert f"{spent:.4f}" in msg and "budget of 2" in msg
    assert PersistentAccountant.load(tmp_path / "a.json").steps == 200
    assert acc.predict_epsilon(1.0, 0.01, 100) > spent


def test_train_lora_refuses_over_budget_before_training(tiny_ldm, tmp_path):
    acc = PersistentAccountant.open(tmp_path / "a.json", delta=1e-3, budget=0.5)
    dp = DPConfig(noise_multiplier=0.3, delta=1e-3, batch_size=8, noise_multiplicity=1,
                  device="cpu")
    z, y = torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,))
    with pytest.raises(BudgetExhausted, match="spent so far"):
        train_lora(tiny_ldm, z, y, LoraSpec(rank=1), dp, acc, progress=False)
    assert PersistentAccountant.load(tmp_path / "a.json").steps == 0


def test_calibrated_sigma_meets_target_over_planned_run(tiny_ldm, tmp_path):
    acc = PersistentAccountant.open(tmp_path / "a.json", delta=1e-3, budget=3.0)
    dp = DPConfig(target_epsilon=3.0, delta=1e-3, batch_size=8, noise_multiplicity=1,
                  planned_steps=20, device="cpu", max_physical_batch=8)
    z, y = torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,))
    res = train_lora(tiny_ldm, z, y, LoraSpec(rank=1, train_class_embedding=False), dp, acc,
                     progress=False)
    assert res.steps == 2 and acc.steps == 2
    assert acc.predict_epsilon(res.sigma, res.sample_rate, 18) == pytest.approx(3.0, abs=0.02)
    assert acc.predict_epsilon(res.sigma, res.sample_rate, 18) <= 3.0
    assert res.epsilon == pytest.approx(_rdp(res.sigma, 0.5, 2, 1e-3))
