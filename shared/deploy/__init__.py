"""Helpers for a real deployment: up-front checks of TLS certificates and node keys
(``certs``) and starting the pinned flwr executables (``flwrproc``).

Never imports flwr (executables are started as processes) or torch.
"""
