"""Runs one simulated SecAgg+ federation in its own process (tests start it with subprocess).

argv[1] is a JSON object: ``cfg`` (FedConfig fields), ``sites`` (SiteConfig fields), ``spy``
(a JSONL file where an outer client mod records every reply as it leaves a site) and
``plain`` (a folder where an inner mod, between SecAgg+ and the site, saves the plaintext
update and weight the site hands to masking, and the global adapter it received: test-only,
so the masked sum can be compared with the plain weighted mean); optionally ``fail``
([site-id, round, stage]: that site raises on receiving that SecAgg+ stage, a dropout).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from dpfl.shared.federation.config import FedConfig, SiteConfig


def _arrays(record) -> list[np.ndarray]:
    return parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))


def main() -> None:
    args = json.loads(sys.argv[1])
    cfg = FedConfig(**args["cfg"])
    sites = [SiteConfig(**s) for s in args["sites"]]
    plain_dir = Path(args["plain"])

    def spy(msg, context, call_next):
        stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        site = sites[int(context.node_config["partition-id"])].site_id
        if [site, int(msg.metadata.group_id), stage] == args.get("fail"):
            raise RuntimeError(f"{site} drops out in stage {stage}")
        reply = call_next(msg, context)
        content = reply.content
        masked = content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.MASKED_PARAMETERS)
        with open(args["spy"], "a") as f:
            f.write(json.dumps({
                "stage": stage, "error": reply.has_error(),
                "array_records": {k: len(v) for k, v in content.array_records.items()},
                "metric_records": {k: dict(v) for k, v in content.metric_records.items()},
                "config_records": {k: sorted(v) for k, v in content.config_records.items()},
                "site": dict(content.config_records.get("site", {})),
                "masked": len(masked) if masked else 0,
            }) + "\n")
        return reply

    def plain(msg, context, call_next):
        reply = call_next(msg, context)
        config = msg.content.config_records["fitins.config"]
        rnd, site = int(config["server-round"]), reply.content["site"]["site-id"]
        keys = str(config["dpfl-adapter-keys"]).split("\n")
        sent = dict(zip(keys, _arrays(msg.content.array_records["fitins.parameters"])))
        vector = _arrays(reply.content.array_records["fitres.parameters"])
        weight = reply.content.metric_records["fitres.num_examples"]["num_examples"]
        np.savez(plain_dir / f"{site}-r{rnd}.npz", weight=weight,
                 **{f"global:{k}": v for k, v in sent.items()},
                 **{f"vector:{i:04d}": v for i, v in enumerate(vector)})
        return reply

    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from dpfl.client.app import make_client_app
    from dpfl.server.app import make_server_app

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"include_dashboard": False, "log_to_driver": True}}
    run_simulation(server_app=make_server_app(cfg),
                   client_app=make_client_app(sites, mods=[spy], inner_mods=[plain]),
                   num_supernodes=len(sites), backend_config=backend)


if __name__ == "__main__":
    main()
