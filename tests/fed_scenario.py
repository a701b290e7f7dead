"""Runs one simulated federation in its own process (tests start it with subprocess).

argv[1] is a JSON object: ``cfg`` (FedConfig fields), ``sites`` (SiteConfig fields),
``spy`` (a JSONL file where a client mod records every reply that leaves a site) and
optionally ``corrupt`` ([site-id, round]: replace that reply's first tensor with NaN).
"""

import json
import sys

import numpy as np
from flwr.app import Array

from dpfl.server.simulate import run_sites
from dpfl.shared.federation.config import FedConfig, SiteConfig


def main() -> None:
    args = json.loads(sys.argv[1])
    cfg = FedConfig(**args["cfg"])
    sites = [SiteConfig(**s) for s in args["sites"]]
    corrupt = args.get("corrupt")

    def spy(msg, context, call_next):
        reply = call_next(msg, context)
        content = reply.content
        site = content["site"]["site-id"]
        rnd = int(msg.content["config"]["server-round"])
        arrays = content.array_records.get("arrays")
        if corrupt and arrays is not None and [site, rnd] == corrupt:
            key = sorted(arrays.keys())[0]
            arrays[key] = Array(np.full(arrays[key].numpy().shape, np.nan, np.float32))
        with open(args["spy"], "a") as f:
            f.write(json.dumps({
                "site": site, "round": rnd,
                "array_records": sorted(content.array_records.keys()),
                "array_keys": sorted(arrays.keys()) if arrays is not None else [],
                "metric_records": {k: dict(v) for k, v in content.metric_records.items()},
                "config_records": {k: dict(v) for k, v in content.config_records.items()},
            }) + "\n")
        return reply

    run_sites(cfg, sites, cpus_per_site=1, mods=[spy])


if __name__ == "__main__":
    main()
