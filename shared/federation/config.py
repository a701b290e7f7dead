"""Configuration of a federated run, parsed once at the boundary into frozen dataclasses.

:class:`FedConfig` is the coordinator's run configuration (Flower run-config keys are
kebab-case, e.g. ``flwr run . --run-config "num-rounds=5"``). :class:`RoundPlan` is the part
the coordinator *proposes* to sites each round; a site enforces its own budget on top
(:class:`SiteConfig`, from the node config), and the coordinator cannot raise it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpfl.shared.defaults import DEFAULT_IMAGE_POLICY, IMAGE_POLICIES
from dpfl.shared.errors import ConfigError

# ACCOUNTANTS: the privacy accountants a site may choose, listed torch-free (a federation
# never imports Opacus); tests/test_fedconfig.py checks they are the accountant's KINDS
from dpfl.shared.privacy.choices import ACCOUNTANTS as ACCOUNTANTS
from dpfl.shared.privacy.choices import parse_delta

#: keys Flower adds to a run or node config that are not dpfl settings
_FLOWER_KEYS = ("partition-id", "num-partitions", "server-round")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _from_mapping(cls, values: Mapping[str, Any], where: str):
    """Build dataclass ``cls`` from kebab-case keys, converting types and naming bad keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    known = {_kebab(n) for n in fields}
    unknown = sorted(k for k in values if k not in known and k not in _FLOWER_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    for name, f in fields.items():
        key = _kebab(name)
        if key not in values:
            continue
        raw = values[key]
        if "parse" in f.metadata:  # a field with its own parser, which names bad values
            try:
                kwargs[name] = f.metadata["parse"](raw)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            continue
        typ = type(f.default) if f.default is not dataclasses.MISSING else str
        val: Any
        try:
            if typ is bool:
                val = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            elif typ in (int, float, str):
                val = typ(raw)
            else:
                val = raw
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key}={raw!r} is not a valid {typ.__name__}") from None
        kwargs[name] = val
    return cls(**kwargs)


def _to_mapping(obj) -> dict[str, Any]:
    return {_kebab(k): v for k, v in dataclasses.asdict(obj).items()}


@dataclass(frozen=True)
class RoundPlan:
    """Training the coordinator proposes to every sampled site.

    Attributes:
        num_rounds: planned rounds of the whole run (sites calibrate sigma for all of them).
        local_epochs: local epochs per round (>= 1; steps per epoch: what Opacus' Poisson
            loader takes, :func:`dpfl.shared.privacy.poisson.steps_per_epoch`).
        batch_size: expected logical batch size of DP-SGD (>= 1).
        noise_multiplicity: K (timestep, noise) draws per example (DPDM), >= 1.
        clip: per-example clipping norm C (> 0).
        lr: learning rate of the LoRA parameters (> 0).
        target_epsilon: epsilon the coordinator suggests for the whole run; a site uses
            min(this, its own budget).
        lora_preset, lora_rank, lora_alpha, lora_dropout, train_class_embedding: LoRA setup.
        ffa: FFA-LoRA - freeze A at the shared initialisation; sites send only B.
        base_fingerprint: fingerprint of the base model every site must hold.
        seed: seed of the shared adapter initialisation.
    """

    num_rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 64
    noise_multiplicity: int = 4
    clip: float = 1.0
    lr: float = 2e-3
    target_epsilon: float = 10.0
    lora_preset: str = "attention"
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    train_class_embedding: bool = True
    ffa: bool = False
    base_fingerprint: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("num-rounds", self.num_rounds >= 1, ">= 1"),
                  ("local-epochs", self.local_epochs >= 1, ">= 1"),
                  ("batch-size", self.batch_size >= 1, ">= 1"),
                  ("noise-multiplicity", self.noise_multiplicity >= 1, ">= 1"),
                  ("clip", 0 < self.clip < math.inf, "a finite number > 0"),
                  ("lr", 0 < self.lr < math.inf, "a finite number > 0"),
                  ("target-epsilon", self.target_epsilon > 0, "> 0"),
                  ("lora-rank", self.lora_rank >= 1, "an integer >= 1"),
                  ("lora-alpha", self.lora_alpha > 0, "> 0"),
                  ("lora-dropout", 0 <= self.lora_dropout < 1, "in [0, 1)")]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key.replace('-', '_'))!r} is out of "
                                  f"range: it must be {allowed} (see RoundPlan's documentation)")

    @classmethod
    def from_record(cls, values: Mapping[str, Any]) -> RoundPlan:
        return _from_mapping(cls, values, "round plan")

    def to_record(self) -> dict[str, Any]:
        return _to_mapping(self)


