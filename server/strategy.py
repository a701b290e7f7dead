"""Flower strategy for DP adapter updates: Flower's FedAvg, with budget-aware sampling and
validation of every update before it can reach the average.

Aggregation is Flower's example-weighted FedAvg (``weighted_by_key="num-examples"``). With
FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024)
clients send only the ``lora_B`` tensors (and a trainable class embedding): A stays frozen
at the shared seeded initialisation, so averaging B is exact.

An update is rejected (and logged, with the reason) when its keys, shapes or dtypes differ
from the expected adapter (so a reply can never be larger than the adapter the coordinator
sent), when it holds a non-finite value, when its distance from the current global adapter
exceeds ``max_update_norm`` or, even without that bound, :data:`IMPLAUSIBLE_UPDATE_NORM`, or
when its FedAvg weight ``num-examples`` is not a positive whole number.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from dpfl.shared.federation.ledger import SiteReport

log = logging.getLogger(__name__)

ARRAYS, METRICS, SITE, CONFIG = "arrays", "metrics", "site", "config"
MALFORMED_REPORT = "malformed privacy report (see the coordinator log)"

#: Distance from the global adapter beyond which an update is rejected even when no
#: ``max-update-norm`` is configured. Adam moves each coordinate by about ``lr`` per step, so
#: an honest round (lr 2e-3, thousands of steps, LoRA tensors of O(1)) moves the adapter by
#: far less; 1e6 only stops updates that would overflow float32 in FedAvg's weighted sum and
#: poison the global adapter for every later round. Set ``max-update-norm`` for a real bound.
IMPLAUSIBLE_UPDATE_NORM = 1e6


def check_update(update: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                 max_update_norm: float = math.inf) -> str | None:
    """Why ``update`` must be rejected, or None when it is acceptable."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"unexpected keys (missing {missing[:3]}, extra {extra[:3]})"
    sq = 0.0
    for key, ref in reference.items():
        arr = update[key]
        if arr.shape != ref.shape:
            return f"tensor {key} has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype != ref.dtype or not np.issubdtype(arr.dtype, np.floating):
            return f"tensor {key} has dtype {arr.dtype}, expected floating point {ref.dtype}"
        if not np.isfinite(arr).all():
            return f"tensor {key} holds non-finite values (NaN or inf)"
        sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = math.sqrt(sq)
    if norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:.3g}"
    if norm > IMPLAUSIBLE_UPDATE_NORM:
        return (f"update norm {norm:.3g} is beyond any plausible round of DP-LoRA training "
                f"(limit {IMPLAUSIBLE_UPDATE_NORM:.0g} even without max-update-norm)")
    return None


def check_weight(metrics: Mapping[str, object]) -> str | None:
    """Why a reply's FedAvg weight ``num-examples`` is unusable, or None."""
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) \
            or n < 1 or n != int(n):
        return f"num-examples must be a whole number >= 1, got {n!r}"
    return None


