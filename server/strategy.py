"""Flower strategy for DP adapter updates: Flower's FedAvg, with budget-aware sampling and
validation of every update before it can reach the average; and what the coordinator's two
kinds of round share (:class:`Round`, :class:`RoundOutcome`, :class:`NodeSites`).

Aggregation is Flower's example-weighted FedAvg (``weighted_by_key="num-examples"``). With
FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024)
clients send only the ``lora_B`` tensors (and a trainable class embedding): A stays frozen
at the shared seeded initialisation, so averaging B is exact.

An update is rejected (and logged, with the reason) when it fails the protocol's update
check (:func:`dpfl.shared.federation.protocol.check_update`: keys, shapes or dtypes that
differ from the expected adapter, so a reply can never be larger than the adapter the
coordinator sent; a non-finite value; a distance from the current global adapter beyond
``max_update_norm`` or, even without that bound, ``IMPLAUSIBLE_UPDATE_NORM``), when its
FedAvg weight ``num-examples`` is not a positive whole number (``check_weight``), or when
its privacy report cannot be recorded. This module only translates Flower messages to the
protocol's plain objects and back.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from dpfl.shared.federation.protocol import (
    ARRAYS,
    CONFIG,
    MALFORMED_REPORT,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    TRAINED,
    SiteReport,
    check_update,
    check_weight,
)
from dpfl.shared.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOutcome:
    """What one round leaves behind, plain or secure alike. By the time it exists, the
    round's privacy spend is durable in the ledger (``entry``) and, with client-level DP,
    in the coordinator's accountant (``client_level``)."""

    adapter: dict[str, np.ndarray]  # the global adapter after the round (as before if no release)
    accepted: int  # updates in the released average
    rejected: Mapping[str, str]  # {site, or "<tag>" for a whole-round reason: why}
    entry: Mapping[str, Any]  # the ledger's entry for the round
    client_level: Mapping[str, Any] | None = None  # client-level spend so far, when on


class Round(Protocol):
    """One round of training given its sampled instructions (``msgs``): collect, record the
    spend, and only then aggregate. :class:`dpfl.server.rounds.PlainRound` and
    :class:`dpfl.server.secagg.SecureRound` are the two kinds."""

    def run(self, rnd: int, adapter: dict[str, np.ndarray], msgs: list[Message]
            ) -> RoundOutcome: ...


