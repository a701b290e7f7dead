"""LoRA adapters on the diffusion UNet (peft), as in DP-LDM and DP-LoRA.

DP-LDM (Lyu et al., 2024) fine-tunes only the attention modules of a publicly pretrained
latent diffusion model, optionally only in later blocks, plus the conditioning embedder;
DP-LoRA (Tsai et al., 2024) trains low-rank adapters (Hu et al., "LoRA", ICLR 2022) on the
attention and projection layers. Presets (:data:`PRESETS`):

``attention``       to_q, to_k, to_v, to_out.0 of every attention block
``attention+proj``  the above plus proj_in / proj_out, the ResNet time-embedding
                    projections (time_emb_proj) and the time-embedding MLP (linear_1/2)
``attention+conv``  attention plus the ResNet convolutions (conv1, conv2, conv_shortcut)

``LoraSpec.blocks`` restricts the adapters to module names that start with one of the given
prefixes (e.g. ``("up_blocks", "mid_block")``). The class embedding can be trainable (to
learn classes the public model never saw); it is then a peft ``modules_to_save`` module, so
it travels inside the standard adapter directory.

Adapter format: the state dict :func:`adapter_state` returns is exactly peft's
``get_peft_model_state_dict`` (keys such as ``base_model.model.<module>.lora_A.weight`` and
``base_model.model.class_embedding.weight``), which is also what ``save_pretrained`` writes
to ``adapter_model.safetensors`` beside ``adapter_config.json``; ``PeftModel.from_pretrained``
reads the directory back.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from dpfl.shared.errors import ConfigError, IncompatibleAdapter

log = logging.getLogger(__name__)

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_PROJ = ("proj_in", "proj_out", "time_emb_proj", "time_embedding.linear_1",
         "time_embedding.linear_2")
_CONV = ("conv1", "conv2", "conv_shortcut")

#: preset name -> module-name suffixes that receive an adapter
PRESETS: dict[str, tuple[str, ...]] = {
    "attention": _ATTENTION,
    "attention+proj": _ATTENTION + _PROJ,
    "attention+conv": _ATTENTION + _CONV,
}
CLASS_EMBEDDING = "class_embedding"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained writes


@dataclass(frozen=True)
class LoraSpec:
    """Which UNet layers get LoRA adapters, and their shape.

    Attributes:
        preset: one of :data:`PRESETS` (default ``attention``, the DP-LDM setting).
        rank: LoRA rank r (>= 1, default 4); trainable parameters grow linearly with it.
        alpha: LoRA scaling numerator (> 0, default 8); updates are scaled by alpha / rank.
        dropout: dropout on the LoRA input (0 <= p < 1, default 0).
        train_class_embedding: also train the class embedding (default True), needed to
            learn classes the public model never saw.
        blocks: optional module-name prefixes (e.g. ``("up_blocks",)``); only layers under
            them get adapters. ``None`` (default): every matching layer.
        freeze_a: FFA-LoRA (Sun et al., ICLR 2024): keep every ``lora_A`` at its (shared,
            seeded) initialisation and train only ``lora_B`` (default False). Federated
            averaging of B is then exact, and half the parameters travel.
    """

    preset: str = "attention"
    rank: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    train_class_embedding: bool = True
    blocks: tuple[str, ...] | None = None
    freeze_a: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"LoRA preset {self.preset!r} is unknown; choose one of "
                              f"{sorted(PRESETS)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.blocks is not None:
            if isinstance(self.blocks, str) or not self.blocks:
                raise ConfigError(f"LoRA blocks must be a non-empty tuple of module-name "
                                  f"prefixes, got {self.blocks!r}")
            object.__setattr__(self, "blocks", tuple(self.blocks))


def target_modules(unet: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the UNet's Linear/Conv2d modules that the spec adapts."""
    suffixes = PRESETS[spec.preset]
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        if spec.blocks is not None and not any(name == b or name.startswith(b.rstrip(".") + ".")
                                               for b in spec.blocks):
            continue
        names.append(name)
    if not names:
        raise ConfigError(f"LoRA preset {spec.preset!r} with blocks {spec.blocks!r} matches no "
                          f"layer of this UNet; check the block prefixes (top-level modules: "
                          f"{[n for n, _ in unet.named_children()]})")
    return names


