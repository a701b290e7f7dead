"""The latent diffusion model: a diffusers ``AutoencoderKL``, a class-conditional
``UNet2DModel`` and a ``DDPMScheduler``, saved as a diffusers-format directory.

Directory layout (what :func:`save_ldm` writes and :func:`load_ldm` reads)::

    model_index.json        diffusers-style index naming the component classes
    vae/  unet/  scheduler/ each written by ``save_pretrained`` (safetensors)
    dpfl_ldm.json           image geometry and class names (optional on load)
    model_card.json         data used, seed, steps, metrics, weight fingerprint

Any diffusers directory with ``vae/``, ``unet/`` and ``scheduler/`` subfolders loads the
same way; missing dpfl metadata is inferred from the component configs.

Latents are normalised per channel (``latents_mean`` / ``latents_std`` in the VAE config)
so that the diffusion model sees roughly unit-variance inputs in every channel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from dpfl.shared.errors import ConfigError, ModelError
from dpfl.shared.io import atomic_write_json

SPEC_FILE = "dpfl_ldm.json"
CARD_FILE = "model_card.json"
INDEX_FILE = "model_index.json"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class LDMSpec:
    """Geometry and labels of an LDM.

    Attributes:
        image_size: side of the square images the autoencoder takes (pixels).
        channels: image channels (1 grayscale, 3 RGB).
        source_size: side of the original images before centred zero padding (e.g. 28 for
            Fashion-MNIST in a 32-pixel model); equal to ``image_size`` when there is no padding.
        class_names: one name per class; the UNet has one more class embedding, the "null"
            class used for classifier-free guidance.
    """

    image_size: int
    channels: int
    source_size: int
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_class(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LDMSpec:
        return cls(int(d["image_size"]), int(d["channels"]), int(d["source_size"]),
                   tuple(d["class_names"]))


@dataclass(frozen=True)
class Preset:
    """Architecture of a model size preset (see :data:`PRESETS`)."""

    spec: LDMSpec
    vae: dict[str, Any]
    unet: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=dict)


_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                  prediction_type="v_prediction", clip_sample=False)

PRESETS: dict[str, Preset] = {
    # Seconds on CPU: for tests.
    "tiny": Preset(
        spec=LDMSpec(32, 1, 28, FASHION_MNIST_CLASSES),
        vae=dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                 norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3),
        unet=dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8,
                  norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D")),
        scheduler=_SCHEDULER,
    ),
    # 28x28 grayscale padded to 32x32, latents 4x8x8, a few million UNet parameters.
    "fmnist": Preset(
        spec=LDMSpec(32, 1, 28, FASHION_MNIST_CLASSES),
        vae=dict(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                 norm_num_groups=16,
                 down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3),
        unet=dict(block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=32,
                  norm_num_groups=32,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
        scheduler=_SCHEDULER,
    ),
}
# issue #15's first lever: the "fmnist" autoencoder with twice the latent channels (8x8x8
# latents: 512 numbers for a 28x28 image instead of 256), same cost per UNet step apart from
# its first and last convolution
PRESETS["fmnist-lat8"] = dataclasses.replace(
    PRESETS["fmnist"], vae={**PRESETS["fmnist"].vae, "latent_channels": 8})
# the second lever: the same 4x8x8 latents (so the same UNet cost) from a wider autoencoder,
# 32 channels at full resolution instead of 16 (953k parameters instead of 681k; about 1.9x
# the time per autoencoder step)
PRESETS["fmnist-wide-ae"] = dataclasses.replace(
    PRESETS["fmnist"], vae={**PRESETS["fmnist"].vae, "block_out_channels": (32, 64, 64),
                            "norm_num_groups": 32})


@dataclass
class LatentDiffusion:
    """The three diffusers components plus the metadata dpfl needs around them."""

    vae: AutoencoderKL
    unet: UNet2DModel
    scheduler: DDPMScheduler
    spec: LDMSpec
    card: dict[str, Any] = field(default_factory=dict)

    # -- latent space -------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        c = cfg.latent_channels
        if cfg.latents_mean is not None and cfg.latents_std is not None:
            mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device)
            std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device)
        else:  # classic single scaling factor (e.g. Stable Diffusion VAEs)
            mean = torch.zeros(c, dtype=like.dtype, device=like.device)
            std = torch.full((c,), 1.0 / cfg.scaling_factor, dtype=like.dtype, device=like.device)
        return mean.view(1, c, 1, 1), std.view(1, c, 1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images in [-1, 1], shape (N, C, H, W) -> normalised latents (posterior mean)."""
        out = []
        for chunk in images.split(batch_size):
            chunk = chunk.to(self.vae.device, self.vae.dtype)
            raw = self.vae.encode(chunk).latent_dist.mean
            mean, std = self._latent_stats(raw)
            out.append(((raw - mean) / std).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1], cropped back to ``spec.source_size``."""
        out = []
        for chunk in latents.split(batch_size):
            chunk = chunk.to(self.vae.device, self.vae.dtype)
            mean, std = self._latent_stats(chunk)
            img = self.vae.decode(chunk * std + mean).sample.clamp(-1, 1)
            out.append(crop_center(img, self.spec.source_size).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.vae.config.latent_channels
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        s = self.spec.image_size // down
        return (c, s, s)

    def to(self, device: torch.device | str) -> LatentDiffusion:
        self.vae.to(device)
        self.unet.to(device)
        return self

    def fingerprint(self) -> str:
        return fingerprint_modules({"vae": self.vae, "unet": self.unet},
                                   extra={k: v for k, v in self.scheduler.config.items()
                                          if not k.startswith("_")})


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]`` -> a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device ({exc})") from exc


def crop_center(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def pad_center(images: torch.Tensor, size: int, value: float = -1.0) -> torch.Tensor:
    """Zero-pad (``value`` in model units; -1 is black) images to ``size`` x ``size``."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ModelError(f"images of {h}x{w} pixels do not fit a {size}x{size} model; "
                         "resize them first")
    top, left = (size - h) // 2, (size - w) // 2
    pad = (left, size - w - left, top, size - h - top)
    return torch.nn.functional.pad(images, pad, value=value)


