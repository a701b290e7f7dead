"""The coordinator's round loop: propose, collect, record privacy spend, aggregate, release.

Order within a round is what makes the privacy record trustworthy:

1. sample eligible sites (exhausted sites are never sampled again);
2. send the global adapter and the round plan; wait up to ``round_timeout``;
3. validate every reply (keys, shapes, finiteness, norm bound) and log rejections;
4. write the privacy ledger durably (every site that reported spend, accepted or not);
5. only then aggregate, checkpoint and release the new global adapter.

Steps 2-4 and the aggregation are one :class:`~dpfl.server.strategy.Round`, plain
(:class:`PlainRound`) or secure (:class:`~dpfl.server.secagg.SecureRound`), each returning a
:class:`~dpfl.server.strategy.RoundOutcome`; the loop itself reads sample -> round ->
checkpoint -> log -> grid.

A restarted coordinator resumes after the last checkpointed round; the ledger, which may be
one round ahead of the checkpoint, is never rewound.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from dpfl.server.clientdp import ClientLevelDP
from dpfl.server.runlock import RunLock
from dpfl.server.secagg import SecureRound
from dpfl.server.strategy import (
    AdapterFedAvg,
    Enrolment,
    NodeSites,
    Round,
    RoundOutcome,
    current_replies,
    site_report,
)
from dpfl.shared.errors import StateError
from dpfl.shared.federation.config import FedConfig, RoundPlan
from dpfl.shared.federation.ledger import PrivacyLedger
from dpfl.shared.federation.protocol import ARRAYS
from dpfl.shared.io import atomic_write_bytes
from dpfl.shared.ldm.lora import (
    adapter_state,
    load_adapter_state,
    save_adapter,
    spec_for_plan,
    travelling_keys,
    wrap_unet,
)
from dpfl.shared.ldm.models import LatentDiffusion, load_ldm
from dpfl.shared.ldm.sampling import class_grid
from dpfl.shared.privacy.guarantee import PrivacyGuarantee
from dpfl.shared.report.build import try_write_report
from dpfl.shared.rundir import RunDir

log = logging.getLogger(__name__)


class GlobalCheckpoint:
    """The last released global adapter, its round in the weights file's own metadata: one
    atomic rename replaces both together, so a crash can never pair one round's weights
    with another round's number."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.weights = folder / "adapter.safetensors"

    def load(self) -> tuple[int, dict[str, np.ndarray]] | None:
        if not self.weights.exists():
            return None
        try:
            with safe_open(str(self.weights), "np") as f:
                stored = (f.metadata() or {}).get("round")
            if stored is None:
                raise ValueError("its metadata holds no round")
            weights = load_safetensors(self.weights.read_bytes())
            return int(stored), weights
        except (OSError, ValueError, SafetensorError) as exc:
            raise StateError(f"global checkpoint {self.weights} is unreadable ({exc}); "
                             "restore it from backup") from exc

    def save(self, server_round: int, adapter: dict[str, np.ndarray], fingerprint: str) -> None:
        atomic_write_bytes(self.weights, save_safetensors(adapter, metadata={
            "round": str(server_round), "base_fingerprint": fingerprint}))


@dataclass
class Federation:
    """State of one coordinator process."""

    cfg: FedConfig
    base: LatentDiffusion
    plan: RoundPlan
    run: RunDir
    ledger: PrivacyLedger
    checkpoint: GlobalCheckpoint
    model: torch.nn.Module  # peft-wrapped UNet, for sample grids and the final adapter

    @classmethod
    def open(cls, cfg: FedConfig) -> Federation:
        base = load_ldm(cfg.base_model)
        plan = cfg.plan(base.fingerprint())
        run = RunDir(cfg.run_dir)
        torch.manual_seed(plan.seed)  # the shared adapter initialisation (A for FFA-LoRA)
        model = wrap_unet(base.unet, spec_for_plan(plan))
        return cls(cfg, base, plan, run, PrivacyLedger.load_or_create(run / "ledger.json"),
                   GlobalCheckpoint(run / "global"), model)

    def initial_adapter(self) -> tuple[int, dict[str, np.ndarray]]:
        saved = self.checkpoint.load()
        if saved is not None:
            log.info("resuming after round %d from %s", saved[0], self.checkpoint.folder)
            return saved
        return 0, {k: v.numpy() for k, v in adapter_state(self.model).items()}

    def load_into_model(self, adapter: dict[str, np.ndarray]) -> None:
        load_adapter_state(self.model, {k: torch.from_numpy(v.copy()) for k, v in adapter.items()})

    def sample_grid(self, adapter: dict[str, np.ndarray], name: str, title: str) -> Path:
        self.load_into_model(adapter)
        ldm = LatentDiffusion(self.base.vae, self.model, self.base.scheduler, self.base.spec)
        return class_grid(ldm, self.run / name, per_class=6, steps=self.cfg.sample_steps,
                          seed=self.plan.seed, title=title)