def lora_config(unet: torch.nn.Module, spec: LoraSpec) -> LoraConfig:
    save = None
    if spec.train_class_embedding:
        if getattr(unet, CLASS_EMBEDDING, None) is None:
            raise ConfigError("train_class_embedding=True but the UNet has no class embedding; "
                              "use a class-conditional base model or set it to False")
        save = [CLASS_EMBEDDING]
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=target_modules(unet, spec), modules_to_save=save,
                      bias="none", init_lora_weights=True)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def make_conv_inputs_contiguous(model: torch.nn.Module) -> int:
    """Give every trainable Conv2d a forward pre-hook that makes its input contiguous.

    Opacus' per-sample conv gradients (``unfold2d`` + ``as_strided``) assume contiguous
    NCHW inputs; diffusers' attention blocks hand channels_last-strided tensors to later
    convs, and Opacus then silently computes wrong per-sample gradients. Returns the number
    of hooked convs.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and any(p.requires_grad
                                                       for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(_contiguous_input)
            n += 1
    return n


def wrap_unet(unet: torch.nn.Module, spec: LoraSpec, copy_base: bool = True) -> PeftModel:
    """A peft model around (a deep copy of, by default) ``unet``: only adapters train."""
    base = copy.deepcopy(unet) if copy_base else unet
    base.requires_grad_(False)
    model = get_peft_model(base, lora_config(base, spec))
    if spec.freeze_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    make_conv_inputs_contiguous(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("LoRA %s rank %d: %d trainable parameters of %d (%.2f%%)", spec.preset, spec.rank,
             n_train, n_all, 100.0 * n_train / max(n_all, 1))
    return model


def spec_for_plan(plan) -> LoraSpec:
    """The LoRA layout a federated round plan
    (:class:`dpfl.shared.federation.config.RoundPlan`) asks for."""
    return LoraSpec(preset=plan.lora_preset, rank=plan.lora_rank, alpha=plan.lora_alpha,
                    dropout=plan.lora_dropout, train_class_embedding=plan.train_class_embedding,
                    freeze_a=plan.ffa)


def travelling_keys(adapter_keys, ffa: bool) -> list[str]:
    """Adapter keys a site sends back after a round, sorted: every key, or with FFA-LoRA every
    key but the frozen (shared, never trained) ``lora_A`` matrices."""
    return sorted(k for k in adapter_keys if not (ffa and "lora_A" in k))


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA A/B and the class embedding when trained), on CPU."""
    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` after checking keys, shapes and values.

    Raises :class:`IncompatibleAdapter` naming unexpected or missing keys, wrong shapes or
    non-finite values; nothing is loaded then.
    """
    expected = get_peft_model_state_dict(model)
    if not isinstance(state, dict):
        raise IncompatibleAdapter(f"adapter must be a dict of tensors, got {type(state).__name__}")
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise IncompatibleAdapter(
            f"adapter does not fit this LoRA layout: {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]}, {len(missing)} missing key(s) {missing[:5]}; the adapter was "
            "made with a different preset, block filter or class-embedding setting")
    for k, v in state.items():
        if not torch.is_tensor(v):
            raise IncompatibleAdapter(f"adapter entry {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise IncompatibleAdapter(f"adapter entry {k!r} has shape {tuple(v.shape)}, expected "
                                      f"{tuple(expected[k].shape)} (different rank or base model?)")
        if not torch.isfinite(v).all():
            raise IncompatibleAdapter(f"adapter entry {k!r} holds non-finite values (NaN/inf); "
                                      "refusing to load it")
    dev = next(model.parameters()).device
    with torch.no_grad():
        result = set_peft_model_state_dict(model, {k: v.to(dev) for k, v in state.items()})
    if getattr(result, "unexpected_keys", None):
        raise IncompatibleAdapter(f"peft did not accept adapter keys {result.unexpected_keys[:5]}")


def save_adapter(model: PeftModel, path: str | Path) -> Path:
    """Write a standard peft adapter directory (adapter_config.json + safetensors)."""
    path = Path(path)
    for cfg in model.peft_config.values():  # diffusers gives a Path; peft's card wants str
        if cfg.base_model_name_or_path is not None:
            cfg.base_model_name_or_path = str(cfg.base_model_name_or_path)
    base_cfg = getattr(model.get_base_model(), "config", None)
    if base_cfg is not None and isinstance(base_cfg.get("_name_or_path"), Path):
        # peft writes it into README.md as YAML; a Path object would make that unreadable
        dict.__setitem__(base_cfg, "_name_or_path", str(base_cfg["_name_or_path"]))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _check_adapter_keys(model: PeftModel, path: Path) -> None:
    """peft only warns about adapter-file keys it did not use or did not find (a missing key
    leaves that layer at its random initialisation): refuse both, naming them."""
    from safetensors import safe_open

    weights = path / ADAPTER_WEIGHTS  # load_adapter refused a directory without it
    with safe_open(str(weights), framework="pt") as f:
        stored = set(f.keys())
    expected = set(get_peft_model_state_dict(model))
    unexpected, missing = sorted(stored - expected), sorted(expected - stored)
    if unexpected or missing:
        raise IncompatibleAdapter(
            f"adapter {weights} does not fit its adapter_config.json on this UNet: "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}, {len(missing)} missing "
            f"key(s) {missing[:5]}; the file was edited or mixed with another adapter's config")


def load_adapter(unet: torch.nn.Module, path: str | Path, trainable: bool = False) -> PeftModel:
    """Read an adapter directory onto (a deep copy of) ``unet`` with
    ``PeftModel.from_pretrained``."""
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise IncompatibleAdapter(f"{path} is not a peft adapter directory (no "
                                  "adapter_config.json)")
    if not (path / ADAPTER_WEIGHTS).is_file():  # peft would fall back to a pickle
        raise IncompatibleAdapter(f"{path} holds no {ADAPTER_WEIGHTS}; dpfl reads only "
                                  "safetensors adapters, never pickled .bin files")
    base = copy.deepcopy(unet).requires_grad_(False)
    try:
        model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise IncompatibleAdapter(f"cannot load adapter {path} onto this UNet: {exc}") from exc
    _check_adapter_keys(model, path)
    make_conv_inputs_contiguous(model)
    for k, v in get_peft_model_state_dict(model).items():
        if not torch.isfinite(v).all():
            raise IncompatibleAdapter(f"adapter {path}: {k!r} holds non-finite values")
    return model


def merged_unet(model: PeftModel) -> torch.nn.Module:
    """A plain UNet with the adapter folded in (for sampling/export); ``model`` is untouched."""
    return copy.deepcopy(model).merge_and_unload()