def reply_site(msg: Message, known: Mapping[int, str] | None = None,
               sent_to: Mapping[str, int] | None = None) -> str:
    """The site a reply comes from: the name it gives, else the name its node answered with
    before (``known``: node id -> site), else ``node-<id>``. Error replies carry no content,
    and when the SuperLink answers for a node that died their source is the SuperLink, so
    the node is found from the message they reply to (``sent_to``: message id -> node id)."""
    node = (sent_to or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
    if not msg.has_error():
        site = msg.content.config_records.get(SITE)
        if site and SITE_ID in site:
            return str(site[SITE_ID])
    return (known or {}).get(node) or f"node-{node}"


def site_report(msg: Message) -> SiteReport | None:
    """The privacy report a reply carries (:meth:`SiteReport.from_metrics`), for the ledger;
    None when it has none or it is malformed: :meth:`AdapterFedAvg.split_replies`
    (``reported``) then keeps its update out."""
    if msg.has_error():
        return None
    return SiteReport.from_metrics(reply_site(msg), msg.content.metric_records.get(METRICS))


def current_replies(server_round: int, replies: Collection[Message],
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
        super().__init__(weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS,
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
        config[SERVER_ROUND] = server_round

        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return self._construct_messages(record, nodes, "train")

    def split_replies(self, server_round: int, replies: Iterable[Message],
                      reference: dict[str, np.ndarray], known: Mapping[int, str] | None = None,
                      sent_to: Mapping[str, int] | None = None,
                      reported: Collection[str] | None = None,
                      max_examples: Callable[[str], float] | None = None
                      ) -> tuple[list[Message], dict[str, str]]:
        """Replies that may be averaged, and {site: reason} for every one that may not
        (``known`` and ``sent_to`` name error replies, see :func:`reply_site`). With
        ``reported`` (the sites whose privacy report the ledger will record), an update
        without a usable report is rejected: no spend on record, no average. With
        ``max_examples`` (site -> its enrolled bound), a weight above it is rejected."""
        ok, rejected = [], {}
        for msg in replies:
            site = reply_site(msg, known, sent_to)
            if msg.has_error():
                rejected[site] = f"client error: {msg.error.reason}"
                continue
            content = msg.content
            metrics = content.metric_records.get(METRICS)
            if metrics is None or not metrics.get(TRAINED, 0):
                rejected[site] = "did not train (budget exhausted or refused)"
                continue
            arrays = content.array_records.get(ARRAYS)
            if arrays is None or len(content.array_records) != 1:
                rejected[site] = "reply must carry exactly one ArrayRecord 'arrays'"
                continue
            update = {k: v.numpy() for k, v in arrays.items()}
            reason = check_update(update, reference, max_update_norm=self.max_update_norm) \
                or check_weight(metrics, max_examples(site) if max_examples else math.inf)
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


class Enrolment(Protocol):
    """What the coordinator knows of a node it listed (:class:`dpfl.server.policy.Enrolled`)."""

    @property
    def site(self) -> str: ...

    @property
    def max_examples(self) -> int: ...


class NodeSites:
    """Which site each Flower node id is, kept on disk so that a restarted coordinator does
    not ask an exhausted site again.

    In a deployment (``enrolment``: node id -> its listed site) a node *is* the site its key
    was enrolled as: a reply from a node that is not enrolled, or that answers under another
    site's name, is refused before its report or update is looked at (:meth:`admit`), and
    every site's FedAvg weight is bounded by what it was enrolled with
    (:meth:`max_examples`). A simulation has no enrolment: a node is the site it says."""

    def __init__(self, path: Path, enrolment: Mapping[int, Enrolment] | None = None):
        self.path = path
        self.enrolment = dict(enrolment) if enrolment is not None else None
        self.map: dict[int, str] = {}
        if path.exists():
            try:
                self.map = {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable %s (%s); sites re-identify on reply", path, exc)
        if self.enrolment is not None:
            self.map.update({n: e.site for n, e in self.enrolment.items()})

    def get(self, node: int, default: str = "") -> str:
        return self.map.get(node, default)

    def max_examples(self, site: str) -> float:
        """The most examples ``site`` may weigh in FedAvg (no bound without an enrolment)."""
        if self.enrolment is None:
            return math.inf
        return next((e.max_examples for e in self.enrolment.values() if e.site == site), 0)

    def admit(self, rnd: int, replies: list[Message]) -> tuple[list[Message], dict[str, str]]:
        """The replies that come from the enrolled site they name, and {who: why} for the
        others (logged). Error replies pass: they carry no content and are rejected later."""
        if self.enrolment is None:
            return list(replies), {}
        admitted, refused = [], {}
        for msg in replies:
            if msg.has_error():
                admitted.append(msg)
                continue
            node = msg.metadata.src_node_id
            enrolled = self.enrolment.get(node)
            claimed = reply_site(msg)
            if enrolled is None:
                refused[f"node-{node}"] = f"node {node} is not enrolled with this coordinator"
            elif claimed != enrolled.site:
                refused[enrolled.site] = (f"node {node} is enrolled as {enrolled.site!r} but "
                                          f"answered as {claimed!r}")
            else:
                admitted.append(msg)
        for who, why in refused.items():
            log.warning("round %d: reply refused (%s): %s", rnd, who, why)
        return admitted, refused

    def update(self, replies: list[Message]) -> None:
        new = {m.metadata.src_node_id: reply_site(m) for m in replies
               if not m.has_error() and SITE in m.content.config_records}
        if any(self.map.get(n) != s for n, s in new.items()):
            self.map.update(new)
            atomic_write_json(self.path, {str(k): v for k, v in sorted(self.map.items())})
