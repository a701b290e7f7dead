"""Everything a privacy reviewer must read: DP-SGD on the UNet with Opacus and DPDM's
noise multiplicity (``dpsgd``, ``multiplicity``), DP-SGD on every UNet parameter (``full``),
the durable per-site accountant (``accountant``; its names, default and δ = "auto", torch-free:
``choices``), noise from the OS CSPRNG
(``securenoise``), the one privacy-guarantee schema, ``privacy.json`` (``guarantee``), and
the empirical audit of all of it: one-run white-box canaries (``audit``), loss-threshold
membership inference (``mia``) and their record, ``audit/audit.json`` (``auditrecord``).

May import torch and opacus; never flwr.
"""
