import pytest

from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import ACCOUNTANTS, FedConfig, RoundPlan, SiteConfig


def test_run_config_kebab_case_and_plan_round_trip():
    cfg = FedConfig.from_run_config({"num-rounds": 5, "ffa": "true", "lora-rank": "8",
                                     "base-model": "m", "max-update-norm": 0})
    assert cfg.num_rounds == 5 and cfg.ffa is True and cfg.lora_rank == 8
    plan = cfg.plan("sha256:abc")
    assert RoundPlan.from_record({**plan.to_record(), "server-round": 3}) == plan
    assert plan.base_fingerprint == "sha256:abc"
    assert cfg.update_bound == float("inf")


@pytest.mark.parametrize("key, value", [("lora-rank", 0), ("clip", -1), ("num-rounds", 0),
                                        ("target-epsilon", -2), ("fraction-train", 1.5),
                                        ("noise-multiplicity", 0)])
def test_out_of_range_values_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        FedConfig.from_run_config({key: value})


def test_unknown_and_mistyped_keys():
    with pytest.raises(ConfigError, match="num-roundz"):
        FedConfig.from_run_config({"num-roundz": 3})
    with pytest.raises(ConfigError, match="lora-rank"):
        FedConfig.from_run_config({"lora-rank": "four"})


def test_site_config_requires_data_and_sane_budget():
    with pytest.raises(ConfigError, match="data"):
        SiteConfig.from_node_config({"site-id": "x"})
    with pytest.raises(ConfigError, match="epsilon-budget"):
        SiteConfig.from_node_config({"data": "d", "epsilon-budget": -1})
    with pytest.raises(ConfigError, match="delta"):
        SiteConfig.from_node_config({"data": "d", "delta": 1.0})
    s = SiteConfig.from_node_config({"data": "d", "epsilon-budget": "3", "partition-id": 0})
    assert s.epsilon_budget == 3.0


def test_site_accountants_are_the_ones_the_accountant_implements():
    """The torch-free list a site is checked against names exactly the accountant registry."""
    from dpfl.shared.privacy.accountant import KINDS

    assert ACCOUNTANTS == tuple(KINDS)
    for kind in ACCOUNTANTS:
        assert SiteConfig.from_node_config({"data": "d", "accountant": kind}).accountant == kind
    with pytest.raises(ConfigError, match=r"accountant must be one of \['rdp', 'prv'\], got 'gdp'"):
        SiteConfig.from_node_config({"data": "d", "accountant": "gdp"})


def test_flower_app_config_lists_every_key_with_the_dataclass_default():
    """`flwr run --run-config` can only override keys the app's pyproject declares."""
    import dataclasses
    from pathlib import Path

    import tomllib

    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    declared = declared["tool"]["flwr"]["app"]["config"]
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(FedConfig)}
    fields.pop("base-fingerprint")  # announced by the coordinator, never configured
    assert set(declared) == set(fields)
    for key, default in fields.items():
        assert declared[key] == default, key


def test_site_delta_and_accountant_settings():
    """δ is a number or "auto" (1/(n ln n) of the silo, resolved by the site); the
    accountant may be left unset (the ledger's own kind, prv for a new ledger)."""
    s = SiteConfig.from_node_config({"data": "d"})
    assert s.delta == 1e-5 and s.accountant is None
    assert SiteConfig.from_node_config({"data": "d", "delta": "AUTO"}).delta == "auto"
    assert SiteConfig.from_node_config({"data": "d", "delta": "3e-6"}).delta == 3e-6
    for bad in ("sometimes", 0, 1.5):
        with pytest.raises(ConfigError, match=r"node config: delta must be"):
            SiteConfig.from_node_config({"data": "d", "delta": bad})
    with pytest.raises(ConfigError, match="site x: delta must be"):
        SiteConfig(site_id="x", data="d", delta="sometimes")