def reply_site(msg: Message, known: Mapping[int, str] | None = None,
               sent_to: Mapping[str, int] | None = None) -> str:
    """The site a reply comes from: the name it gives, else the name its node answered with
    before (``known``: node id -> site), else ``node-<id>``. Error replies carry no content,
    and when the SuperLink answers for a node that died their source is the SuperLink, so
    the node is found from the message they reply to (``sent_to``: message id -> node id)."""
    node = (sent_to or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
    if not msg.has_error():
        site = msg.content.config_records.get(SITE)
        if site and "site-id" in site:
            return str(site["site-id"])
    return (known or {}).get(node) or f"node-{node}"


def site_report(msg: Message) -> SiteReport | None:
    """The privacy report a reply carries, for the ledger; None when it has none or it is
    malformed (missing fields, wrong types, non-finite or negative epsilon/delta/budget):
    :meth:`AdapterFedAvg.split_replies` (``reported``) then keeps its update out."""
    if msg.has_error():
        return None
    m = msg.content.metric_records.get(METRICS)
    if m is None or "epsilon" not in m:
        return None
    try:
        rep = SiteReport(site=reply_site(msg), epsilon=float(m["epsilon"]),
                         delta=float(m["delta"]), budget=float(m["budget"]),
                         sigma=float(m["sigma"]), sample_rate=float(m["sample-rate"]),
                         steps=int(m["steps"]), examples=int(m["num-examples"]),
                         exhausted=bool(m["exhausted"]), trained=bool(m["trained"]))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        log.warning("privacy report of %s is malformed (%s: %s); its update is rejected",
                    reply_site(msg), type(exc).__name__, exc)
        return None
    if not all(math.isfinite(v) and v >= 0 for v in (rep.epsilon, rep.delta, rep.budget)):
        log.warning("privacy report of %s holds a non-finite or negative value; its "
                    "update is rejected", rep.site)
        return None
    return rep


def current_replies(server_round: int, replies: Iterable[Message],
                    sent_to: Mapping[str, int]) -> list[Message]:
    """The replies that answer a message of this round (``sent_to``: its message ids).

    A straggler's reply to an earlier round is dropped before validation, the ledger and
    the average: its update was computed from an old global adapter, and its privacy spend
    is already in the site's own accountant, which the site's next report carries. Flower's
    grid only pulls replies to the ids it asks for (``Grid.send_and_receive``); this keeps
    the rule independent of the grid implementation."""
    current = [m for m in replies if m.metadata.reply_to_message_id in sent_to]
    if len(current) < len(replies):
        log.warning("round %d: ignored %d reply(ies) to messages of an earlier round",
                    server_round, len(replies) - len(current))
    return current


class AdapterFedAvg(FedAvg):
    """FedAvg over adapter tensors; never samples excluded (exhausted) nodes."""

    def __init__(self, *, excluded: Callable[[int], bool], sample_seed: int = 0,
                 max_update_norm: float = math.inf, wait_for_nodes_s: float = 120.0,
                 **kwargs):
        super().__init__(weighted_by_key="num-examples", arrayrecord_key=ARRAYS,
                         configrecord_key=CONFIG, **kwargs)
        self.excluded = excluded
        self.rng = random.Random(sample_seed)
        self.max_update_norm = max_update_norm
        self.wait_for_nodes_s = wait_for_nodes_s
        self.rejected: dict[str, str] = {}

    def eligible_nodes(self, grid: Grid) -> list[int]:
        return sorted(n for n in grid.get_node_ids() if not self.excluded(n))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        deadline = time.monotonic() + self.wait_for_nodes_s
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                log.warning("round %d: only %d node(s) connected, %d required; training "
                            "with those", server_round, len(list(grid.get_node_ids())),
                            self.min_available_nodes)
                break
            time.sleep(1)
        eligible = self.eligible_nodes(grid)
        if not eligible:
            return []
        size = max(int(len(eligible) * self.fraction_train), self.min_train_nodes)
        nodes = sorted(self.rng.sample(eligible, min(size, len(eligible))))
        log.info("round %d: sampled %d of %d eligible node(s)", server_round, len(nodes),
                 len(eligible))
        config["server-round"] = server_round

        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return self._construct_messages(record, nodes, "train")

    def split_replies(self, server_round: int, replies: Iterable[Message],
                      reference: dict[str, np.ndarray], known: Mapping[int, str] | None = None,
                      sent_to: Mapping[str, int] | None = None,
                      reported: Collection[str] | None = None
                      ) -> tuple[list[Message], dict[str, str]]:
        """Replies that may be averaged, and {site: reason} for every one that may not
        (``known`` and ``sent_to`` name error replies, see :func:`reply_site`). With
        ``reported`` (the sites whose privacy report the ledger will record), an update
        without a usable report is rejected: no spend on record, no average."""
        ok, rejected = [], {}
        for msg in replies:
            site = reply_site(msg, known, sent_to)
            if msg.has_error():
                rejected[site] = f"client error: {msg.error.reason}"
                continue
            content = msg.content
            metrics = content.metric_records.get(METRICS)
            if metrics is None or not metrics.get("trained", 0):
                rejected[site] = "did not train (budget exhausted or refused)"
                continue
            arrays = content.array_records.get(ARRAYS)
            if arrays is None or len(content.array_records) != 1:
                rejected[site] = "reply must carry exactly one ArrayRecord 'arrays'"
                continue
            update = {k: v.numpy() for k, v in arrays.items()}
            reason = check_update(update, reference, self.max_update_norm) \
                or check_weight(metrics)
            if reason is None and reported is not None and site not in reported:
                reason = MALFORMED_REPORT
            if reason:
                rejected[site] = reason
                continue
            ok.append(msg)
        for site, reason in rejected.items():
            log.warning("round %d: update from %s rejected: %s", server_round, site, reason)
        return ok, rejected

    def aggregate_valid(self, server_round: int, valid: list[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg over already-validated replies."""
        if not valid:
            return None, None
        return super().aggregate_train(server_round, valid)
