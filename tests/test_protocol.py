"""The round's wire protocol without Flower: the site report to and from its metrics, and the
one update check in its three uses (a plain reply at the coordinator, a site's own update
before SecAgg+ masking, a SecAgg+ aggregate before release). Hand-made inputs throughout."""

import math

import numpy as np
import pytest

from dpfl.shared.federation.protocol import (
    IMPLAUSIBLE_UPDATE_NORM,
    REPORT_METRICS,
    SiteReport,
    check_update,
    check_weight,
)

REPORT = SiteReport(site="h1", epsilon=1.5, delta=1e-5, budget=10.0, sigma=1.1,
                    sample_rate=0.1, steps=7, examples=70, exhausted=False, trained=True)
REF = {"w.lora_A": np.zeros((2, 3), np.float32), "w.lora_B": np.zeros((3, 2), np.float32)}


def test_report_metrics_keep_their_wire_names_order_and_types():
    metrics = REPORT.to_metrics()
    # the wire format: these names, in this order; ints stay ints (a MetricRecord encodes
    # int and float differently)
    assert list(metrics) == ["num-examples", "epsilon", "delta", "budget", "sigma",
                             "sample-rate", "steps", "trained", "exhausted"]
    assert tuple(metrics) == REPORT_METRICS
    assert metrics == {"num-examples": 70, "epsilon": 1.5, "delta": 1e-5, "budget": 10.0,
                       "sigma": 1.1, "sample-rate": 0.1, "steps": 7, "trained": 1,
                       "exhausted": 0}
    assert [type(metrics[k]) for k in ("num-examples", "steps", "trained", "exhausted")] \
        == [int] * 4


def test_report_round_trips_through_its_metrics():
    assert SiteReport.from_metrics("h1", REPORT.to_metrics()) == REPORT
    spent = SiteReport("h2", 9.9, 1e-5, 10.0, 1.1, 0.1, 70, 70, exhausted=True, trained=False)
    assert SiteReport.from_metrics("h2", spent.to_metrics()) == spent
    # the site's name comes from the site record, never from the metrics
    assert SiteReport.from_metrics("other", REPORT.to_metrics()).site == "other"


def test_no_report_is_none_without_a_warning(caplog):
    assert SiteReport.from_metrics("h1", None) is None
    assert SiteReport.from_metrics("h1", {"num-examples": 10, "trained": 0}) is None
    assert "malformed" not in caplog.text


@pytest.mark.parametrize("change", [
    {"sigma": None},  # removed below
    {"epsilon": float("nan")},
    {"epsilon": float("inf")},
    {"delta": -1e-5},
    {"budget": -1.0},
    {"num-examples": float("inf")},
    {"steps": "seven"},
    {"epsilon": [1.5]},
])
def test_malformed_report_is_rejected_and_logged(change, caplog):
    metrics = {**REPORT.to_metrics(), **change}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    assert SiteReport.from_metrics("h1", metrics) is None
    assert "privacy report of h1" in caplog.text and "rejected" in caplog.text


@pytest.mark.parametrize("n, ok", [(1, True), (70, True), (70.0, True), (0, False),
                                   (-3, False), (0.5, False), (float("nan"), False),
                                   (float("inf"), False), (True, False), ("70", False),
                                   (None, False)])
def test_fedavg_weight_must_be_a_whole_number_of_examples(n, ok):
    reason = check_weight({"num-examples": n} if n is not None else {})
    assert (reason is None) == ok
    if not ok:
        assert "num-examples must be a whole number >= 1" in reason


def test_update_check_accepts_a_well_formed_update():
    assert check_update({k: v + 0.5 for k, v in REF.items()}, REF) is None


@pytest.mark.parametrize("bad, reason", [
    ({"w.lora_A": np.zeros((2, 3), np.float32)}, "unexpected keys (missing ['w.lora_B']"),
    ({**REF, "w.extra": np.zeros(1, np.float32)}, "extra ['w.extra']"),
    ({**REF, "w.lora_B": np.zeros((2, 2), np.float32)},
     "tensor w.lora_B has shape (2, 2), expected (3, 2)"),
    ({**REF, "w.lora_B": np.full((3, 2), np.nan, np.float32)}, "non-finite"),
    ({**REF, "w.lora_B": np.full((3, 2), -np.inf, np.float32)}, "non-finite"),
    ({**REF, "w.lora_B": np.zeros((3, 2), np.int64)}, "has dtype int64, expected floating"),
    ({**REF, "w.lora_B": np.zeros((3, 2), np.float64)},
     "has dtype float64, expected floating point float32"),
])
def test_update_check_rejects(bad, reason):
    assert reason in check_update(bad, REF)


def test_update_norm_bounds():
    upd = {k: v + 1.0 for k, v in REF.items()}  # distance sqrt(12) = 3.46, by hand
    assert check_update(upd, REF, max_update_norm=3.0) == \
        "update norm 3.46 exceeds the bound 3"
    assert check_update(upd, REF, max_update_norm=4.0) is None
    huge = {k: np.full(v.shape, 1e6, np.float32) for k, v in REF.items()}  # norm 3.5e6
    assert "beyond any plausible round" in check_update(huge, REF)  # even without a bound
    assert IMPLAUSIBLE_UPDATE_NORM == 1e6


def test_site_check_before_masking_adds_the_secagg_range():
    """A site's own update under SecAgg+: any float dtype (its training made it), values
    within the quantisation range, and the run's norm bound."""
    ref = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    good = {"a": np.full((2, 3), 0.1, np.float32), "b": np.ones(4, np.float32)}

    def site(update, **kw):
        return check_update(update, ref, same_dtype=False, value_range=8.0, **kw)

    assert site(good) is None
    assert site({**good, "b": np.ones(4, np.float64)}) is None  # dtype not pinned here
    assert "beyond the SecAgg+ range 8" in site({**good, "b": np.full(4, 9.0, np.float32)})
    assert "non-finite" in site({**good, "b": np.array([1, np.nan, 1, 1], np.float32)})
    assert "shape" in site({**good, "a": np.zeros(6, np.float32)})
    assert "unexpected keys" in site({"a": good["a"]})
    # distance from the global adapter: sqrt(6 * 0.1**2) = 0.245
    assert "exceeds the bound" in site(good, max_update_norm=0.2)
    assert site(good, max_update_norm=0.25) is None
    assert site(good, max_update_norm=math.inf) is None


def test_aggregate_check_accepts_float64_but_not_a_far_move():
    """A SecAgg+ aggregate is dequantised in float64; its distance is still bounded."""
    agg = {k: v.astype(np.float64) + 0.5 for k, v in REF.items()}  # distance sqrt(3) = 1.73
    assert check_update(agg, REF, same_dtype=False) is None
    assert "exceeds the bound 1" in check_update(agg, REF, max_update_norm=1.0,
                                                 same_dtype=False)
    assert "non-finite" in check_update({**agg, "w.lora_A": np.full((2, 3), np.nan)}, REF,
                                        same_dtype=False)
