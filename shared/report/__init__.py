"""One self-contained report per run directory (``build``), with the sections of a
central run (``central``) and of a federated run (``fed``), rendered to Markdown and HTML
(``render``). Reads run directories only; never trains.

Never imports flwr.
"""
