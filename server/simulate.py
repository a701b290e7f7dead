"""Simulation mode: N virtual sites on one machine with Flower's simulation engine (Ray).

The private data set is split into silos with :mod:`dpfl.shared.data.partition`, each written
to ``run_dir/sites/site-<i>/silo.npz`` beside the site's own state directory (accountant,
cached latents). Per-site resources (CPUs, fractional GPUs) bound how many sites train at
once, and so the memory used, whatever N is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpfl.shared.data.partition import partition
from dpfl.shared.data.readers import write_npz
from dpfl.shared.data.sources import load_source, model_card
from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import FedConfig, SiteConfig
from dpfl.shared.io import atomic_write_json
from dpfl.shared.report.build import try_write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationSetup:
    """How to split the private data and run the virtual sites.

    Attributes:
        data: private data source to split (e.g. ``fmnist:private``).
        num_sites: virtual sites N (>= 1).
        scheme: ``iid``, ``class`` or ``dirichlet``.
        alpha: Dirichlet concentration (smaller is more skewed).
        max_examples: keep at most this many examples in total (0: all), for quick runs.
        epsilon_budget, delta: every site's own budget and delta.
        cpus_per_site, gpus_per_site: Ray resources per virtual site (fractional GPUs allowed).
        seed: seed of the split.
    """

    data: str = "fmnist:private"
    num_sites: int = 3
    scheme: str = "dirichlet"
    alpha: float = 0.5
    max_examples: int = 0
    epsilon_budget: float = 10.0
    delta: float = 1e-5
    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sites < 1 or self.max_examples < 0:
            raise ConfigError("num_sites must be >= 1 and max_examples >= 0")
        if self.cpus_per_site <= 0 or self.gpus_per_site < 0:
            raise ConfigError("cpus_per_site must be > 0 and gpus_per_site >= 0")


def prepare_sites(setup: SimulationSetup, cfg: FedConfig) -> list[SiteConfig]:
    """Split the data into silos on disk and return one SiteConfig per virtual site."""
    data = load_source(setup.data, base_card=model_card(cfg.base_model))  # its own split
    rng = np.random.default_rng(setup.seed)
    if setup.max_examples and setup.max_examples < len(data):
        data = data.subset(np.sort(rng.choice(len(data), setup.max_examples, replace=False)))
    parts = partition(data.labels, setup.num_sites, setup.scheme, seed=setup.seed,
                      alpha=setup.alpha)
    sites = []
    for i, idx in enumerate(parts):
        folder = Path(cfg.run_dir) / "sites" / f"site-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        silo = folder / "silo.npz"
        if not silo.exists():
            write_npz(silo, data.subset(idx, source=f"{setup.data} site {i}"))
        counts = np.bincount(data.labels[idx], minlength=len(data.class_names)).tolist()
        log.info("site-%d: %d images, per class %s", i, len(idx), counts)
        sites.append(SiteConfig(site_id=f"site-{i}", data=str(silo),
                                base_model=cfg.base_model, state_dir=str(folder / "state"),
                                epsilon_budget=setup.epsilon_budget, delta=setup.delta,
                                max_physical_batch=256, device="auto",
                                # virtual sites on one machine: research, not a real
                                # deployment, so torch's seeded-from-entropy PRNG (faster)
                                secure_mode=False))
    return sites


def simulate(cfg: FedConfig, setup: SimulationSetup) -> None:
    """Split the data and run the federation with Flower's simulation engine, then render
    the run's report with every site's local loss (all site state is on this machine)."""
    sites = prepare_sites(setup, cfg)
    run_sites(cfg, sites, setup.cpus_per_site, setup.gpus_per_site)
    try_write_report(cfg.run_dir, site_dirs={s.site_id: s.state_dir for s in sites})


def run_sites(cfg: FedConfig, sites: list[SiteConfig], cpus_per_site: float = 1.0,
              gpus_per_site: float = 0.0, mods: list | None = None) -> None:
    """Run ``cfg`` over the given virtual sites (blocks until the ServerApp returns)."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from dpfl.client.app import make_client_app
    from dpfl.server.app import make_server_app

    backend = {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
               "init_args": {"include_dashboard": False, "log_to_driver": True}}
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(sites, mods),
                   num_supernodes=len(sites), backend_config=backend)


def audit_sites(cfg: FedConfig, setup: SimulationSetup, audit: Any, draws: int = 8,
                progress: bool = False) -> list[dict[str, Any]]:
    """The empirical privacy audit (:mod:`dpfl.client.audit`) of every simulated site's
    whole planned mechanism: all rounds' DP-SGD steps as one run (the adversary sees every
    noisy step; other sites' updates are fixed from a site's point of view), with the DP
    settings the site would use (:meth:`dpfl.client.site.Site.dp_config`, for the half of
    its silo the audit trains on). Each site is audited on its own copy of its silo under a
    temporary ledger: no site's budget or state directory is touched. Writes
    ``RUN_DIR/audit/site-<i>/`` and ``RUN_DIR/audit/sites.json``; returns its rows."""
    from dpfl.client.audit import AuditJob, run_audit
    from dpfl.client.site import Site
    from dpfl.shared.ldm.lora import spec_for_plan

    plan = cfg.plan(str(model_card(cfg.base_model).get("fingerprint", "")))
    rows = []
    for site in prepare_sites(setup, cfg):
        members = len(load_source(site.data)) // 2  # what run_audit trains on
        with tempfile.TemporaryDirectory(prefix="dpfl-audit-site-") as tmp:
            dp = Site(dataclasses.replace(site, state_dir=tmp)).dp_config(plan, members)
        dp = dataclasses.replace(dp, epochs=plan.num_rounds * plan.local_epochs,
                                 seed=setup.seed, device=site.device)
        job = AuditJob(data=site.data, model=cfg.base_model, draws=draws,
                       run_dir=str(Path(cfg.run_dir) / "audit" / site.site_id))
        rec = run_audit(job, spec_for_plan(plan), dp, audit, progress=progress)
        w = rec["whitebox"]
        rows.append({"site": site.site_id, "examples": w["examples"], "steps": w["steps"],
                     "claimed_epsilon": w["claimed_epsilon"], "delta": w["delta"],
                     "epsilon_lower_bound": w["epsilon_lower_bound"],
                     "epsilon_at_measured_noise": w["noise_check"]["epsilon_at_sigma_upper"],
                     "mia_tpr_at_1pct_fpr": rec["mia"]["tpr_at_fpr"]["0.01"],
                     "seconds": rec["seconds"], "note": rec["note"]})
    atomic_write_json(Path(cfg.run_dir) / "audit" / "sites.json", rows)
    return rows
