"""Public (non-private) pretraining of the base LDM: autoencoder first, then the UNet.

Only public data may be passed here. The run is resumable: a checkpoint (written
atomically) holds the stage, step, weights, optimiser and RNG state, and a restarted
run continues from it. Latents are normalised per channel with statistics measured on
the public data after the autoencoder is trained (stored as ``latents_mean`` /
``latents_std`` in the VAE config).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dpfl.shared.data.readers import (
    DEFAULT_IMAGE_POLICY,
    IMAGE_POLICIES,
    ImageSet,
    fit_to_model,
    to_model_tensor,
)
from dpfl.shared.errors import ConfigError, StateError
from dpfl.shared.io import atomic_write_bytes
from dpfl.shared.ldm.diffusion import example_losses
from dpfl.shared.ldm.models import PRESETS, LatentDiffusion, build_ldm, resolve_device, save_ldm
from dpfl.shared.ldm.sampling import class_grid
from dpfl.shared.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Public pretraining settings.

    Attributes:
        preset: model size preset (``tiny`` for tests, ``fmnist`` for 28x28 grayscale).
        ae_steps: autoencoder optimisation steps (>= 0).
        unet_steps: UNet optimisation steps (>= 0).
        batch_size: examples per step (>= 1).
        ae_lr, unet_lr: AdamW learning rates (> 0), cosine decay after 100 warm-up steps.
        kl_weight: weight of the per-latent-element KL term in the autoencoder loss (>= 0);
            larger values give smoother latents that the diffusion model learns more easily.
        edge_weight: weight of an edge-aware term in the autoencoder loss (>= 0, default 0:
            off): the L1 distance between the horizontal and vertical pixel differences of
            the reconstruction and of the input, the gradient difference loss of Mathieu et
            al. ("Deep multi-scale video prediction beyond mean square error", ICLR 2016);
            it rewards thin structures (straps, soles) that a plain L1 term blurs.
        cond_drop: probability of training with the null class, for classifier-free
            guidance (0 <= p < 1).
        ema_decay: decay of the UNet's exponential moving average (0 disables EMA).
        seed: seed of initialisation and batch sampling.
        checkpoint_every: steps between resumable checkpoints.
        log_every: steps between JSONL metric lines.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        image_policy: how images not of the preset's size are fitted to it, one of
            ``IMAGE_POLICIES`` (default ``refuse``;
            :func:`dpfl.shared.data.readers.fit_to_model`); what it did is in the model card.
    """

    preset: str = "fmnist"
    ae_steps: int = 3000
    unet_steps: int = 20000
    batch_size: int = 128
    ae_lr: float = 1e-3
    unet_lr: float = 5e-4
    kl_weight: float = 1e-4
    edge_weight: float = 0.0
    cond_drop: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    device: str = "auto"
    image_policy: str = DEFAULT_IMAGE_POLICY

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.image_policy not in IMAGE_POLICIES:
            raise ConfigError(f"image_policy must be one of {list(IMAGE_POLICIES)}, got "
                              f"{self.image_policy!r}")
        for name in ("ae_steps", "unet_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.ae_lr > 0 and self.unet_lr > 0):
            raise ConfigError(f"learning rates must be > 0, got {self.ae_lr}, {self.unet_lr}")
        if not 0 <= self.cond_drop < 1:
            raise ConfigError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if not 0 <= self.ema_decay < 1 or self.kl_weight < 0 or self.edge_weight < 0:
            raise ConfigError(f"ema_decay must be in [0, 1), kl_weight and edge_weight >= 0; got "
                              f"{self.ema_decay}, {self.kl_weight}, {self.edge_weight}")


class _Checkpoint:
    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise StateError(f"checkpoint {self.path} is unreadable ({exc}); delete it to "
                             "start over") from exc

    def save(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.path, buf.getvalue())


def _resume(state: dict[str, Any], stage: str, opt: torch.optim.Optimizer, sched: Any,
            gen: torch.Generator) -> int:
    """Restore a checkpoint of ``stage`` into the optimiser, schedule and generator; returns
    the step to continue from (0: the checkpoint is of another stage, or there is none)."""
    if state.get("stage") != stage:
        return 0
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    return state["step"]


def _batches(n: int, batch_size: int, gen: torch.Generator):
    while True:
        yield torch.randint(0, n, (batch_size,), generator=gen)


def edge_l1(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the pixel differences (along width and height) of ``rec``
    and ``x``: the gradient difference loss (Mathieu et al., ICLR 2016)."""
    return ((torch.diff(rec, dim=-1) - torch.diff(x, dim=-1)).abs().mean()
            + (torch.diff(rec, dim=-2) - torch.diff(x, dim=-2)).abs().mean()) / 2


def _train_autoencoder(ldm: LatentDiffusion, x: torch.Tensor, cfg: PretrainConfig,
                       ckpt: _Checkpoint, state: dict[str, Any], rd: RunDir,
                       dev: torch.device) -> None:
    vae = ldm.vae.to(dev).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 100, max(cfg.ae_steps, 1))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start = _resume(state, "ae", opt, sched, gen)
    batches = _batches(len(x), cfg.batch_size, gen)
    bar = tqdm(range(start, cfg.ae_steps), desc="autoencoder", initial=start, total=cfg.ae_steps)
    t0 = time.time()
    for step in bar:
        xb = x[next(batches)].to(dev)
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = (rec - xb).abs().mean()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + cfg.kl_weight * kl
        if cfg.edge_weight > 0:
            loss = loss + cfg.edge_weight * edge_l1(rec, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.ae_steps:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
            rd.log(stage="ae", step=step + 1, rec_l1=rec_loss.item(), kl=kl.item(),
                   lr=sched.get_last_lr()[0], seconds=round(time.time() - t0, 2))
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.ae_steps:
            ckpt.save({"stage": "ae", "step": step + 1, "vae": vae.state_dict(),
                       "opt": opt.state_dict(), "sched": sched.state_dict(),
                       "gen": gen.get_state(), "config": dataclasses.asdict(cfg)})
    vae.eval().requires_grad_(False)


def _set_latent_stats(ldm: LatentDiffusion, x: torch.Tensor
                      ) -> tuple[dict[str, list[float]], torch.Tensor]:
    """Measure per-channel latent mean/std on public data and store them in the VAE config;
    returns them and the normalised latents of ``x`` (what ``ldm.encode(x)`` now gives)."""
    ldm.vae.register_to_config(latents_mean=None, latents_std=None, scaling_factor=1.0)
    raw = ldm.encode(x)
    mean = raw.mean(dim=(0, 2, 3)).tolist()
    std = raw.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    ldm.vae.register_to_config(latents_mean=tuple(mean), latents_std=tuple(std))
    m, s = ldm._latent_stats(raw)  # the very tensors ldm.encode normalises with
    return {"latents_mean": mean, "latents_std": std}, (raw - m) / s


def _train_unet(ldm: LatentDiffusion, z: torch.Tensor, y: torch.Tensor, cfg: PretrainConfig,
                ckpt: _Checkpoint, state: dict[str, Any], rd: RunDir, dev: torch.device,
                base_state: dict[str, Any]) -> EMAModel | None:
    unet = ldm.unet.to(dev).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 100, max(cfg.unet_steps, 1))
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True) \
        if cfg.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    start = _resume(state, "unet", opt, sched, gen)
    if state.get("stage") == "unet" and ema is not None:
        ema.load_state_dict(state["ema"])
    batches = _batches(len(z), cfg.batch_size, gen)
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", initial=start, total=cfg.unet_steps)
    t0, running = time.time(), None
    for step in bar:
        idx = next(batches)
        loss = example_losses(unet, ldm.scheduler, z[idx].to(dev), y[idx].to(dev),
                              null_class=ldm.spec.null_class, cond_drop=cfg.cond_drop,
                              generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(unet.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.unet_steps:
            bar.set_postfix(loss=f"{running:.4f}")
            rd.log(stage="unet", step=step + 1, loss=loss.item(), loss_ema=running,
                   lr=sched.get_last_lr()[0], seconds=round(time.time() - t0, 2))
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.unet_steps:
            ckpt.save({**base_state, "stage": "unet", "step": step + 1,
                       "unet": unet.state_dict(), "opt": opt.state_dict(),
                       "sched": sched.state_dict(), "gen": gen.get_state(),
                       "ema": ema.state_dict() if ema is not None else None})
    return ema


# Settings that may change when resuming: bookkeeping and the UNet's length always (a new
# total re-shapes the rest of the cosine schedule: extend or shorten a run), and the other
# UNet settings while the checkpoint is still in the autoencoder stage (nothing derived
# from them exists yet; a changed ae_steps re-shapes the autoencoder's schedule likewise).
_FREE_ALWAYS = {"checkpoint_every", "log_every", "device", "unet_steps"}
_FREE_IN_AE = {"ae_steps", "unet_lr", "cond_drop", "ema_decay"}


def _resumable(state: dict[str, Any], cfg: PretrainConfig) -> bool:
    stage = state.get("stage")
    free = _FREE_ALWAYS | (_FREE_IN_AE if stage == "ae" else set())
    if stage == "ae_done":  # the autoencoder is final; UNet settings are still free
        free |= _FREE_IN_AE - {"ae_steps"}
    old, new = state.get("config", {}), dataclasses.asdict(cfg)
    # a setting added after the checkpoint was written had its default then
    default = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}
    return all(old.get(k, default[k]) == v for k, v in new.items() if k not in free)


def pretrain(cfg: PretrainConfig, data: ImageSet, run_dir: str | Path,
             out_dir: str | Path | None = None, data_description: str = "") -> LatentDiffusion:
    """Train a base LDM on public ``data``; returns it and writes ``out_dir`` (default
    ``run_dir/model``), a sample grid and metrics into ``run_dir``."""
    rd = RunDir(run_dir)
    rd.write_config(cfg, data=data_description or data.source, examples=len(data))
    dev = resolve_device(cfg.device)
    ckpt = _Checkpoint(rd / "checkpoint.pt")
    state = ckpt.load() or {}
    if state and not _resumable(state, cfg):
        raise StateError(f"{ckpt.path} was written with a different configuration; use the "
                         "same options to resume, or a new run directory")
    ldm = build_ldm(cfg.preset, seed=cfg.seed, class_names=data.class_names)
    data = fit_to_model(data, ldm.spec, cfg.image_policy)
    x = to_model_tensor(data, ldm.spec.image_size, ldm.spec.channels, ldm.spec.source_size)
    if state.get("stage") in ("ae", "ae_done", "unet"):
        ldm.vae.load_state_dict(state["vae"])
    if state.get("stage") not in ("ae_done", "unet"):
        _train_autoencoder(ldm, x, cfg, ckpt, state, rd, dev)
        ckpt.save({"stage": "ae_done", "step": cfg.ae_steps, "vae": ldm.vae.state_dict(),
                   "config": dataclasses.asdict(cfg)})
    ldm.vae.to(dev).eval().requires_grad_(False)
    stats, z = _set_latent_stats(ldm, x)  # one encoding pass, not two
    rd.log(stage="latents", **stats)
    y = torch.from_numpy(data.labels)
    base_state = {"vae": ldm.vae.state_dict(), "config": dataclasses.asdict(cfg)}
    if state.get("stage") == "unet":
        ldm.unet.load_state_dict(state["unet"])
    ema = _train_unet(ldm, z, y, cfg, ckpt, state, rd, dev, base_state)
    if ema is not None:
        ema.copy_to(ldm.unet.parameters())
    ldm.unet.eval()
    out = Path(out_dir) if out_dir else rd / "model"
    metrics = rd.metrics()
    last = [m for m in metrics if m.get("stage") == "unet"][-1:] or [{}]
    last_ae = [m for m in metrics if m.get("stage") == "ae"][-1:] or [{}]
    save_ldm(ldm, out, card={
        "data": data_description or data.source, "examples": len(data),
        **({"image_fit": data.fitted} if data.fitted else {}),
        "classes_seen": sorted({int(c) for c in data.labels}),
        "seed": cfg.seed, "ae_steps": cfg.ae_steps, "unet_steps": cfg.unet_steps,
        "metrics": {"ae_rec_l1": last_ae[0].get("rec_l1"),
                    "unet_loss_ema": last[0].get("loss_ema")},
        "training_config": dataclasses.asdict(cfg)})
    class_grid(ldm, rd / "samples.png", per_class=8, seed=cfg.seed,
               title=f"{cfg.preset} base model, {cfg.unet_steps} UNet steps")
    ckpt.path.unlink(missing_ok=True)
    return ldm