@dataclass(frozen=True)
class FedConfig(RoundPlan):
    """The coordinator's run configuration (Flower run config, kebab-case keys): every
    :class:`RoundPlan` field (proposed to the sites) plus the coordinator's own settings.

    Attributes:
        base_model: directory of the public base model the coordinator hosts.
        run_dir: where the ledger, checkpoints, grids and metrics go.
        fraction_train: fraction of eligible sites sampled per round (0, 1].
        min_train_nodes: fewest sites per round (>= 1).
        min_available_nodes: sites to wait for before sampling.
        round_timeout: seconds to wait for replies; late replies are dropped.
        min_replies: fewest accepted updates that make a new global adapter (>= 1); a round
            with fewer still records every site's spend in the ledger, but keeps the global
            adapter unchanged (dropouts and stragglers cannot make one site the average).
        max_update_norm: reject updates farther than this from the global adapter
            (0: no bound beyond finiteness).
        sample_every: write a global sample grid every N rounds (0: only at the end).
        sample_steps: DDIM steps of those grids.
        client_dp_clip: client-level DP (DP-FedAvg, see ``dpfl.server.clientdp``): L2 bound
            on each site's update; 0 turns it off (record-level DP at the sites stays on).
        client_dp_noise: noise multiplier z of client-level DP (std z * clip / sampled sites).
        client_dp_delta: delta of the client-level guarantee, < 1 / number of sites: checked
            against max(min-train-nodes, min-available-nodes) here and against the sites
            connected before every round (``dpfl.server.rounds.sample``).
        client_dp_epsilon: client-level epsilon budget; no round runs that would exceed it.
        secagg: secure aggregation (SecAgg+, see ``dpfl.server.secagg``): the coordinator
            sees only the sum of the sites' adapters; each site checks its own update
            (finite, |value| <= 8, ``max-update-norm``). Needs min-train-nodes >= 2; not
            combinable with client-level DP.
        secagg_threshold: fraction of the sampled sites whose key shares must survive to
            unmask, in (0.5, 1] (more: safer against collusion, less tolerant of dropouts).
        secagg_max_weight: largest example count a site may weight its update with (> 0);
            keep it near the largest site's count, the aggregate's quantisation error
            (about 4e-6 per value) grows with max-weight / total examples.
        secagg_min_contributions: fewest real (positive-weight, not withheld) updates a
            SecAgg+ sum must hold before it is unmasked (>= 2, and <= min-train-nodes); a
            round with fewer releases nothing (the sites' spend is still on record), since
            a "sum" of one update is that site's update in clear.
    """

    base_model: str = "models/fmnist-base"
    run_dir: str = "runs/federated"
    fraction_train: float = 1.0
    min_train_nodes: int = 1
    min_available_nodes: int = 1
    round_timeout: float = 3600.0
    min_replies: int = 1
    max_update_norm: float = 0.0
    sample_every: int = 1
    sample_steps: int = 25
    client_dp_clip: float = 0.0
    client_dp_noise: float = 1.0
    client_dp_delta: float = 1e-3
    client_dp_epsilon: float = 10.0
    secagg: bool = False
    secagg_threshold: float = 0.67
    secagg_max_weight: float = 10000.0
    secagg_min_contributions: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.secagg:
            self._check_secagg()
        if self.client_dp_clip < 0 or not math.isfinite(self.client_dp_clip):
            raise ConfigError(f"client-dp-clip must be >= 0 (0: off), got {self.client_dp_clip}")
        if self.client_dp_clip > 0:
            if not (self.client_dp_noise > 0 and math.isfinite(self.client_dp_noise)):
                raise ConfigError(f"client-dp-noise must be > 0, got {self.client_dp_noise}")
            if not 0 < self.client_dp_delta < 1:
                raise ConfigError(f"client-dp-delta must be in (0, 1), got {self.client_dp_delta}")
            sites = max(self.min_train_nodes, self.min_available_nodes)
            if self.client_dp_delta * sites >= 1:
                raise ConfigError(f"client-dp-delta={self.client_dp_delta:g} must be < 1 / "
                                  f"number of sites, and this run has at least {sites} "
                                  "(max of min-train-nodes and min-available-nodes); lower it")
            if not (self.client_dp_epsilon > 0 and math.isfinite(self.client_dp_epsilon)):
                raise ConfigError(f"client-dp-epsilon must be > 0, got {self.client_dp_epsilon}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        for key, ok, allowed in (
                ("min-train-nodes", self.min_train_nodes >= 1, ">= 1"),
                ("min-available-nodes", self.min_available_nodes >= 0, ">= 0"),
                ("min-replies", self.min_replies >= 1, ">= 1"),
                ("secagg-min-contributions", self.secagg_min_contributions >= 2, ">= 2"),
                ("round-timeout", 0 < self.round_timeout < math.inf, "a finite number > 0"),
                ("max-update-norm", 0 <= self.max_update_norm < math.inf, ">= 0 (0: no bound)"),
                ("sample-every", self.sample_every >= 0, ">= 0")):
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key.replace('-', '_'))!r} is out of "
                                  f"range: it must be {allowed}")

    def _check_secagg(self) -> None:
        if self.client_dp_clip > 0:
            raise ConfigError(
                f"secagg=true cannot be combined with client-dp-clip={self.client_dp_clip}: "
                "client-level DP clips every site's update on the coordinator, which SecAgg+ "
                "hides from it; set client-dp-clip=0 or secagg=false")
        if self.min_train_nodes < self.secagg_min_contributions:
            raise ConfigError(f"secagg=true needs min-train-nodes >= "
                              f"{self.secagg_min_contributions} (secagg-min-contributions; got "
                              f"{self.min_train_nodes}): a secure sum over one site is its "
                              "update")
        if not 0.5 < self.secagg_threshold <= 1:
            raise ConfigError(f"secagg-threshold must be in (0.5, 1], got {self.secagg_threshold}")
        if not (self.secagg_max_weight > 0 and math.isfinite(self.secagg_max_weight)):
            raise ConfigError(f"secagg-max-weight must be > 0, got {self.secagg_max_weight}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedConfig:
        return _from_mapping(cls, run_config, "run config")

    def plan(self, base_fingerprint: str) -> RoundPlan:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(RoundPlan)}
        return RoundPlan(**{**values, "base_fingerprint": base_fingerprint})

    @property
    def update_bound(self) -> float:
        return self.max_update_norm if self.max_update_norm > 0 else math.inf


