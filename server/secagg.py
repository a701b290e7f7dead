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
  then removes them like sites that dropped out.

What the coordinator can no longer check, the sites check before masking
(:func:`dpfl.client.secagg.self_check`): finiteness, the quantisation range and
``max-update-norm``. The coordinator still checks the released aggregate (shapes,
finiteness, and its distance from the global adapter, which a weighted mean of bounded
updates cannot exceed). Client-level DP needs each update clipped before the sum and is
refused with SecAgg+ (see :class:`dpfl.shared.federation.config.FedConfig`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable

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

from dpfl.server.strategy import MALFORMED_REPORT, METRICS, reply_site, site_report

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
    """The grid, with every reply of the masking stage screened by ``screen`` first."""

    def __init__(self, grid: Grid, screen):
        self._grid, self._screen = grid, screen

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        return self._screen(messages, list(self._grid.send_and_receive(messages,
                                                                         timeout=timeout)))


class _Workflow(SecAggPlusWorkflow):
    def __init__(self, screen, **kwargs):
        super().__init__(**kwargs)
        self._screen = screen
        self.stage = "setup"

    def share_keys_stage(self, grid, context, state):
        self.stage = "share keys"
        return super().share_keys_stage(grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):
        self.stage = "collect masked vectors"
        return super().collect_masked_vectors_stage(_ScreenedGrid(grid, self._screen),
                                                    context, state)

    def unmask_stage(self, grid, context, state):
        self.stage = "unmask"
        return super().unmask_stage(grid, context, state)


def masked_shape_problem(msg: Message, shapes: list[tuple[int, ...]], max_weight: float
                         ) -> str | None:
    """Why a masking-stage reply cannot enter the masked sum, or None."""
    weight = _weight(msg)
    metrics = msg.content.metric_records.get(METRICS) or {}
    if (not isinstance(weight, int) or weight not in (0, metrics.get("num-examples"))
            or weight > max_weight):
        return (f"weight {weight} is neither 0 nor the reported example count "
                f"{metrics.get('num-examples')} (at most {max_weight:g})")
    masked = (msg.content.config_records.get(RECORD_KEY_CONFIGS) or {}).get(
        Key.MASKED_PARAMETERS)
    try:
        got = [legacy_parameter.bytes_to_ndarray(b).shape for b in masked]  # type: ignore
    except (TypeError, ValueError, OSError) as exc:
        return f"masked tensors are unreadable: {exc}"
    if got != [(1,)] + shapes:  # the masked weight, then one tensor per adapter key
        return f"masked tensors of shapes {got[:3]}..., expected {[(1,)] + shapes[:2]}..."
    return None


def _weight(msg: Message) -> int | float | None:
    """The weight a masking-stage reply declares in plain text (its FitRes example count)."""
    record = msg.content.metric_records.get("fitres.num_examples") or {}
    return record.get("num_examples")


class SecureRound:
    """One SecAgg+ round: returns the new adapter, accepted count, rejections, ledger entry."""

    def __init__(self, fed, grid: Grid, node_site, threshold: float, max_weight: float):
        self.fed, self.grid, self.node_site = fed, grid, node_site
        self.threshold, self.max_weight = threshold, max_weight

    def run(self, rnd: int, adapter: dict[str, np.ndarray], keys: list[str], nodes: list[int],
            min_replies: int = 1) -> tuple[dict[str, np.ndarray], int, dict[str, str], dict]:
        cfg = self.fed.cfg
        order = sorted(adapter)
        config = {**self.fed.plan.to_record(), "server-round": rnd,
                  "dpfl-adapter-keys": "\n".join(order),
                  "dpfl-secagg-max-weight": self.max_weight,
                  "dpfl-secagg-clip-range": CLIP_RANGE,
                  "dpfl-max-update-norm": cfg.max_update_norm}
        strategy = _Sampled(self.grid, nodes, config)
        context = LegacyContext(Context(run_id=self.grid.run.run_id, node_id=0, node_config={},
                                        state=RecordDict(), run_config={}), strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: rnd})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([adapter[k] for k in order]), keep_input=False)
        shapes = [adapter[k].shape for k in keys]
        outcome: dict = {}

        def screen(sent: list[Message], replies: list[Message]) -> list[Message]:
            reports = [r for r in map(site_report, replies) if r is not None]
            kept, rejected, accepted = self._screen(rnd, replies, sent, shapes,
                                                    {r.site for r in reports})
            if len(sent) > len(replies):
                rejected[f"<{len(sent) - len(replies)} unanswered>"] = (
                    f"no reply within {cfg.round_timeout}s")
            if 0 < accepted < min_replies:
                rejected["<min-replies>"] = (f"{accepted} accepted update(s), min-replies is "
                                             f"{min_replies}: nothing is unmasked")
            # durable before the unmasking stage: no aggregate exists without its spend
            outcome.update(rejected=rejected, accepted=accepted,
                           entry=self.fed.ledger.record_round(rnd, reports, rejected))
            # nothing (or too little) to release: halt before unmasking
            return kept if accepted >= max(1, min_replies) else []

        workflow = _Workflow(screen, num_shares=1.0, reconstruction_threshold=self.threshold,
                             max_weight=self.max_weight, clipping_range=CLIP_RANGE,
                             timeout=cfg.round_timeout)
        workflow(self.grid, context)
        if "entry" not in outcome:  # halted before any site trained: nothing was spent
            why = {"<secagg>": f"SecAgg+ halted in its {workflow.stage} stage"}
            outcome.update(rejected=why, accepted=0,
                           entry=self.fed.ledger.record_round(rnd, [], why))
        new = self._release(rnd, adapter, keys, strategy.aggregate, outcome)
        return new, outcome["accepted"], outcome["rejected"], outcome["entry"]

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
            problem = masked_shape_problem(msg, shapes, self.max_weight)
            if problem is not None:
                rejected[site] = problem
                continue
            if _weight(msg) and site not in reported:
                rejected[site] = MALFORMED_REPORT
                continue
            kept.append(msg)
            withheld = (msg.content.config_records.get("site") or {}).get("withheld")
            if withheld:
                rejected[site] = f"withheld by the site: {withheld}"
            elif not _weight(msg):
                rejected[site] = "did not train (budget exhausted or refused)"
            else:
                accepted += 1
        for site, reason in rejected.items():
            log.warning("round %d: update from %s left out of the secure sum: %s", rnd, site,
                        reason)
        return kept, rejected, accepted

    def _release(self, rnd: int, adapter: dict[str, np.ndarray], keys: list[str],
                 aggregate: list[np.ndarray] | None, outcome: dict) -> dict[str, np.ndarray]:
        if aggregate is None:
            return adapter
        problem = None
        if [a.shape for a in aggregate] != [adapter[k].shape for k in keys]:
            problem = "the unmasked aggregate has the wrong shapes"
        elif not all(np.isfinite(a).all() for a in aggregate):
            problem = "the unmasked aggregate holds non-finite values"
        else:
            dist = math.sqrt(sum(float(np.sum((a - adapter[k].astype(np.float64)) ** 2))
                                 for a, k in zip(aggregate, keys)))
            if dist > self.fed.cfg.update_bound:
                problem = f"the aggregate moved {dist:.3g}, beyond max-update-norm"
        if problem is not None:
            log.error("round %d: %s; the global adapter is kept", rnd, problem)
            outcome["rejected"] = {**outcome["rejected"], "<aggregate>": problem}
            outcome["accepted"] = 0
            return adapter
        return {**adapter, **{k: a.astype(adapter[k].dtype) for k, a in zip(keys, aggregate)}}
