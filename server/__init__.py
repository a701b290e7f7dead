"""What the coordinator runs: ``dpfl-server`` (``cli``), the round loop (``rounds``), the
validating FedAvg strategy (``strategy``), SecAgg+ rounds (``secagg``), client-level DP
(``clientdp``), the run lock (``runlock``), simulation on Ray (``simulate``), the SuperLink of
a real deployment and its PKI (``deploy``, ``pki``), the privacy-utility experiments
(``experiment``) and the thin Flower ServerApp (``app``).

The coordinator never sees images, latents or per-example gradients: only adapter updates
and the sites' privacy reports (see ``dpfl.shared.federation.protocol``).
"""
