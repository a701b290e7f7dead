"""DP-SGD on every parameter of the UNet: the from-scratch baseline (DPDM) and DP full
fine-tuning, next to DP-LoRA (:func:`dpfl.shared.privacy.dpsgd.train_lora`).

DPDM (Dockhorn, Cao, Vahdat, Kreis, "Differentially Private Diffusion Models", TMLR 2023)
trains the whole denoiser from random initialisation with DP-SGD, no public data at all.
:func:`train_full` on a UNet from :func:`dpfl.shared.ldm.models.fresh_unet` is that baseline,
with one protocol difference: DPDM works in pixel space, while here the UNet denoises the
latents of the base model's **public** autoencoder. The autoencoder saw public data; the
UNet saw none. (So this baseline isolates the value of a publicly pretrained *denoiser*,
and of training only adapters, not of the public autoencoder.) On the base model's own UNet
:func:`train_full` is DP full fine-tuning, the setting DP-LDM compares adapters against.

The DP-SGD is the same code path as DP-LoRA (:func:`dpfl.shared.privacy.dpsgd.dp_sgd`): Poisson
sampling and Gaussian noise from OS entropy, K (timestep, noise) draws averaged per example
before the single per-example clip, the durable ledger committed before any step, and the
checks that Opacus' loader and Opacus' own count agree with the committed steps. Every
layer of diffusers' ``UNet2DModel`` has an Opacus grad sampler (Conv2d, Linear, GroupNorm,
Embedding; attention is Linear + GroupNorm), so the per-sample gradients come from hooks
mode with no functorch fallback. Full training reaches most convs behind attention blocks,
so every conv input is made contiguous (the Opacus channels_last trap; see
:mod:`dpfl.shared.ldm.lora`).

Cost: Opacus keeps one gradient per row and parameter, about ``max_physical_batch * K *
parameters * 4`` bytes, then clips and noises all of them: the fmnist UNet has 4.6M
parameters against 31k for DP-LoRA's default (attention, rank 4, class embedding), and a
DP step costs several times a DP-LoRA step (``bench/bench_dp_step.py --mode full``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from diffusers.training_utils import EMAModel

from dpfl.shared.errors import ConfigError
from dpfl.shared.ldm.lora import make_conv_inputs_contiguous, trainable_count
from dpfl.shared.ldm.models import LatentDiffusion, resolve_device
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.dpsgd import DPConfig, DPRunStats, check_silo, dp_sgd

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FullTrainResult(DPRunStats):
    """What :func:`train_full` returns: ``unet_state``, the trained UNet's state dict (CPU,
    contiguous tensors, safetensors-able; the EMA weights when EMA is on), and the
    :class:`~dpfl.shared.privacy.dpsgd.DPRunStats` fields (σ, q, steps, ε, δ, history...)."""

    unet_state: dict[str, torch.Tensor]


def full_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``unet`` with every parameter trainable and every conv's input made
    contiguous (Opacus' per-sample conv gradients are wrong on channels_last inputs)."""
    model = copy.deepcopy(unet).requires_grad_(True)
    make_conv_inputs_contiguous(model)
    return model


def train_full(ldm: LatentDiffusion, latents: torch.Tensor, labels: torch.Tensor, dp: DPConfig,
               accountant: PersistentAccountant, ema_decay: float = 0.999,
               progress: bool = True) -> FullTrainResult:
    """DP-SGD on every parameter of (a deep copy of) ``ldm.unet``; ``ldm`` is not modified.

    Commits the call's steps to ``accountant`` (durably) before training; raises
    :class:`~dpfl.shared.errors.BudgetExhausted` if they would exceed its budget.

    Args:
        ldm: its UNet is the starting point (a :func:`~dpfl.shared.ldm.models.fresh_unet` for
            the from-scratch baseline); its scheduler and null class define the loss.
        latents, labels: the silo, encoded by the public autoencoder
            (:func:`dpfl.shared.data.encode.encode_silo`).
        dp: DP-SGD settings (σ calibration, C, K, batch sizes, lr, epochs...).
        accountant: the client's durable ledger.
        ema_decay: decay of an exponential moving average of the weights (with warm-up, as
            in public pretraining; DPDM samples from an EMA too). The EMA weights are
            returned; averaging DP iterates is post-processing and costs no privacy. 0
            disables it; in [0, 1), default 0.999.
        progress: show a progress bar.
    """
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) \
            or not 0 <= ema_decay < 1:
        raise ConfigError(f"ema_decay must be a number in [0, 1) (0 disables the EMA), got "
                          f"{ema_decay!r}")
    check_silo(latents, labels, dp)
    model = full_unet(ldm.unet).to(resolve_device(dp.device))
    rows, n_params = dp.max_physical_batch * dp.noise_multiplicity, trainable_count(model)
    log.info("full DP training: per-sample gradients of up to %d rows x %d parameters take "
             "about %.2f GiB (lower max_physical_batch if memory runs out)", rows, n_params,
             rows * n_params * 4 / 2**30)
    ema = EMAModel(model.parameters(), decay=ema_decay, use_ema_warmup=True) \
        if ema_decay > 0 else None
    after_step = (lambda: ema.step(model.parameters())) if ema is not None else None
    stats = dp_sgd(ldm, model, latents, labels, dp, accountant, progress, "DP-full", after_step)
    if ema is not None:
        ema.copy_to(model.parameters())
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return FullTrainResult(unet_state=state, **stats)
