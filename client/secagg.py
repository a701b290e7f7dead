"""A site's side of secure aggregation (SecAgg+; Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020), with Flower's ``secaggplus_mod``.

Under SecAgg+ the coordinator only ever sees the *masked sum* of the sites' adapters, so it
can no longer check a single update. What it used to check, the site checks on its own
update before masking it, with the protocol's one update check
(:func:`dpfl.shared.federation.protocol.check_update`): keys and shapes, finite values, every
value within the range SecAgg+ quantises without clipping, and the distance from the global
adapter (``max-update-norm`` when the run sets it). An update that fails is *withheld*: the
site still takes part in the protocol with weight 0 and a zero vector (so the other sites'
masks cancel and its privacy spend, already incurred, reaches the coordinator's ledger) and
says why in its ``site`` record.

The protocol messages (``secaggplus_configs``) are Flower's legacy ``FitIns``/``FitRes``
records; :func:`secure_train` translates them to and from :meth:`Site.train_round`.
:func:`secagg_mod` passes the plain Message-API rounds through untouched, so one ClientApp
serves both kinds of run and the coordinator's run config decides.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from dpfl.client.site import Site
from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import RoundPlan
from dpfl.shared.federation.protocol import (
    METRICS,
    NUM_EXAMPLES,
    SECAGG_ADAPTER_KEYS,
    SECAGG_CLIP_RANGE,
    SECAGG_MAX_NORM,
    SECAGG_MAX_WEIGHT,
    SITE,
    SITE_ID,
    WITHHELD,
    check_update,
)
from dpfl.shared.ldm.lora import travelling_keys

FITINS = "fitins.parameters"  # the legacy record a SecAgg+ training message carries


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; any other message passes through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _fitres(update: list[np.ndarray], weight: int, metrics: dict[str, Any], site_record: dict
            ) -> RecordDict:
    """The legacy FitRes records ``secaggplus_mod`` masks (arrays, weight), plus the plain
    privacy metrics and site record, which the coordinator reads before unmasking."""
    content = RecordDict({
        "fitres.parameters": compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(update), keep_input=False),
        "fitres.num_examples": MetricRecord({"num_examples": weight}),
        "fitres.metrics": ConfigRecord({}),
        "fitres.status": ConfigRecord({"code": 0, "message": "ok"}),
        METRICS: MetricRecord(metrics),
        SITE: ConfigRecord(site_record)})
    return content


def secure_train(site: Site, msg: Message) -> Message:
    """One round at ``site`` under SecAgg+: train, check the own update, reply for masking."""
    config: dict[str, Any] = dict(msg.content.config_records["fitins.config"])
    keys = str(config.pop(SECAGG_ADAPTER_KEYS)).split("\n")
    max_weight = float(config.pop(SECAGG_MAX_WEIGHT))
    clip_range = float(config.pop(SECAGG_CLIP_RANGE))
    max_norm = float(config.pop(SECAGG_MAX_NORM)) or math.inf
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        msg.content.array_records[FITINS], keep_input=True))
    if len(arrays) != len(keys):
        raise ConfigError(f"the coordinator sent {len(arrays)} tensors for {len(keys)} keys")
    plan = RoundPlan.from_record(config)
    adapter = dict(zip(keys, arrays))
    n = len(site.local_silo(site.base_model(plan.base_fingerprint))[0])
    if n > max_weight:  # checked before training: nothing is spent on a refused round
        raise ConfigError(f"site {site.cfg.site_id} holds {n} examples, more than the run's "
                          f"secagg-max-weight {max_weight:g}; raise secagg-max-weight to at "
                          "least the largest site's example count")
    update, metrics = site.train_round(plan, adapter)
    record: dict[str, Any] = {SITE_ID: site.cfg.site_id}
    reference = {k: adapter[k] for k in travelling_keys(adapter, plan.ffa)}
    reason = None if update is None else check_update(
        update, reference, max_update_norm=max_norm, same_dtype=False, value_range=clip_range)
    if update is None or reason is not None:
        if reason is not None:
            record[WITHHELD] = reason
        vector, weight = [np.zeros_like(v) for v in reference.values()], 0
    else:
        vector, weight = [update[k] for k in reference], int(metrics[NUM_EXAMPLES])
    return Message(content=_fitres(vector, weight, metrics, record), reply_to=msg)
