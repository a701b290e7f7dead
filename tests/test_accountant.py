"""The durable per-client accountant: Opacus' numbers, persistence, budget refusal."""

import json
import math
import tracemalloc

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

import dpfl.shared.privacy.accountant as accountant_mod
from dpfl.shared.errors import BudgetExhausted, ConfigError, StateError
from dpfl.shared.ldm.lora import LoraSpec
from dpfl.shared.privacy.accountant import PersistentAccountant, epsilon_of
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


@pytest.mark.parametrize("kind,pinned", [("rdp", 2.1013652716430564),
                                         ("prv", 1.8383716376346455)])
def test_pinned_values(tmp_path, kind, pinned):
    acc = PersistentAccountant.open(tmp_path / "a.json", kind=kind, delta=1e-5, budget=100)
    acc.commit(1.0, 0.01, 1000)
    # Opacus 1.6 RDP / PRV (upper bound) accountants, sigma=1, q=0.01, 1000 steps, delta=1e-5
    assert acc.epsilon() == pytest.approx(pinned, rel=1e-9)


def _opacus(kind, history, delta):
    """ε of ``history`` by a fresh, stock Opacus accountant."""
    a = {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()
    a.history = list(history)
    return a.get_epsilon(delta)


def _rdp(s, q, n, d):
    return _opacus("rdp", [(s, q, n)], d)


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
    assert PersistentAccountant.load(path).kind == "prv"  # the default of a new ledger
    with pytest.raises(StateError, match="delta"):
        PersistentAccountant.open(path, delta=1e-6, budget=8)
    with pytest.raises(StateError, match="kind=prv.*kind=rdp"):
        PersistentAccountant.open(path, kind="rdp", delta=1e-5, budget=8)
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
    assert acc.kind == dp.accountant == "prv"  # the defaults: calibrated and reported by PRV
    assert res.epsilon == pytest.approx(_opacus("prv", [(res.sigma, 0.5, 2)], 1e-3))
    assert _opacus("prv", [(res.sigma, 0.5, 20)], 1e-3) <= 3.0


# -- refusals before Opacus runs (issue 13, item 7) ---------------------------------------
@pytest.fixture
def no_prv_maths(monkeypatch):
    """Opacus' PRV discretisation (where σ = 0 overflowed and a tiny σ asked for 84 GiB and
    more) must never be reached by a refused history."""
    def boom(*args, **kwargs):
        raise AssertionError("Opacus' PRV discretisation ran on a history it cannot compute")

    monkeypatch.setattr(PRVAccountant, "_get_dprv", boom)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_sigma_zero_is_refused_clearly_for_both_kinds(tmp_path, kind, no_prv_maths):
    acc = PersistentAccountant.open(tmp_path / "a.json", kind=kind, delta=1e-5, budget=1e6)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=rf"{kind} accountant.*sigma=0"):
            epsilon_of([(0.0, 0.01, 100)], 1e-5, kind)
        with pytest.raises(ConfigError, match=rf"{kind} accountant.*sigma=0"):
            acc.commit(0.0, 0.5, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20
    assert PersistentAccountant.load(tmp_path / "a.json").steps == 0


@pytest.mark.parametrize("sigma", [1e-3, 1e-6])
def test_tiny_sigma_is_refused_by_prv_before_it_allocates(tmp_path, sigma, no_prv_maths):
    acc = PersistentAccountant.open(tmp_path / "a.json", kind="prv", delta=1e-5, budget=1e6)
    tracemalloc.start()
    try:
        for q, steps in [(0.5, 10), (0.01, 100), (0.01, 10_000)]:
            with pytest.raises(ConfigError, match=rf"prv accountant.*sigma={sigma:g}.*rdp"):
                acc.commit(sigma, q, steps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20
    assert PersistentAccountant.load(tmp_path / "a.json").steps == 0


def test_tiny_sigma_under_rdp_is_a_finite_epsilon_refused_by_the_budget(tmp_path):
    acc = PersistentAccountant.open(tmp_path / "a.json", kind="rdp", delta=1e-5, budget=1e6)
    assert 1e6 < epsilon_of([(1e-3, 0.5, 10)], 1e-5, "rdp") < math.inf
    with pytest.raises(BudgetExhausted):
        acc.commit(1e-3, 0.5, 10)
    assert PersistentAccountant.load(tmp_path / "a.json").steps == 0


def test_a_realistic_prv_history_is_still_computed(tmp_path):
    acc = PersistentAccountant.open(tmp_path / "a.json", kind="prv", delta=1e-5, budget=100)
    acc.commit(0.8, 0.02, 300)
    assert 0 < acc.epsilon() < 100


def test_nan_epsilon_or_nan_sigma_never_passes_the_budget(tmp_path, monkeypatch):
    acc = PersistentAccountant.open(tmp_path / "a.json", delta=1e-5, budget=5.0)
    with pytest.raises(ConfigError, match="nan"):  # used to be committed with a NaN epsilon
        acc.commit(float("nan"), 0.01, 10)
    with pytest.raises(ConfigError):
        acc.commit(1.0, float("nan"), 10)
    monkeypatch.setattr(accountant_mod, "epsilon_of", lambda *a, **k: float("nan"))
    with pytest.raises(BudgetExhausted, match="nan"):
        acc.check_budget(1.0, 0.01, 10)
    with pytest.raises(BudgetExhausted):
        acc.commit(1.0, 0.01, 10)
    assert PersistentAccountant.load(tmp_path / "a.json").steps == 0


def test_calibration_treats_refused_or_nan_epsilon_as_too_little_noise(monkeypatch):
    """Opacus' bisection walks σ down towards the target; a σ the accountant refuses (or
    a NaN ε) must push σ up, never crash or be accepted."""
    import dpfl.shared.privacy.dpsgd as dpmod

    def fake(history, delta, kind):
        sigma = history[0][0]
        if sigma < 0.5:
            raise ConfigError("the prv accountant cannot account for sigma")
        return float("nan") if sigma < 0.8 else 4.0 / sigma

    monkeypatch.setattr(dpmod, "epsilon_of", fake)
    sigma = dpmod.calibrate_sigma(100.0, 1e-5, 0.01, 100, "prv")
    assert 0.8 <= sigma < 0.81 and fake([(sigma, 0.01, 100)], 1e-5, "prv") <= 100.0
    assert dpmod.calibrate_sigma(2.0, 1e-5, 0.01, 100, "prv") == pytest.approx(2.0, rel=0.01)
    with pytest.raises(ConfigError, match="no sigma"):
        dpmod.calibrate_sigma(1e-9, 1e-5, 0.01, 100, "prv")
