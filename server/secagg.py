"""One round of secure aggregation (SecAgg+; Bell et al., CCS 2020) at the coordinator.

Flower 1.41 implements SecAgg+ only as a legacy workflow: ``SecAggPlusWorkflow`` needs a
``LegacyContext`` holding a legacy ``Strategy`` (``configure_fit`` / ``aggregate_fit`` over
``FitIns``/``FitRes``). It talks to the nodes through the same ``Grid`` as the Message API,
so it runs inside our ``@app.main()``: this module drives it for one round, with

- a thin legacy strategy (:class:`_Sampled`) that sends the global adapter to the sites the
  Message-API strategy already sampled (one sampling rule for both modes) and keeps the
  unmasked *sum* that the workflow hands to ``aggregate_fit``;
- a screen on the replies of the masking stage (:class:`_ScreenedGrid`). Those replies carry
  the masked vector and, in plain text, each site's privacy metrics, its weight (example
  count) and its name. The screen writes the privacy ledger durably *there*, after the spend
  and before the unmasking stage, so no aggregate exists before its spend is on record. It
  drops replies that cannot be summed (wrong number or shapes of masked tensors, a weight
  that is not 0 or the site's reported example count, or above ``max_weight``); SecAgg+
  then removes them like sites that dropped out. Unless at least ``needed`` real updates
  (positive weight, not withheld: ``secagg-min-contributions``, at least 2, or
  ``min-replies`` if larger) enter the sum, *no* reply goes on: a "sum" of one update beside
  zero-weight replies is that site's update in clear, so nothing is unmasked, the global
  adapter stays as it was, and the ledger says why (``<secagg-min-contributions>``).

What the coordinator can no longer check, the sites check before masking, with the same
update check the coordinator applies to plain replies
(:func:`dpfl.shared.federation.protocol.check_update`, plus the quantisation range). The
coordinator still puts the released aggregate through that check (keys and shapes,
finiteness, and its distance from the global adapter, which a weighted mean of bounded
updates cannot exceed). Client-level DP needs each update clipped before the sum and is
refused with SecAgg+ (see :class:`dpfl.shared.federation.config.FedConfig`).

:class:`SecureRound` is the coordinator's :class:`~dpfl.server.strategy.Round` of this kind:
typed inputs in, a :class:`~dpfl.server.strategy.RoundOutcome` out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import parameter as legacy_parameter
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from dpfl.server.strategy import NodeSites, RoundOutcome, reply_site, site_report
from dpfl.shared.federation.config import FedConfig, RoundPlan
from dpfl.shared.federation.ledger import PrivacyLedger
from dpfl.shared.federation.protocol import (
    MALFORMED_REPORT,
    METRICS,
    NUM_EXAMPLES,
    SECAGG_ADAPTER_KEYS,
    SECAGG_CLIP_RANGE,
    SECAGG_MAX_NORM,
    SECAGG_MAX_WEIGHT,
    SERVER_ROUND,
    SITE,
    WITHHELD,
    check_update,
)
from dpfl.shared.ldm.lora import travelling_keys

log = logging.getLogger(__name__)

CLIP_RANGE = 8.0  # SecAgg+ quantises each (weighted) value in [-8, 8] to 2**22 levels


class _Sampled(Strategy):
    """Legacy strategy for one round: the given nodes train; ``aggregate_fit`` keeps the sum."""

    def __init__(self, grid: Grid, nodes: list[int], config: dict):
        self.grid, self.nodes, self.config = grid, nodes, config
        self.aggregate: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = self.grid.run.run_id
        return [(GridClientProxy(n, self.grid, run_id), FitIns(parameters, dict(self.config)))
                for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # every FitRes holds the same unmasked weighted mean (SecAggPlusWorkflow.unmask_stage)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _ScreenedGrid:
    """The grid, with every reply of the masking stage screened by ``screen`` first (it
    returns the replies that go on)."""

    def __init__(self, grid: Grid, screen: Callable[[list[Message], list[Message]],
                                                    list[Message]]):
        self._grid, self._screen = grid, screen

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        return self._screen(messages, list(self._grid.send_and_receive(messages,
                                                                         timeout=timeout)))


@dataclass(frozen=True)
class _Recorded:
    """What a round wrote to the ledger: how many real updates enter the masked sum, why
    the others do not, and the ledger's entry."""

    accepted: int
    rejected: dict[str, str]
    entry: dict[str, Any]


