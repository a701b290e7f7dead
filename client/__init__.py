"""What a hospital runs: ``dpfl-client`` (``cli``: data tools, central DP training with
``train`` and ``train-full``, ``join`` a federation), one round at a site in plain Python
(``site``), its side of SecAgg+ (``secagg``), the thin Flower ClientApp (``app``) and the
SuperNode of a real deployment (``deploy``).

Only ``app``, ``secagg`` and ``deploy`` touch Flower; training code never does.
"""
