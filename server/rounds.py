"""The coordinator's round loop: propose, collect, record privacy spend, aggregate, release.

Order within a round is what makes the privacy record trustworthy:

1. sample eligible sites (exhausted sites are never sampled again);
2. send the global adapter and the round plan; wait up to ``round_timeout``;
3. validate every reply (keys, shapes, finiteness, norm bound) and log rejections;
4. write the privacy ledger durably (every site that reported spend, accepted or not);
5. only then aggregate, checkpoint and release the new global adapter.

A restarted coordinator resumes after the last checkpointed round; the ledger, which may be
one round ahead of the checkpoint, is never rewound.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from safetensors import safe_open
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from dpfl.server.clientdp import ClientLevelDP
from dpfl.server.runlock import RunLock
from dpfl.server.secagg import SecureRound
from dpfl.server.strategy import (
    ARRAYS,
    SITE,
    AdapterFedAvg,
    current_replies,
    reply_site,
    site_report,
)
from dpfl.shared.errors import StateError
from dpfl.shared.federation.config import FedConfig, RoundPlan
from dpfl.shared.federation.ledger import PrivacyLedger
from dpfl.shared.io import atomic_write_bytes, atomic_write_json
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
from dpfl.shared.report.build import try_write_report
from dpfl.shared.rundir import RunDir

log = logging.getLogger(__name__)


class GlobalCheckpoint:
    """The last released global adapter and its round, written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.weights, self.meta = folder / "adapter.safetensors", folder / "checkpoint.json"

    def load(self) -> tuple[int, dict[str, np.ndarray]] | None:
        if not self.weights.exists():
            return None
        try:  # the round inside the weights file: one rename replaced both together
            with safe_open(str(self.weights), "np") as f:
                stored = (f.metadata() or {}).get("round")
            if stored is None:  # written before the round moved into the weights file
                stored = json.loads(self.meta.read_text())["round"]
            weights = load_safetensors(self.weights.read_bytes())
        except (OSError, ValueError, KeyError) as exc:
            raise StateError(f"global checkpoint in {self.folder} is unreadable: {exc}") from exc
        return int(stored), weights

    def save(self, server_round: int, adapter: dict[str, np.ndarray], fingerprint: str) -> None:
        atomic_write_bytes(self.weights, save_safetensors(adapter, metadata={
            "round": str(server_round), "base_fingerprint": fingerprint}))
        atomic_write_json(self.meta, {"round": server_round, "base_fingerprint": fingerprint})


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

    def sample_grid(self, adapter: dict[str, np.ndarray], name: str, title: str) -> Path:
        load_adapter_state(self.model, {k: torch.from_numpy(v.copy()) for k, v in adapter.items()})
        ldm = LatentDiffusion(self.base.vae, self.model, self.base.scheduler, self.base.spec)
        return class_grid(ldm, self.run / name, per_class=6, steps=self.cfg.sample_steps,
                          seed=self.plan.seed, title=title)