#: A masking-stage screen: (messages sent, replies) -> (replies that enter the masked sum,
#: what it wrote to the ledger).
Screen = Callable[[list[Message], list[Message]], tuple[list[Message], _Recorded]]


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, naming the stage it is in and screening the replies of its
    masking stage with ``screen``; what the screen recorded is kept in :attr:`recorded`."""

    def __init__(self, screen: Screen, **kwargs):
        super().__init__(**kwargs)
        self._screen = screen
        self.stage = "setup"
        self.recorded: _Recorded | None = None

    def _screened(self, sent: list[Message], replies: list[Message]) -> list[Message]:
        kept, self.recorded = self._screen(sent, replies)
        return kept

    def share_keys_stage(self, grid, context, state):
        self.stage = "share keys"
        return super().share_keys_stage(grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):
        self.stage = "collect masked vectors"
        return super().collect_masked_vectors_stage(_ScreenedGrid(grid, self._screened),
                                                    context, state)

    def unmask_stage(self, grid, context, state):
        self.stage = "unmask"
        return super().unmask_stage(grid, context, state)


def masked_shape_problem(msg: Message, shapes: list[tuple[int, ...]], max_weight: float
                         ) -> str | None:
    """Why a masking-stage reply cannot enter the masked sum, or None."""
    weight = _weight(msg)
    metrics: Mapping[str, Any] = msg.content.metric_records.get(METRICS) or {}
    if (not isinstance(weight, int) or weight not in (0, metrics.get(NUM_EXAMPLES))
            or weight > max_weight):
        return (f"weight {weight} is neither 0 nor the reported example count "
                f"{metrics.get(NUM_EXAMPLES)} (at most {max_weight:g})")
    configs: Mapping[str, Any] = msg.content.config_records.get(RECORD_KEY_CONFIGS) or {}
    masked = configs.get(Key.MASKED_PARAMETERS)
    try:
        got = [legacy_parameter.bytes_to_ndarray(b).shape for b in masked]  # type: ignore
    except (TypeError, ValueError, OSError) as exc:
        return f"masked tensors are unreadable: {exc}"
    if got != [(1,)] + shapes:  # the masked weight, then one tensor per adapter key
        return f"masked tensors of shapes {got[:3]}..., expected {[(1,)] + shapes[:2]}..."
    return None


def _weight(msg: Message) -> int | float | None:
    """The weight a masking-stage reply declares in plain text (its FitRes example count)."""
    record: Mapping[str, Any] = msg.content.metric_records.get("fitres.num_examples") or {}
    return record.get("num_examples")


class SecureRound:
    """One SecAgg+ round (a :class:`~dpfl.server.strategy.Round`): the sampled sites train
    and mask their updates, the ledger records their spend before anything is unmasked,
    and the unmasked aggregate passes the update check before it is released."""

    def __init__(self, grid: Grid, cfg: FedConfig, plan: RoundPlan, ledger: PrivacyLedger,
                 node_site: NodeSites):
        self.grid, self.cfg, self.plan = grid, cfg, plan
        self.ledger, self.node_site = ledger, node_site
        self.threshold, self.max_weight = cfg.secagg_threshold, cfg.secagg_max_weight
        # fewest real updates in a sum that may be unmasked: never one site's update alone
        self.needed = max(cfg.secagg_min_contributions, cfg.min_replies)

    def run(self, rnd: int, adapter: dict[str, np.ndarray], msgs: list[Message]
            ) -> RoundOutcome:
        keys = travelling_keys(adapter, self.cfg.ffa)
        if len(msgs) < self.needed:  # before any site trains: nothing is spent
            return self._release(rnd, adapter, keys, None, self._halted(
                rnd, f"not started: {len(msgs)} site(s) sampled, fewer than the {self.needed} "
                "real updates a sum must hold to be unmasked (secagg-min-contributions)"))
        shapes = [adapter[k].shape for k in keys]
        strategy = _Sampled(self.grid, [m.metadata.dst_node_id for m in msgs],
                            self._config(rnd, adapter))
        workflow = _Workflow(lambda sent, replies: self._record(rnd, sent, replies, shapes),
                             num_shares=1.0, reconstruction_threshold=self.threshold,
                             max_weight=self.max_weight, clipping_range=CLIP_RANGE,
                             timeout=self.cfg.round_timeout)
        workflow(self.grid, self._context(rnd, adapter, strategy))
        recorded = workflow.recorded or self._halted(rnd, f"halted in its {workflow.stage} "
                                                          "stage")
        return self._release(rnd, adapter, keys, strategy.aggregate, recorded)

    def _config(self, rnd: int, adapter: dict[str, np.ndarray]) -> dict[str, Any]:
        """What every sampled site receives (``fitins.config``): the plan, and the SecAgg+
        settings it checks its own update against."""
        return {**self.plan.to_record(), SERVER_ROUND: rnd,
                SECAGG_ADAPTER_KEYS: "\n".join(sorted(adapter)),
                SECAGG_MAX_WEIGHT: self.max_weight, SECAGG_CLIP_RANGE: CLIP_RANGE,
                SECAGG_MAX_NORM: self.cfg.max_update_norm}

    def _context(self, rnd: int, adapter: dict[str, np.ndarray], strategy: _Sampled
                 ) -> LegacyContext:
        """The legacy context the workflow runs in: the round and the whole global adapter."""
        context = LegacyContext(Context(run_id=self.grid.run.run_id, node_id=0, node_config={},
                                        state=RecordDict(), run_config={}), strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: rnd})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([adapter[k] for k in sorted(adapter)]), keep_input=False)
        return context

    def _record(self, rnd: int, sent: list[Message], replies: list[Message],
                shapes: list[tuple[int, ...]]) -> tuple[list[Message], _Recorded]:
        """Screen the masking stage's replies and write the ledger durably, before the
        unmasking stage: no aggregate exists without its spend on record. Returns the
        replies to unmask (none when too few carry an update: nothing is released)."""
        unanswered = len(sent) - len(replies)
        replies, refused = self.node_site.admit(rnd, replies)  # not its enrolled site: out
        reports = [r for r in map(site_report, replies) if r is not None]
        kept, rejected, accepted = self._screen(rnd, replies, sent, shapes,
                                                {r.site for r in reports})
        rejected.update(refused)
        if unanswered > 0:
            rejected[f"<{unanswered} unanswered>"] = (
                f"no reply within {self.cfg.round_timeout}s")
        if accepted < self.needed:
            rejected["<secagg-min-contributions>"] = (
                f"{accepted} real update(s) in the secure sum, fewer than {self.needed} "
                "(secagg-min-contributions, min-replies): nothing is unmasked, the global "
                "adapter is kept")
        recorded = _Recorded(accepted, rejected, self.ledger.record_round(rnd, reports, rejected))
        return (kept if accepted >= self.needed else []), recorded

    def _halted(self, rnd: int, what: str) -> _Recorded:
        """SecAgg+ stopped (or never started) before its masking stage: no site trained,
        nothing was spent, and the round is on record all the same."""
        why = {"<secagg>": f"SecAgg+ {what}"}
        return _Recorded(0, why, self.ledger.record_round(rnd, [], why))

    def _screen(self, rnd: int, replies: list[Message], sent: list[Message],
                shapes: list[tuple[int, ...]], reported: Collection[str]
                ) -> tuple[list[Message], dict[str, str], int]:
        """Replies that enter the masked sum, {site: reason} for the rest, and how many carry
        a real (weighted) update. A weighted update whose privacy report the ledger cannot
        record is left out: its spend would not be on record."""
        self.node_site.update(replies)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        kept, rejected, accepted = [], {}, 0
        for msg in replies:
            site = reply_site(msg, self.node_site.map, sent_to)
            if msg.has_error():
                rejected[site] = f"client error: {msg.error.reason}"
                continue
            problem = masked_shape_problem(
                msg, shapes, min(self.max_weight, self.node_site.max_examples(site)))
            if problem is not None:
                rejected[site] = problem
                continue
            if _weight(msg) and site not in reported:
                rejected[site] = MALFORMED_REPORT
                continue
            kept.append(msg)
            withheld = (msg.content.config_records.get(SITE) or {}).get(WITHHELD)
            if withheld:
                rejected[site] = f"withheld by the site: {withheld!s}"
            elif not _weight(msg):
                rejected[site] = "did not train (budget exhausted or refused)"
            else:
                accepted += 1
        for site, reason in rejected.items():
            log.warning("round %d: update from %s left out of the secure sum: %s", rnd, site,
                        reason)
        return kept, rejected, accepted

    def _release(self, rnd: int, adapter: dict[str, np.ndarray], keys: list[str],
                 aggregate: list[np.ndarray] | None, recorded: _Recorded) -> RoundOutcome:
        """The round's outcome: the unmasked aggregate becomes the global adapter when it
        passes the update check; otherwise (or when nothing was unmasked) it stays as it was."""
        if aggregate is None:  # nothing was unmasked: no update is in a release
            return RoundOutcome(adapter, 0, recorded.rejected, recorded.entry)
        problem = self._aggregate_problem(adapter, keys, aggregate)
        if problem is not None:
            log.error("round %d: %s; the global adapter is kept", rnd, problem)
            return RoundOutcome(adapter, 0, {**recorded.rejected, "<aggregate>": problem},
                                recorded.entry)
        new = {**adapter, **{k: a.astype(adapter[k].dtype) for k, a in zip(keys, aggregate)}}
        return RoundOutcome(new, recorded.accepted, recorded.rejected, recorded.entry)

    def _aggregate_problem(self, adapter: dict[str, np.ndarray], keys: list[str],
                           aggregate: list[np.ndarray]) -> str | None:
        """Why the unmasked aggregate must not be released (the update check: a weighted mean
        of updates that passed it at their sites passes it too), or None."""
        if len(aggregate) != len(keys):
            return (f"the unmasked aggregate has {len(aggregate)} tensors for {len(keys)} "
                    "adapter keys")
        reason = check_update(dict(zip(keys, aggregate)), {k: adapter[k] for k in keys},
                              max_update_norm=self.cfg.update_bound, same_dtype=False)
        return None if reason is None else f"the unmasked aggregate fails the check: {reason}"
