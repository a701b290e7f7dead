"""PRV as the default accountant (issue 15): ε is Opacus' PRV *upper* bound, σ calibrated
under an accountant meets the target under that same stock accountant, a PRV budget is
never exceeded, ledgers made under RDP keep their kind, and δ = "auto" is 1/(n ln n)."""

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

import dpfl.shared.privacy.accountant as accountant_mod
from dpfl.client.site import Site
from dpfl.shared.errors import BudgetExhausted, ConfigError, StateError
from dpfl.shared.federation.config import RoundPlan, SiteConfig
from dpfl.shared.privacy.accountant import PersistentAccountant, epsilon_of, ledger_kind
from dpfl.shared.privacy.choices import (
    DEFAULT_ACCOUNTANT,
    delta_for_examples,
    parse_delta,
    resolve_delta,
)
from dpfl.shared.privacy.dpsgd import DPConfig, calibrate_sigma

HISTORIES = [([(1.0, 0.5, 2)], 1e-3), ([(0.8, 1 / 59, 472)], 2.2e-6),
             ([(0.9, 0.02, 50), (1.2, 0.02, 30)], 1e-5)]


def _stock(kind, history, delta):
    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[kind]()
    acc.history = list(history)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("history,delta", HISTORIES)
def test_prv_epsilon_is_opacus_upper_bound_never_its_estimate(history, delta):
    ours = epsilon_of(history, delta, "prv")
    stock = PRVAccountant()
    stock.history = list(history)
    dprv = stock._get_dprv(eps_error=0.01, delta_error=delta / 1000)
    lower, estimate, upper = dprv.compute_epsilon(delta, delta / 1000, 0.01)
    assert ours == upper == stock.get_epsilon(delta)
    assert ours > estimate > lower
    # tighter than RDP here, which is why it is the default
    assert ours < epsilon_of(history, delta, "rdp") == _stock("rdp", history, delta)


@pytest.mark.parametrize("history,delta", HISTORIES)
def test_grid_size_is_opacus_own(history, delta):
    prvs = [PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history]
    stock = compute_safe_domain_size(prvs=prvs, max_self_compositions=[n for *_, n in history],
                                     eps_error=0.01, delta_error=delta / 1000)
    assert accountant_mod._prv_half_width(history, delta / 1000) == stock


def test_memoised_epsilon_is_the_same_number():
    history = [(0.9, 0.02, 50)]
    first = epsilon_of(history, 1e-5, "prv")
    assert epsilon_of(list(history), 1e-5, "prv") == first == _stock("prv", history, 1e-5)
    assert epsilon_of([(0.9, 0.02, 51)], 1e-5, "prv") > first  # the key holds the steps


@pytest.mark.parametrize("kind", ["rdp", "prv"])
@pytest.mark.parametrize("target,delta,q,steps", [(10.0, 1e-5, 1 / 12, 36),
                                                  (1.0, 2.2e-6, 1 / 59, 472),
                                                  (3.0, 1e-3, 0.5, 20)])
def test_calibrated_sigma_meets_target_under_the_same_stock_accountant(kind, target, delta, q,
                                                                       steps):
    sigma = calibrate_sigma(target, delta, q, steps, kind)
    eps = _stock(kind, [(sigma, q, steps)], delta)
    assert target - 0.011 <= eps <= target  # within Opacus' tolerance, never above


def test_prv_needs_less_noise_than_rdp_for_the_same_target():
    rdp = calibrate_sigma(10.0, 1e-5, 1 / 12, 36, "rdp")
    prv = calibrate_sigma(10.0, 1e-5, 1 / 12, 36, "prv")
    assert prv < 0.97 * rdp
    assert _stock("prv", [(prv, 1 / 12, 36)], 1e-5) <= 10.0


def test_prv_budget_is_never_exceeded(tmp_path):
    acc = PersistentAccountant.open(tmp_path / "a.json", delta=1e-5, budget=3.0)
    assert acc.kind == "prv"
    with pytest.raises(BudgetExhausted):
        for _ in range(100):
            acc.commit(1.0, 0.05, 40)
            assert _stock("prv", acc.history, 1e-5) <= 3.0
    on_disk = PersistentAccountant.load(tmp_path / "a.json")
    assert on_disk.history == acc.history and _stock("prv", on_disk.history, 1e-5) <= 3.0
    assert _stock("prv", [(1.0, 0.05, on_disk.steps + 40)], 1e-5) > 3.0  # refused rightly


