"""The round's wire protocol between the coordinator and a site, without Flower.

An instruction carries the global adapter (record ``arrays``) and the round plan (record
``config``, the :class:`~dpfl.shared.federation.config.RoundPlan` plus ``server-round``). A
site's reply carries its update (``arrays``, absent when it did not train), its privacy
report as scalars (``metrics``) and its name (``site``). Under SecAgg+ the update travels
masked in Flower's legacy records instead; ``metrics`` and ``site`` travel beside it in
plain text, and the coordinator adds the ``dpfl-*`` keys below to the round's config.

What lives here, once: the names of those records and scalars; the report itself
(:class:`SiteReport`: the site writes it with :meth:`SiteReport.to_metrics`, the coordinator
reads it with :meth:`SiteReport.from_metrics`); and the one check of an update
(:func:`check_update`), which the coordinator applies to every plain reply, each site to its
own update before masking it for SecAgg+ (where the coordinator can no longer see it), and
the coordinator to a SecAgg+ aggregate before releasing it. Translating to and from Flower
messages is the Flower modules' work (``dpfl.client.app``, ``dpfl.server.strategy``, the
``secagg`` modules); nothing here imports flwr or torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Records of a round's messages (names on the wire: never rename).
ARRAYS = "arrays"  # the global adapter out, a site's update back
CONFIG = "config"  # the round plan, out
METRICS = "metrics"  # a site's privacy report, back
SITE = "site"  # a site's name (and, under SecAgg+, why it withheld its update), back

# Fields of the ``site`` record, and the round number the coordinator adds to ``config``.
SITE_ID = "site-id"
WITHHELD = "withheld"
SERVER_ROUND = "server-round"

# Scalars of a site's privacy report, in the order a site writes them.
NUM_EXAMPLES = "num-examples"  # the silo size: the FedAvg weight
EPSILON = "epsilon"  # cumulative, from the site's own accountant
DELTA = "delta"
BUDGET = "budget"
SIGMA = "sigma"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"  # cumulative DP-SGD steps
TRAINED = "trained"  # 1 when this reply carries an update
EXHAUSTED = "exhausted"  # 1 when the site's budget allows no further round
REPORT_METRICS = (NUM_EXAMPLES, EPSILON, DELTA, BUDGET, SIGMA, SAMPLE_RATE, STEPS, TRAINED,
                  EXHAUSTED)

# Keys the coordinator adds to a SecAgg+ round's config beside the round plan.
SECAGG_ADAPTER_KEYS = "dpfl-adapter-keys"  # the adapter's keys, newline-separated, in order
SECAGG_MAX_WEIGHT = "dpfl-secagg-max-weight"
SECAGG_CLIP_RANGE = "dpfl-secagg-clip-range"
SECAGG_MAX_NORM = "dpfl-max-update-norm"  # 0: no bound

#: The rejection reason of an update whose privacy report the ledger cannot record.
MALFORMED_REPORT = "malformed privacy report (see the coordinator log)"

#: Distance from the global adapter beyond which an update is rejected even when no
#: ``max-update-norm`` is configured. Adam moves each coordinate by about ``lr`` per step, so
#: an honest round (lr 2e-3, thousands of steps, LoRA tensors of O(1)) moves the adapter by
#: far less; 1e6 only stops updates that would overflow float32 in FedAvg's weighted sum and
#: poison the global adapter for every later round. Set ``max-update-norm`` for a real bound.
IMPLAUSIBLE_UPDATE_NORM = 1e6


@dataclass(frozen=True)
class SiteReport:
    """What one site reported after a round (all cumulative over the site's life)."""

    site: str
    epsilon: float
    delta: float
    budget: float
    sigma: float
    sample_rate: float
    steps: int
    examples: int
    exhausted: bool = False
    trained: bool = True

    def to_metrics(self) -> dict[str, int | float]:
        """The report as the scalars of a reply's ``metrics`` record (the site's name goes
        in the ``site`` record). Values keep their type: an int travels as an int."""
        return {NUM_EXAMPLES: self.examples, EPSILON: self.epsilon, DELTA: self.delta,
                BUDGET: self.budget, SIGMA: self.sigma, SAMPLE_RATE: self.sample_rate,
                STEPS: self.steps, TRAINED: int(self.trained), EXHAUSTED: int(self.exhausted)}

    @classmethod
    def from_metrics(cls, site: str, metrics: Mapping[str, Any] | None) -> SiteReport | None:
        """The report that ``site``'s ``metrics`` carry, for the ledger; None when they carry
        none (no ``epsilon``) or it is malformed (a missing field, a wrong type, a
        non-finite or negative epsilon, delta or budget). A malformed report is logged: the
        coordinator then keeps the site's update out of the average (:data:`MALFORMED_REPORT`),
        since its spend could not be on record."""
        if metrics is None or EPSILON not in metrics:
            return None
        try:
            rep = cls(site=site, epsilon=float(metrics[EPSILON]), delta=float(metrics[DELTA]),
                      budget=float(metrics[BUDGET]), sigma=float(metrics[SIGMA]),
                      sample_rate=float(metrics[SAMPLE_RATE]), steps=int(metrics[STEPS]),
                      examples=int(metrics[NUM_EXAMPLES]),
                      exhausted=bool(metrics[EXHAUSTED]), trained=bool(metrics[TRAINED]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            log.warning("privacy report of %s is malformed (%s: %s); its update is rejected",
                        site, type(exc).__name__, exc)
            return None
        if not all(math.isfinite(v) and v >= 0 for v in (rep.epsilon, rep.delta, rep.budget)):
            log.warning("privacy report of %s holds a non-finite or negative value; its "
                        "update is rejected", site)
            return None
        return rep


def check_weight(metrics: Mapping[str, object], bound: float = math.inf) -> str | None:
    """Why a reply's FedAvg weight ``num-examples`` is unusable, or None: it must be a whole
    number >= 1 and at most ``bound`` (the site's enrolled bound, in a deployment)."""
    n = metrics.get(NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) \
            or n < 1 or n != int(n):
        return f"{NUM_EXAMPLES} must be a whole number >= 1, got {n!r}"
    if n > bound:
        return (f"{NUM_EXAMPLES} {int(n)} exceeds the {bound:g} examples the site was "
                "enrolled with")
    return None


def check_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *,
                 max_update_norm: float = math.inf, same_dtype: bool = True,
                 value_range: float | None = None) -> str | None:
    """Why ``update`` must not reach the global adapter, or None when it may.

    ``reference`` holds the global adapter's tensors that the update replaces (the keys that
    travel). Always checked: exactly the reference's keys, each tensor's shape, a floating
    point dtype, finite values, and the L2 distance from the reference, against
    ``max_update_norm`` and :data:`IMPLAUSIBLE_UPDATE_NORM` (a reply can so never be larger
    than the adapter that was sent, nor poison the average).

    ``same_dtype``: also the reference's exact dtype (a plain reply: a float64 tensor must
    not enter FedAvg's float32 sum). Off for a SecAgg+ aggregate, which is dequantised in
    float64, and for a site's own update, which its training produced.
    ``value_range``: every value within ``[-value_range, value_range]`` (a site before
    SecAgg+ masking: the quantisation would clip a larger value silently).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"unexpected keys (missing {missing[:3]}, extra {extra[:3]})"
    sq = 0.0
    for key, ref in reference.items():
        arr = update[key]
        if arr.shape != ref.shape:
            return f"tensor {key} has shape {arr.shape}, expected {ref.shape}"
        if not np.issubdtype(arr.dtype, np.floating) or (same_dtype and arr.dtype != ref.dtype):
            wanted = ref.dtype if same_dtype else ""
            return f"tensor {key} has dtype {arr.dtype}, expected floating point {wanted}".rstrip()
        if not np.isfinite(arr).all():
            return f"tensor {key} holds non-finite values (NaN or inf)"
        if value_range is not None:
            peak = float(np.abs(arr).max(initial=0.0))
            if peak > value_range:
                return (f"tensor {key} holds |value| {peak:.3g} beyond the SecAgg+ range "
                        f"{value_range:g} (it would be clipped silently)")
        sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = math.sqrt(sq)
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:.3g}"
    if norm > IMPLAUSIBLE_UPDATE_NORM:
        return (f"update norm {norm:.3g} is beyond any plausible round of DP-LoRA training "
                f"(limit {IMPLAUSIBLE_UPDATE_NORM:.0g} even without max-update-norm)")
    return None