def fingerprint_modules(modules: dict[str, torch.nn.Module], extra: Any = None) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted order."""
    h = hashlib.sha256()
    for prefix in sorted(modules):
        state = modules[prefix].state_dict()
        for name in sorted(state):
            t = state[name].detach().to("cpu").contiguous()
            h.update(f"{prefix}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return "sha256:" + h.hexdigest()


def build_ldm(preset: str, seed: int = 0,
              class_names: tuple[str, ...] | None = None) -> LatentDiffusion:
    """A freshly initialised LDM of the named preset (see :data:`PRESETS`)."""
    if preset not in PRESETS:
        raise ModelError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    spec = (p.spec if class_names is None
            else dataclasses.replace(p.spec, class_names=tuple(class_names)))
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=spec.channels, out_channels=spec.channels,
                        sample_size=spec.image_size, **p.vae)
    lc = p.vae["latent_channels"]
    down = 2 ** (len(p.vae["block_out_channels"]) - 1)
    unet = UNet2DModel(sample_size=spec.image_size // down, in_channels=lc, out_channels=lc,
                       num_class_embeds=spec.num_classes + 1, **p.unet)
    scheduler = DDPMScheduler(**p.scheduler)
    return LatentDiffusion(vae, unet, scheduler, spec, card={"preset": preset, "seed": seed})


def fresh_unet(unet: UNet2DModel, seed: int = 0) -> UNet2DModel:
    """A randomly initialised UNet with exactly ``unet``'s architecture (built from its
    config, so it fits any loaded model, ours or another diffusers one), on the CPU, fp32.

    The initialisation depends only on ``seed`` and leaves torch's global RNG as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return type(unet).from_config(unet.config)


def save_ldm(ldm: LatentDiffusion, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``ldm`` as a diffusers-format directory with its spec and model card."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ldm.vae.save_pretrained(path / "vae", safe_serialization=True)
    ldm.unet.save_pretrained(path / "unet", safe_serialization=True)
    ldm.scheduler.save_pretrained(path / "scheduler")
    atomic_write_json(path / INDEX_FILE, {
        "_class_name": "DPFLLatentDiffusion",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", type(ldm.vae).__name__],
        "unet": ["diffusers", type(ldm.unet).__name__],
        "scheduler": ["diffusers", type(ldm.scheduler).__name__],
    })
    atomic_write_json(path / SPEC_FILE, ldm.spec.to_json())
    ldm.card = {**ldm.card, **(card or {}), "fingerprint": ldm.fingerprint(),
                "unet_parameters": sum(p.numel() for p in ldm.unet.parameters()),
                "vae_parameters": sum(p.numel() for p in ldm.vae.parameters())}
    atomic_write_json(path / CARD_FILE, ldm.card)
    return path


def _component(path: Path, name: str, default: str) -> Any:
    cls_name = default
    index = path / INDEX_FILE
    if index.exists():
        entry = json.loads(index.read_text()).get(name)
        if entry:
            cls_name = entry[1]
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ModelError(f"{index}: component {name!r} names unknown diffusers class {cls_name!r}")
    sub = path / name
    if not sub.is_dir():
        raise ModelError(f"model directory {path} has no '{name}/' subfolder; expected a "
                         "diffusers-format LDM with vae/, unet/ and scheduler/")
    try:
        # weights only from safetensors: diffusers would otherwise fall back to pickled .bin
        fenced = {"use_safetensors": True} if issubclass(cls, diffusers.ModelMixin) else {}
        return cls.from_pretrained(str(sub), **fenced)
    except Exception as exc:  # diffusers raises several types for broken folders
        raise ModelError(f"cannot load {name} from {sub}: {exc}") from exc


def load_ldm(path: str | Path, verify_fingerprint: str | None = None) -> LatentDiffusion:
    """Load a diffusers-format LDM directory (ours or any with vae/unet/scheduler).

    Args:
        path: the model directory.
        verify_fingerprint: if given, raise :class:`ModelError` unless the loaded weights
            have exactly this fingerprint.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist; pass the folder written by "
                         "'dpfl-server pretrain' or any diffusers LDM folder")
    vae = _component(path, "vae", "AutoencoderKL")
    unet = _component(path, "unet", "UNet2DModel")
    scheduler = _component(path, "scheduler", "DDPMScheduler")
    spec_file = path / SPEC_FILE
    if spec_file.exists():
        spec = LDMSpec.from_json(json.loads(spec_file.read_text()))
    else:
        n = unet.config.num_class_embeds
        if not n:
            raise ModelError(f"{path}/unet is not class-conditional (num_class_embeds unset); "
                             "dpfl needs a class-conditional UNet")
        size = int(vae.config.sample_size)
        spec = LDMSpec(size, int(vae.config.in_channels), size, tuple(str(i) for i in range(n - 1)))
    card_file = path / CARD_FILE
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    vae.eval().requires_grad_(False)
    unet.eval()
    ldm = LatentDiffusion(vae, unet, scheduler, spec, card)
    if verify_fingerprint is not None:
        actual = ldm.fingerprint()
        if actual != verify_fingerprint:
            raise ModelError(f"base model in {path} has fingerprint {actual}, expected "
                             f"{verify_fingerprint}; fetch the coordinator's base model again")
    return ldm
