"""Flower ClientApp of a site: translates messages to :class:`dpfl.client.site.Site` calls.

In a real deployment the site's settings come from the SuperNode's node config
(``--node-config "site-id=... data=... state-dir=... epsilon-budget=..."``). In simulation,
:func:`make_client_app` is given one :class:`SiteConfig` per partition id.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Sequence

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dpfl.client.secagg import FITINS, secagg_mod, secure_train
from dpfl.client.site import RoundTag, Site
from dpfl.shared.defaults import LOG_FORMAT
from dpfl.shared.federation.config import RoundPlan, SiteConfig
from dpfl.shared.federation.protocol import ARRAYS, CONFIG, METRICS, SERVER_ROUND, SITE, SITE_ID

FITINS_CONFIG = "fitins.config"  # the plan (and server round) of a SecAgg+ training message
_CACHE_SIZE = 4  # sites kept warm per process: memory is bounded by concurrency, not by N


def make_client_app(sites: Sequence[SiteConfig] | None = None, mods: list | None = None,
                    inner_mods: list | None = None) -> ClientApp:
    """A ClientApp serving ``sites`` by partition id (simulation), or the node config's site.

    ``mods`` are Flower client mods (middleware seeing every message in and out, i.e. what
    leaves the site). Training messages also pass :func:`~dpfl.client.secagg.secagg_mod`
    (SecAgg+ when the coordinator runs it) and then ``inner_mods``, which see a SecAgg+
    reply before it is masked.
    """
    app = ClientApp(mods=mods or [])
    cache: OrderedDict[str, Site] = OrderedDict()

    def site_for(context: Context) -> Site:
        if sites is not None:
            cfg = sites[int(context.node_config["partition-id"])]
        else:
            site_log()
            cfg = SiteConfig.from_node_config(context.node_config)
        site = cache.pop(cfg.site_id, None) or Site(cfg)
        cache[cfg.site_id] = site
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
        return site

    @app.train(mods=[secagg_mod, *(inner_mods or [])])
    def train(msg: Message, context: Context) -> Message:
        site = site_for(context)
        site.round_tag = round_tag(msg)
        if FITINS in msg.content.array_records:  # a SecAgg+ round (legacy FitIns records)
            return secure_train(site, msg)
        plan = RoundPlan.from_record(dict(msg.content.config_records[CONFIG]))
        adapter = {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}
        update, metrics = site.train_round(plan, adapter)
        content = RecordDict({METRICS: MetricRecord(metrics),
                              SITE: ConfigRecord({SITE_ID: site.cfg.site_id})})
        if update is not None:
            content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in update.items()})
        return Message(content=content, reply_to=msg)

    return app


def site_log() -> None:
    """dpfl's log lines (INFO and up) of a deployed site's ClientApp process to its stderr,
    which the SuperNode passes on to ``dpfl-client join``'s output. Without this, only
    warnings would show (through the root handler Opacus installs at import) and every
    per-round line would be lost; dpfl's lines stop at this handler, so none shows twice.
    Set up once per process."""
    root = logging.getLogger("dpfl")
    if any(getattr(h, "dpfl_site", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.dpfl_site = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def round_tag(msg: Message) -> RoundTag:
    """The run and server round a training message belongs to (for the site's log)."""
    records = msg.content.config_records
    config = records.get(CONFIG) or records.get(FITINS_CONFIG) or {}
    rnd = config.get(SERVER_ROUND)
    return RoundTag(run_id=msg.metadata.run_id,
                    server_round=int(rnd) if isinstance(rnd, (int, float)) else None)


app = make_client_app()
