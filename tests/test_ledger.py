import json

import pytest

from dpfl.shared.errors import StateError
from dpfl.shared.federation.ledger import PrivacyLedger, read_ledger
from dpfl.shared.federation.protocol import SiteReport


def rep(site, eps, delta=1e-5, exhausted=False, budget=10.0, steps=10):
    return SiteReport(site=site, epsilon=eps, delta=delta, budget=budget, sigma=1.0,
                      sample_rate=0.1, steps=steps, examples=100, exhausted=exhausted)


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
    assert entry["sites"]["a"]["epsilon"] == 5.0  # both histories, composed
    assert entry["sites"]["a"]["reported_epsilon"] == 1.0
    assert led.global_guarantee()[0] == 5.0 and led.flags


def test_accountant_reset_is_flagged_and_both_histories_compose(tmp_path):
    """Issue 13, item 4: reports (5, 1e-5) then (3, 1e-7) from one site used to give a
    global (5.0, 1e-7): the higher epsilon, the new smaller delta. A lower epsilon means a
    new accountant history; the two add up (basic composition), flagged."""
    led = PrivacyLedger.load_or_create(tmp_path / "l.json")
    led.record_round(1, [rep("a", 5.0, delta=1e-5)])
    entry = led.record_round(2, [rep("a", 3.0, delta=1e-7)])
    assert led.global_guarantee() == (8.0, pytest.approx(1e-5 + 1e-7, rel=1e-12))
    assert (entry["global_epsilon"], entry["global_delta"]) == led.global_guarantee()
    (flag,) = led.flags
    assert "site a" in flag and "reset" in flag and "composed" in flag
    # the new history goes on: only its growth is added, no second flag
    led.record_round(3, [rep("a", 4.0, delta=1e-7, steps=20)])
    assert led.global_guarantee() == (9.0, pytest.approx(1e-5 + 1e-7, rel=1e-12))
    assert len(led.flags) == 1
    again = PrivacyLedger.load_or_create(tmp_path / "l.json")  # survives a restart
    assert again.global_guarantee() == led.global_guarantee()
    again.record_round(4, [rep("a", 4.5, delta=1e-7, steps=30)])
    assert again.global_guarantee()[0] == 9.5 and len(again.flags) == 1
    on_disk = json.loads((tmp_path / "l.json").read_text())
    assert on_disk["global"]["epsilon"] == 9.5 and on_disk["sites"]["a"]["resets"] == 1
    assert "1 accountant reset(s)" in again.table()


def test_delta_is_a_running_maximum_and_fewer_steps_mean_a_reset(tmp_path):
    led = PrivacyLedger.load_or_create(tmp_path / "l.json")
    led.record_round(1, [rep("a", 2.0, delta=1e-5, steps=10)])
    led.record_round(2, [rep("a", 3.0, delta=1e-7, steps=20)])  # same history, smaller delta
    assert led.global_guarantee() == (3.0, 1e-5) and not led.flags
    # epsilon went up but the cumulative steps went down: a new history all the same
    led.record_round(3, [rep("a", 3.5, delta=1e-6, steps=5)])
    assert led.global_guarantee() == (6.5, pytest.approx(1e-5 + 1e-6, rel=1e-12))
    assert len(led.flags) == 1


def test_a_site_whose_composed_spend_reaches_its_budget_is_exhausted(tmp_path):
    led = PrivacyLedger.load_or_create(tmp_path / "l.json")
    led.record_round(1, [rep("a", 6.0, budget=10.0), rep("b", 6.0, budget=10.0)])
    led.record_round(2, [rep("a", 4.0, budget=10.0)])  # reset: 6 + 4 = the budget
    assert led.exhausted("a") and not led.exhausted("b")
    assert "exhausted" in led.table().splitlines()[1]


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
