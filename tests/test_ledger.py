import json

import pytest

from dpfl.shared.errors import StateError
from dpfl.shared.federation.ledger import PrivacyLedger, read_ledger
from dpfl.shared.federation.protocol import SiteReport


def rep(site, eps, delta=1e-5, exhausted=False, budget=10.0):
    return SiteReport(site=site, epsilon=eps, delta=delta, budget=budget, sigma=1.0,
                      sample_rate=0.1, steps=10, examples=100, exhausted=exhausted)


def test_global_is_max_over_sites_by_parallel_composition(tmp_path):
    led = PrivacyLedger.load_or_create(tmp_path / "ledger.json")
    e1 = led.record_round(1, [rep("a", 1.0), rep("b", 2.5, delta=1e-6)])
    assert (e1["global_epsilon"], e1["global_delta"]) == (2.5, 1e-5)
    e2 = led.record_round(2, [rep("a", 3.0)])  # b not sampled: its spend still counts
    assert e2["global_epsilon"] == 3.0
    assert led.global_guarantee() == (3.0, 1e-5)


def test_persisted_before_return_and_reloaded(tmp_path):
    led = PrivacyLedger.load_or_create(tmp_path / "ledger.json")
    led.record_round(1, [rep("a", 1.0), rep("b", 2.0, exhausted=True)])
    on_disk = json.loads((tmp_path / "ledger.json").read_text())
    assert on_disk["global"]["epsilon"] == 2.0 and on_disk["rounds"][0]["round"] == 1
    again = PrivacyLedger.load_or_create(tmp_path / "ledger.json")
    assert again.last_round == 1 and again.exhausted("b") and not again.exhausted("a")
    assert "global" in again.table() and "exhausted" in again.table()


def test_reported_epsilon_never_goes_down(tmp_path):
    led = PrivacyLedger.load_or_create(tmp_path / "l.json")
    led.record_round(1, [rep("a", 4.0)])
    entry = led.record_round(2, [rep("a", 1.0)])  # e.g. a site whose accountant was reset
    assert entry["sites"]["a"]["epsilon"] == 4.0
    assert led.global_guarantee()[0] == 4.0 and led.flags


def test_rerun_of_unreleased_round_kept_older_round_refused(tmp_path):
    led = PrivacyLedger.load_or_create(tmp_path / "l.json")
    led.record_round(1, [rep("a", 1.0)])
    led.record_round(2, [rep("a", 2.0)])
    entry = led.record_round(2, [rep("a", 2.6)])  # crashed before release, round 2 again
    assert entry["rerun"] and led.global_guarantee()[0] == 2.6
    with pytest.raises(StateError, match="never rewound"):
        led.record_round(1, [rep("a", 3.0)])


def test_corrupt_ledger_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "l.json").write_text("{not json")
    with pytest.raises(StateError, match="l.json"):
        PrivacyLedger.load_or_create(tmp_path / "l.json")


def test_one_reader_checks_the_schema_for_coordinator_and_report(tmp_path):
    """read_ledger is the one reader of ledger.json (PrivacyLedger.load_or_create and the run
    report both use it): a field missing or of the wrong type names the file and the field,
    and the file is left as it was."""
    from dpfl.shared.report.fed import load_ledger

    led = PrivacyLedger.load_or_create(tmp_path / "ledger.json")
    led.record_round(1, [rep("a", 1.0)])
    good = json.loads((tmp_path / "ledger.json").read_text())
    assert read_ledger(tmp_path / "ledger.json") == good == load_ledger(tmp_path / "ledger.json")
    assert load_ledger(tmp_path / "absent.json") is None
    for bad, field in [({**good, "rounds": [{"round": 1}]}, "global_epsilon"),
                       ({**good, "sites": {"a": {"epsilon": "x", "delta": 1e-5,
                                                 "budget": 1.0}}}, "could not convert"),
                       ({**good, "sites": []}, "'sites' an object"),
                       ({"rounds": []}, "sites")]:
        text = json.dumps(bad)
        (tmp_path / "bad.json").write_text(text)
        for reader in (read_ledger, PrivacyLedger.load_or_create, load_ledger):
            with pytest.raises(StateError, match=f"bad.json lacks or garbles a field.*{field}"):
                reader(tmp_path / "bad.json")
        assert (tmp_path / "bad.json").read_text() == text