class NodeSites:
    """Which site each Flower node id answered as, kept on disk so that a restarted
    coordinator does not ask an exhausted site again."""

    def __init__(self, path: Path):
        self.path = path
        self.map: dict[int, str] = {}
        if path.exists():
            try:
                self.map = {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable %s (%s); sites re-identify on reply", path, exc)

    def get(self, node: int, default: str = "") -> str:
        return self.map.get(node, default)

    def update(self, replies: list[Message]) -> None:
        new = {m.metadata.src_node_id: reply_site(m) for m in replies
               if not m.has_error() and SITE in m.content.config_records}
        if any(self.map.get(n) != s for n, s in new.items()):
            self.map.update(new)
            atomic_write_json(self.path, {str(k): v for k, v in sorted(self.map.items())})


def client_level_dp(cfg: FedConfig, run: RunDir) -> ClientLevelDP | None:
    if cfg.client_dp_clip <= 0:
        return None
    return ClientLevelDP(run / "client_dp_accountant.json", clip=cfg.client_dp_clip,
                         noise_multiplier=cfg.client_dp_noise, delta=cfg.client_dp_delta,
                         budget=cfg.client_dp_epsilon)


def run_federation(grid: Grid, cfg: FedConfig) -> PrivacyLedger:
    """Run (or resume) the federated rounds; returns the final ledger. Only one coordinator
    may write a run directory at a time (:class:`~dpfl.server.runlock.RunLock`)."""
    with RunLock(cfg.run_dir):
        return _run_federation(grid, cfg)


def _run_federation(grid: Grid, cfg: FedConfig) -> PrivacyLedger:
    fed = Federation.open(cfg)
    fed.run.write_config(cfg, base_fingerprint=fed.plan.base_fingerprint)
    done, adapter = fed.initial_adapter()
    node_site = NodeSites(fed.run / "nodes.json")
    cdp = client_level_dp(cfg, fed.run)
    strategy = AdapterFedAvg(
        excluded=lambda n: fed.ledger.exhausted(node_site.get(n, "")),
        sample_seed=cfg.seed + done, max_update_norm=cfg.update_bound,
        fraction_train=cfg.fraction_train, fraction_evaluate=0.0,
        min_train_nodes=cfg.min_train_nodes, min_available_nodes=cfg.min_available_nodes)
    secure = (SecureRound(fed, grid, node_site, cfg.secagg_threshold, cfg.secagg_max_weight)
              if cfg.secagg else None)
    if done == 0:
        fed.sample_grid(adapter, "samples_round_000.png", "base model (round 0)")
    for rnd in range(done + 1, cfg.num_rounds + 1):
        if cdp is not None and not cdp.can_release():
            log.warning("round %d: one more round would exceed the client-level budget "
                        "(epsilon %g); stopping", rnd, cfg.client_dp_epsilon)
            break
        msgs = list(strategy.configure_train(
            rnd, ArrayRecord({k: Array(v) for k, v in adapter.items()}),
            ConfigRecord(fed.plan.to_record()), grid))
        if not msgs:
            log.warning("round %d: no site can train (all exhausted or none connected); "
                        "stopping", rnd)
            break
        if secure is not None:  # SecAgg+: only the masked sum; see dpfl.server.secagg
            adapter, accepted, rejected, entry = secure.run(
                rnd, adapter, travelling_keys(adapter, cfg.ffa),
                [m.metadata.dst_node_id for m in msgs], cfg.min_replies)
            client_level = None
        else:
            replies = list(grid.send_and_receive(msgs, timeout=cfg.round_timeout))
            sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
            replies = current_replies(rnd, replies, sent_to)  # a straggler's: dropped
            node_site.update(replies)
            keys = travelling_keys(adapter, cfg.ffa)
            reports = [r for r in map(site_report, replies) if r is not None]
            ok, rejected = strategy.split_replies(rnd, replies, {k: adapter[k] for k in keys},
                                                  node_site.map, sent_to,
                                                  reported={r.site for r in reports})
            missing = len(msgs) - len(replies)
            if missing:
                rejected[f"<{missing} unanswered>"] = f"no reply within {cfg.round_timeout}s"
            # both privacy records are durable before anything derived from the round exists
            client_level = cdp.commit_release().to_json() if cdp is not None else None
            entry = fed.ledger.record_round(rnd, reports, rejected, client_level)
            if len(ok) < cfg.min_replies:
                log.warning("round %d: %d accepted update(s), min-replies is %d; the global "
                            "adapter stays as it was (the sites' spend is on record)", rnd,
                            len(ok), cfg.min_replies)
            elif cdp is not None:  # equal weights, fixed denominator: every sampled site counts
                updates = [{k: v.numpy() for k, v in m.content.array_records[ARRAYS].items()}
                           for m in ok]
                adapter = {**adapter, **cdp.aggregate({k: adapter[k] for k in keys}, updates,
                                                      sampled=len(msgs))}
            else:
                agg, metrics = strategy.aggregate_valid(rnd, ok)
                if agg is not None:
                    adapter = {**adapter, **{k: v.numpy() for k, v in agg.items()}}
            accepted = len(ok)
        fed.checkpoint.save(rnd, adapter, fed.plan.base_fingerprint)
        fed.run.log(round=rnd, accepted=accepted, rejected=rejected,
                    epsilon={s: v["epsilon"] for s, v in entry["sites"].items()},
                    global_epsilon=entry["global_epsilon"], global_delta=entry["global_delta"],
                    **({"client_level_epsilon": client_level["epsilon"]} if client_level else {}))
        if cfg.sample_every and rnd % cfg.sample_every == 0:
            fed.sample_grid(adapter, f"samples_round_{rnd:03d}.png",
                            f"global model after round {rnd}, eps={entry['global_epsilon']:.2f}")
    load_adapter_state(fed.model, {k: torch.from_numpy(v.copy()) for k, v in adapter.items()})
    save_adapter(fed.model, fed.run / "adapter")
    atomic_write_json(fed.run / "adapter" / "privacy.json", {
        "global_epsilon": fed.ledger.global_guarantee()[0],
        "global_delta": fed.ledger.global_guarantee()[1],
        "sites": fed.ledger.sites, "rounds": fed.ledger.last_round,
        "client_level": fed.ledger.client_level,
        "base_fingerprint": fed.plan.base_fingerprint})
    log.info("privacy ledger:\n%s", fed.ledger.table())
    try_write_report(fed.run.path)  # logs a failure, never raises
    return fed.ledger