# -- existing ledgers keep their kind ---------------------------------------------------
def _legacy_rdp_ledger(path):
    """A ledger as dpfl wrote it while rdp was the default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "dpfl-accountant/1", "kind": "rdp", "delta": 1e-3,
                                "budget": 8.0, "history": [[1.1, 0.25, 12]],
                                "epsilon": _stock("rdp", [(1.1, 0.25, 12)], 1e-3),
                                "steps": 12}))


def test_an_rdp_ledger_continues_as_rdp_unless_another_kind_is_named(tmp_path):
    path = tmp_path / "accountant.json"
    _legacy_rdp_ledger(path)
    acc = PersistentAccountant.open(path, delta=1e-3, budget=8.0)
    assert acc.kind == ledger_kind(path) == "rdp"
    assert acc.epsilon() == _stock("rdp", [(1.1, 0.25, 12)], 1e-3)
    acc.commit(1.1, 0.25, 4)
    assert PersistentAccountant.load(path).kind == "rdp"
    with pytest.raises(StateError, match="kind=rdp.*kind=prv"):
        PersistentAccountant.open(path, kind="prv", delta=1e-3, budget=8.0)
    assert ledger_kind(tmp_path / "new.json") == DEFAULT_ACCOUNTANT == "prv"
    assert ledger_kind(path, "prv") == "prv"  # a named kind is passed on (open refuses it)


def test_a_site_without_an_accountant_setting_follows_its_ledger(tmp_path):
    plan = RoundPlan(num_rounds=2, batch_size=8)
    old = tmp_path / "old"
    _legacy_rdp_ledger(old / "accountant.json")
    site = Site(SiteConfig(data="d", state_dir=str(old), delta=1e-3, epsilon_budget=8.0))
    assert site.dp_config(plan, 100).accountant == "rdp"
    assert site.accountant(100).kind == "rdp"
    fresh = Site(SiteConfig(data="d", state_dir=str(tmp_path / "new"), delta=1e-3))
    assert fresh.dp_config(plan, 100).accountant == "prv"
    named = Site(SiteConfig(data="d", state_dir=str(old), delta=1e-3, epsilon_budget=8.0,
                            accountant="prv"))
    with pytest.raises(StateError, match="kind=rdp"):
        named.accountant(100)


# -- delta = "auto" -------------------------------------------------------------------
def test_delta_auto_is_one_over_n_ln_n():
    assert delta_for_examples(45_000) == pytest.approx(2.1e-6, rel=0.02)  # the figure
    assert delta_for_examples(55_000) == pytest.approx(1.67e-6, rel=0.01)  # DPImageBench's
    for n in (3, 100, 10**6):
        assert delta_for_examples(n) == 1 / (n * math.log(n)) < 1 / n
    assert resolve_delta("auto", 1500) == delta_for_examples(1500)
    assert resolve_delta(1e-5, 1500) == 1e-5
    for bad in (2, 0, True, 3.5):
        with pytest.raises(ConfigError, match="n >= 3"):
            delta_for_examples(bad)
    for bad in ("automatic", "", "0", 1.0, None):
        with pytest.raises(ConfigError, match="delta"):
            parse_delta(bad)
    assert parse_delta(" AUTO ") == "auto" and parse_delta("1e-5") == 1e-5


def test_site_delta_auto_from_node_config_and_its_silo(tmp_path):
    cfg = SiteConfig.from_node_config({"data": "d", "delta": "auto",
                                       "state-dir": str(tmp_path)})
    assert cfg.delta == "auto" and cfg.accountant is None
    assert SiteConfig.from_node_config({"data": "d", "delta": "2e-6"}).delta == 2e-6
    with pytest.raises(ConfigError, match="delta"):
        SiteConfig.from_node_config({"data": "d", "delta": "often"})
    site = Site(cfg)
    dp = site.dp_config(RoundPlan(batch_size=8), 1500)
    assert dp.delta == 1 / (1500 * math.log(1500)) and dp.accountant == "prv"
    dp.check_dataset(1500)
    acc = site.accountant(1500)
    assert acc.delta == dp.delta
    with pytest.raises(StateError, match="delta"):  # the silo changed size: δ may not follow
        site.accountant(1600)


def test_dpconfig_default_is_prv_and_must_match_the_ledger(tmp_path):
    assert DPConfig().accountant == DEFAULT_ACCOUNTANT
    with pytest.raises(ConfigError, match="accountant must be one of"):
        epsilon_of([(1.0, 0.1, 10)], 1e-5, "gdp")


def test_cli_delta_and_accountant_options(tmp_path):
    import click

    from dpfl.client import cli

    param = cli.DeltaParam()
    assert param.convert("auto", None, None) == "auto"
    assert param.convert("1e-5", None, None) == 1e-5
    with pytest.raises(click.BadParameter, match="delta"):
        param.convert("2", None, None)
    ledger = tmp_path / "run" / "accountant.json"
    _legacy_rdp_ledger(ledger)
    opts = dict(clip=1.0, sigma=None, epsilon=8.0, delta=1e-3, accountant=None, batch_size=8,
                physical_batch=8, noise_multiplicity=1, lr=1e-3, epochs=1, planned_steps=None,
                cond_drop=0.1, secure_mode=False, seed=0, device="cpu",
                run_dir=str(tmp_path / "run"), accountant_file=None)
    assert cli._dp_config(opts).accountant == "rdp"  # continues the run's ledger as it is
    assert cli._dp_config({**opts, "accountant_file": str(tmp_path / "x.json")}
                          ).accountant == "prv"  # a new ledger
    assert cli._dp_config({**opts, "accountant": "prv"}).accountant == "prv"  # then refused


@pytest.mark.parametrize("extra", [{}, {"delta": "auto"}, {"accountant": "rdp", "delta": 2e-6}])
def test_node_config_round_trips_an_unset_accountant_and_delta_auto(tmp_path, extra):
    """`dpfl-client join` hands the site's settings to its SuperNode as a node config: an
    unset accountant is left out (never "None"), and "auto" stays "auto"."""
    from flwr.common.config import parse_config_args

    from dpfl.client.deploy import node_config_arg

    site = SiteConfig(site_id="s", data=str(tmp_path / "silo.npz"),
                      base_model=str(tmp_path / "base"), state_dir=str(tmp_path / "state"),
                      **extra)
    arg = node_config_arg(site)
    assert "None" not in arg
    assert SiteConfig.from_node_config(parse_config_args([arg])) == site