@dataclass(frozen=True)
class SiteConfig:
    """A site's own settings (Flower node config), which the coordinator cannot change.

    Attributes:
        site_id: the site's name in the ledger.
        data: its images (image folder, .npz, IDX file, or fmnist:... for demos).
        base_model: local copy of the public base model (verified by fingerprint).
        state_dir: where the accountant, cached latents and adapters live; must persist.
        epsilon_budget: the most epsilon this site will ever spend (> 0).
        delta: the site's delta: a number (0 < delta < 1/n, checked against its data size;
            default 1e-5) or ``"auto"``: 1 / (n ln n) of the site's n private examples
            (DPImageBench's protocol, :mod:`dpfl.shared.privacy.choices`; 2.1e-6 for 45,000,
            9.1e-5 for 1,500). The ledger stores the δ of its first round and never changes
            it: with ``auto``, a silo that later changes size is refused until the stored δ
            is given as a number.
        accountant: one of :data:`ACCOUNTANTS` (``prv``, Gopi et al. 2021: the tighter
            bound, less noise for the same ε; ``rdp``, Mironov 2017), or ``None`` (default,
            the key left out): the state directory's ledger keeps its own kind, and a new
            ledger uses ``prv`` (``dpfl.shared.privacy.choices.DEFAULT_ACCOUNTANT``). A kind
            that differs from an existing ledger's is refused.
        max_physical_batch: memory cap per forward pass (logical batches are split).
        secure_mode: DP noise and Poisson sampling from the OS CSPRNG (Opacus' secure-mode
            construction; ``dpfl.shared.privacy.securenoise``). Default True: a SuperNode
            started with a hand-written node config is secure; a simulation may pass False.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        label_map: path of a JSON label map {"silo class": "base class"} for silo classes
            not named exactly after a base class ("": names only; see
            :mod:`dpfl.shared.data.labels`).
        image_policy: how images not of the base model's size are fitted to it, one of
            :data:`~dpfl.shared.defaults.IMAGE_POLICIES` (default ``refuse``; see
            :func:`dpfl.shared.data.readers.fit_to_model`). A site setting: the coordinator
            never chooses how a site's images are changed.
    """

    site_id: str = "site"
    data: str = ""
    base_model: str = "models/fmnist-base"
    state_dir: str = "state"
    epsilon_budget: float = 10.0
    delta: float | str = dataclasses.field(default=1e-5, metadata={"parse": parse_delta})
    accountant: str | None = None
    max_physical_batch: int = 256
    secure_mode: bool = True
    device: str = "auto"
    label_map: str = ""
    image_policy: str = DEFAULT_IMAGE_POLICY

    def __post_init__(self) -> None:
        where = f"site {self.site_id}"
        if self.image_policy not in IMAGE_POLICIES:
            raise ConfigError(f"{where}: image-policy must be one of {list(IMAGE_POLICIES)}, "
                              f"got {self.image_policy!r}")
        if not self.data:
            raise ConfigError(f"{where}: node config 'data' (path to images) is required")
        if not self.epsilon_budget > 0:
            raise ConfigError(f"{where}: epsilon-budget must be > 0, got {self.epsilon_budget}")
        try:
            parse_delta(self.delta)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if self.accountant is not None and self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"{where}: accountant must be one of {list(ACCOUNTANTS)}, got "
                              f"{self.accountant!r}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        return _from_mapping(cls, node_config, "node config")
