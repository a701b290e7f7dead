"""Everything a privacy reviewer must read: DP-SGD on the UNet with Opacus and DPDM's
noise multiplicity (``dpsgd``, ``multiplicity``), DP-SGD on every UNet parameter (``full``),
the durable per-site accountant (``accountant``), noise from the OS CSPRNG
(``securenoise``) and the one privacy-guarantee schema, ``privacy.json`` (``guarantee``).

May import torch and opacus; never flwr.
"""