def client_level_dp(cfg: FedConfig, run: RunDir) -> ClientLevelDP | None:
    if cfg.client_dp_clip <= 0:
        return None
    return ClientLevelDP(run / "client_dp_accountant.json", clip=cfg.client_dp_clip,
                         noise_multiplier=cfg.client_dp_noise, delta=cfg.client_dp_delta,
                         budget=cfg.client_dp_epsilon)


class PlainRound:
    """One round without SecAgg+ (a :class:`~dpfl.server.strategy.Round`): every reply is
    seen and checked on its own, the spend recorded, then the valid updates averaged
    (Flower's FedAvg, or DP-FedAvg when client-level DP is on)."""

    def __init__(self, grid: Grid, cfg: FedConfig, ledger: PrivacyLedger, node_site: NodeSites,
                 strategy: AdapterFedAvg, cdp: ClientLevelDP | None):
        self.grid, self.cfg, self.ledger, self.node_site = grid, cfg, ledger, node_site
        self.strategy, self.cdp = strategy, cdp

    def run(self, rnd: int, adapter: dict[str, np.ndarray], msgs: list[Message]
            ) -> RoundOutcome:
        cfg = self.cfg
        replies = list(self.grid.send_and_receive(msgs, timeout=cfg.round_timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        replies = current_replies(rnd, replies, sent_to)  # a straggler's: dropped
        unanswered = len(msgs) - len(replies)
        replies, refused = self.node_site.admit(rnd, replies)  # not its enrolled site: out
        self.node_site.update(replies)
        reference = {k: adapter[k] for k in travelling_keys(adapter, cfg.ffa)}
        reports = [r for r in map(site_report, replies) if r is not None]
        ok, rejected = self.strategy.split_replies(
            rnd, replies, reference, self.node_site.map, sent_to,
            reported={r.site for r in reports}, max_examples=self.node_site.max_examples)
        rejected.update(refused)
        if unanswered > 0:
            rejected[f"<{unanswered} unanswered>"] = f"no reply within {cfg.round_timeout}s"
        # what can fail comes first; then both privacy records are made durable; only then
        # is anything derived from the round (the client-level noise, the release) made
        mean = self._clipped_mean(reference, ok, sampled=len(msgs))
        client_level = self.cdp.commit_release().to_json() if self.cdp is not None else None
        entry = self.ledger.record_round(rnd, reports, rejected, client_level)
        new = self._aggregate(rnd, adapter, reference, ok, mean, sampled=len(msgs))
        return RoundOutcome(new, len(ok), rejected, entry, client_level)

    def _clipped_mean(self, reference: dict[str, np.ndarray], ok: list[Message], sampled: int
                      ) -> dict[str, np.ndarray] | None:
        """With client-level DP, the clipped fixed-denominator mean of the accepted updates
        (no noise yet: it is drawn after the commit); else None."""
        if self.cdp is None:
            return None
        updates = [{k: v.numpy() for k, v in m.content.array_records[ARRAYS].items()}
                   for m in ok]
        return self.cdp.clipped_mean(reference, updates, sampled=sampled)

    def _aggregate(self, rnd: int, adapter: dict[str, np.ndarray],
                   reference: dict[str, np.ndarray], ok: list[Message],
                   mean: dict[str, np.ndarray] | None, sampled: int) -> dict[str, np.ndarray]:
        """The new global adapter from the accepted replies (the spend is on record)."""
        if len(ok) < self.cfg.min_replies:
            log.warning("round %d: %d accepted update(s), min-replies is %d; the global "
                        "adapter stays as it was (the sites' spend is on record)", rnd,
                        len(ok), self.cfg.min_replies)
            return adapter
        if self.cdp is not None and mean is not None:  # equal weights, fixed denominator
            return {**adapter, **self.cdp.release(reference, mean, sampled=sampled)}
        agg, _ = self.strategy.aggregate_valid(rnd, ok)
        if agg is None:
            return adapter
        return {**adapter, **{k: v.numpy() for k, v in agg.items()}}


def make_strategy(cfg: FedConfig, ledger: PrivacyLedger, node_site: NodeSites, done: int
                  ) -> AdapterFedAvg:
    """The sampling strategy: never an exhausted site; seeded by the round it resumes at."""
    return AdapterFedAvg(
        excluded=lambda n: ledger.exhausted(node_site.get(n, "")),
        sample_seed=cfg.seed + done, max_update_norm=cfg.update_bound,
        fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
        min_train_nodes=cfg.min_train_nodes, min_available_nodes=cfg.min_available_nodes)


def make_round(grid: Grid, fed: Federation, node_site: NodeSites, strategy: AdapterFedAvg,
               cdp: ClientLevelDP | None) -> Round:
    """The run's kind of round: SecAgg+ (only the masked sum is seen; see
    :mod:`dpfl.server.secagg`) or plain."""
    if fed.cfg.secagg:
        return SecureRound(grid, fed.cfg, fed.plan, fed.ledger, node_site)
    return PlainRound(grid, fed.cfg, fed.ledger, node_site, strategy, cdp)


def sample(strategy: AdapterFedAvg, grid: Grid, fed: Federation, rnd: int,
           adapter: dict[str, np.ndarray], cdp: ClientLevelDP | None) -> list[Message]:
    """The round's instructions to the sampled sites; none (and why, logged) when the run
    must stop: one more round would exceed the client-level budget, or no site can train.
    Raises :class:`~dpfl.shared.errors.ConfigError`, before anything is sent, when
    client-level DP's delta is not below 1 / the number of sites connected."""
    if cdp is not None and not cdp.can_release():
        log.warning("round %d: one more round would exceed the client-level budget "
                    "(epsilon %g); stopping", rnd, fed.cfg.client_dp_epsilon)
        return []
    msgs = list(strategy.configure_train(
        rnd, ArrayRecord({k: Array(v) for k, v in adapter.items()}),
        ConfigRecord(fed.plan.to_record()), grid))
    if cdp is not None:  # delta < 1 / sites, all connected ones; before anything is sent
        cdp.check_sites(max(len(msgs), len(list(grid.get_node_ids()))))
    if not msgs:
        log.warning("round %d: no site can train (all exhausted or none connected); "
                    "stopping", rnd)
    return msgs


def log_round(run: RunDir, rnd: int, outcome: RoundOutcome, sampled: list[str]) -> None:
    """One line of ``metrics.jsonl`` per released round (``sampled``: the sites asked)."""
    entry, client_level = outcome.entry, outcome.client_level
    run.log(round=rnd, sampled=sampled, accepted=outcome.accepted,
            rejected=dict(outcome.rejected),
            epsilon={s: v["epsilon"] for s, v in entry["sites"].items()},
            global_epsilon=entry["global_epsilon"], global_delta=entry["global_delta"],
            **({"client_level_epsilon": client_level["epsilon"]} if client_level else {}))


def write_final_adapter(fed: Federation, adapter: dict[str, np.ndarray]) -> None:
    """The released adapter (``adapter/``) with the guarantee it carries (``privacy.json``)."""
    fed.load_into_model(adapter)
    save_adapter(fed.model, fed.run / "adapter")
    guarantee = PrivacyGuarantee.from_ledger(fed.ledger, fed.plan.base_fingerprint)
    guarantee.write(fed.run / "adapter" / "privacy.json")


def run_federation(grid: Grid, cfg: FedConfig,
                   enrolment: Mapping[int, Enrolment] | None = None) -> PrivacyLedger:
    """Run (or resume) the federated rounds; returns the final ledger. Only one coordinator
    may write a run directory at a time (:class:`~dpfl.server.runlock.RunLock`).
    ``enrolment`` (node id -> listed site, in a deployment): see :class:`NodeSites`."""
    with RunLock(cfg.run_dir):
        return _run_federation(grid, cfg, enrolment)


def _run_federation(grid: Grid, cfg: FedConfig,
                    enrolment: Mapping[int, Enrolment] | None) -> PrivacyLedger:
    """Sample, round, checkpoint, log, grid; round after round, then the final adapter.

    The privacy order is kept inside ``round_.run``: the ledger (and the client-level
    accountant) are durable before the round's aggregate exists, so the checkpoint and the
    log below only ever see an outcome whose spend is on record."""
    fed = Federation.open(cfg)
    fed.run.write_config(cfg, base_fingerprint=fed.plan.base_fingerprint)
    done, adapter = fed.initial_adapter()
    node_site = NodeSites(fed.run / "nodes.json", enrolment)
    cdp = client_level_dp(cfg, fed.run)
    strategy = make_strategy(cfg, fed.ledger, node_site, done)
    round_ = make_round(grid, fed, node_site, strategy, cdp)
    if done == 0:
        fed.sample_grid(adapter, "samples_round_000.png", "base model (round 0)")
    try_write_report(fed.run.path, live=True)  # waiting for sites; a failure is only logged
    try:
        for rnd in range(done + 1, cfg.num_rounds + 1):
            msgs = sample(strategy, grid, fed, rnd, adapter, cdp)
            if not msgs:
                break
            sampled = [node_site.get(m.metadata.dst_node_id, f"node {m.metadata.dst_node_id}")
                       for m in msgs]
            fed.ledger.begin_round(rnd, sampled)
            try_write_report(fed.run.path, live=True)  # last round's results, this one sent
            outcome = round_.run(rnd, adapter, msgs)
            adapter = outcome.adapter
            fed.checkpoint.save(rnd, adapter, fed.plan.base_fingerprint)
            log_round(fed.run, rnd, outcome, sampled)
            if cfg.sample_every and rnd % cfg.sample_every == 0:
                fed.sample_grid(adapter, f"samples_round_{rnd:03d}.png", f"global model after "
                                f"round {rnd}, eps={outcome.entry['global_epsilon']:.2f}")
    except BaseException:
        try_write_report(fed.run.path)  # not live: the report says the run did not finish
        raise
    write_final_adapter(fed, adapter)
    log.info("privacy ledger:\n%s", fed.ledger.table())
    try_write_report(fed.run.path)  # logs a failure, never raises
    return fed.ledger
