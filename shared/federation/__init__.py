"""What a federation agrees on, without Flower: the run and site configuration
(``config``), the round's wire protocol (``protocol``: record and metric names, the site
report, the one update check) and the coordinator's privacy ledger (``ledger``).

Never imports flwr or torch: the Flower apps in ``dpfl.client.app`` and
``dpfl.server.app`` translate between Flower messages and these plain objects.
"""
