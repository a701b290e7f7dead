"""The latent diffusion model: diffusers AutoencoderKL + class-conditional UNet2DModel +
scheduler (``models``), the diffusion loss and DDIM sampling (``diffusion``, ``sampling``),
LoRA adapters through peft (``lora``) and public pretraining (``pretrain``).

May import torch, diffusers and peft; never flwr or opacus.
"""
