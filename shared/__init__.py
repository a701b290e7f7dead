"""Code used by both sides of a dpfl federation.

Models (latent diffusion built from diffusers parts), data readers and partitioning,
LoRA, DP training and privacy accounting, export. Nothing in here imports ``flwr``.
"""
