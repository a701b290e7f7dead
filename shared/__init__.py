"""Code used by both sides of a dpfl federation, one sub-package per domain.

- ``ldm``: the latent diffusion model (diffusers parts), diffusion loss and sampling,
  LoRA (peft), public pretraining.
- ``privacy``: DP-SGD (Opacus) with noise multiplicity, DP on the whole UNet, the durable
  accountant, secure noise, the privacy guarantee (``privacy.json``). A privacy reviewer
  reads this folder.
- ``data``: image readers, Fashion-MNIST, data-source names, partitioning into silos,
  encoding a silo into latents.
- ``federation``: run and site configuration, the round's wire protocol, the privacy ledger.
- ``eval``: downstream accuracy, Fréchet distances, precision/recall.
- ``report``: run reports (Markdown and HTML) rendered from run directories.
- ``export``: ONNX export of a base model plus adapter (torch).
- ``edge``: the torch-free on-device sampler, its CLI and image grids.
- ``deploy``: TLS certificate checks and flwr process helpers for real deployments.
- ``errors``, ``io``, ``rundir``: exceptions, durable writes, run directories;
  ``defaults`` (a config field's default, standard library only) and ``cli`` (what the three
  command lines share: lazily built click commands, one error exit).

Nothing in ``dpfl.shared`` imports ``flwr`` (``tests/test_architecture.py`` enforces the
import rules each sub-package states).
"""
