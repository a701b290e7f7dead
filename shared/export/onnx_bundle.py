"""Export a base LDM plus a finished LoRA adapter to a self-describing ONNX bundle.

The adapter is merged into the UNet (peft ``merge_and_unload``), then the UNet and the
autoencoder's decoder are exported with ``torch.onnx`` and checked with ``onnx.checker``.
Parity with torch is measured on random inputs at two batch sizes (neither equal to the
batch used for tracing, so the dynamic batch axis is exercised) and end to end through the
torch-free sampler (:mod:`dpfl.shared.edge.sampler`); the bundle is refused when the fp32
difference exceeds :class:`ExportConfig`'s tolerances. An optional fp16 variant is written
with its measured differences recorded, never refused. (int8 dynamic quantisation was
dropped: on our CPUs it was 0.3-0.5x the fp32 speed and moved images by 0.08.)

With ``ExportConfig.lora_preset`` and no adapter, the bundle is an adapter-swappable *base*:
its UNet takes the LoRA factors of every layer the preset adapts (and the class embedding)
as extra inputs that default to the base model (:mod:`dpfl.shared.export.lora_graph`); each
fine-tuned adapter then travels alone as a small file
(:func:`dpfl.shared.export.lora_graph.export_adapter`).

Bundle layout (``bundle.json`` says everything a sampler needs)::

    bundle.json             format, geometry, classes, scheduler, fingerprints, privacy
                            (the ``privacy.json`` schema, dpfl.shared.privacy.guarantee),
                            variants with their ONNX files and measured parity, date
    unet.onnx decoder.onnx  fp32 graphs (optionally *.fp16.onnx)

ONNX graphs: ``unet(sample[B,C,h,w] f32, timestep[B] i64, class_labels[B] i64 [, adapter
inputs]) -> out`` (the sampler runs the conditional and unconditional halves of classifier-
free guidance as one batch); ``decoder(latents[B,C,h,w] f32)
-> images[B,ch,S,S]`` takes *normalised* latents and includes de-normalisation, clamping
to [-1, 1] and the centre crop to the source size.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfl.shared.edge.adapter import ADAPTER_FORMAT
from dpfl.shared.edge.sampler import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    EdgeBundle,
    SamplerConfig,
    sample_images,
)
from dpfl.shared.errors import ConfigError, IncompatibleAdapter, ModelError
from dpfl.shared.export.fp16 import write_fp16
from dpfl.shared.export.lora_graph import (
    UNET_INPUTS,
    SwappableUNet,
    add_input_defaults,
    input_axes,
)
from dpfl.shared.export.parity import measure_parity, random_inputs, torch_references
from dpfl.shared.io import atomic_write_json
from dpfl.shared.ldm.diffusion import ddim_sample
from dpfl.shared.ldm.lora import PRESETS as LORA_PRESETS
from dpfl.shared.ldm.models import LatentDiffusion, crop_center, fingerprint_modules
from dpfl.shared.privacy.guarantee import PrivacyGuarantee

log = logging.getLogger(__name__)

__all__ = ["ExportConfig", "adapter_fingerprint", "export_bundle", "measure_parity",
           "merge_adapter", "torch_references"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class ExportConfig:
    """How to export and how strictly to check.

    Attributes:
        tolerance: float, default 1e-3, > 0. Largest allowed max-abs difference between
            the fp32 ONNX graphs and torch (UNet output, decoded image), on random inputs.
        image_tolerance: float, default 1e-2, > 0. Largest allowed max-abs difference of
            images sampled end to end (torch ``ddim_sample`` + decode vs the ONNX sampler,
            same initial noise, ``parity_steps`` DDIM steps, guidance 2).
        parity_batch_sizes: two batch sizes >= 1 to check (the graph is traced at batch 2).
        parity_steps: DDIM steps of the end-to-end check, 1-100.
        opset: ONNX opset, 14-21.
        fp16: also write a float16 variant (inputs/outputs stay float32); not with
            ``lora_preset``.
        lora_preset: None (default) or a LoRA preset name (:data:`dpfl.shared.ldm.lora.PRESETS`).
            Set: write an adapter-swappable base bundle whose UNet takes the LoRA factors of
            every layer the preset adapts as inputs (no adapter may be merged then).
        seed: seed of the random parity inputs.
    """

    tolerance: float = 1e-3
    image_tolerance: float = 1e-2
    parity_batch_sizes: tuple[int, int] = (1, 3)
    parity_steps: int = 8
    opset: int = 17
    fp16: bool = False
    lora_preset: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tolerance", "image_tolerance"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"ExportConfig.{name} must be a number > 0, got {v!r}")
        bs = tuple(self.parity_batch_sizes)
        if len(bs) != 2 or any(not isinstance(b, int) or b < 1 for b in bs):
            raise ConfigError(f"ExportConfig.parity_batch_sizes must be two integers >= 1, "
                              f"got {self.parity_batch_sizes!r}")
        if not 1 <= self.parity_steps <= 100:
            raise ConfigError(f"ExportConfig.parity_steps must be in 1..100, got "
                              f"{self.parity_steps}")
        if not 14 <= self.opset <= 21:
            raise ConfigError(f"ExportConfig.opset must be in 14..21, got {self.opset}")
        if self.lora_preset is not None and self.lora_preset not in LORA_PRESETS:
            raise ConfigError(f"ExportConfig.lora_preset {self.lora_preset!r} is unknown; "
                              f"choose one of {sorted(LORA_PRESETS)}")
        if self.lora_preset is not None and self.fp16:
            raise ConfigError("ExportConfig: fp16 and lora_preset together are not supported; "
                              "export the adapter-swappable base in fp32")


# -- adapter ------------------------------------------------------------------------------

def adapter_fingerprint(adapter_dir: str | Path) -> str:
    """SHA-256 over the adapter's config and safetensors weights (in that order)."""
    d = Path(adapter_dir)
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(name.encode() + b"|")
        h.update((d / name).read_bytes())
    return "sha256:" + h.hexdigest()


def merge_adapter(ldm: LatentDiffusion, adapter_dir: str | Path) -> torch.nn.Module:
    """A copy of ``ldm.unet`` with the peft LoRA adapter in ``adapter_dir`` merged in.

    Trainable copies of whole modules (peft ``modules_to_save``, e.g. the class
    embedding) replace the base modules. ``ldm`` itself is not changed.
    """
    from peft import PeftModel

    d = Path(adapter_dir)
    if not d.is_dir():
        raise IncompatibleAdapter(f"adapter directory {d} does not exist; pass the folder "
                                  "written by 'dpfl-client train' (adapter_config.json + "
                                  "adapter_model.safetensors)")
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (d / n).is_file()]
    if missing:
        raise IncompatibleAdapter(f"adapter directory {d} lacks {missing}; dpfl only reads "
                                  "safetensors adapters (never pickled .bin files)")
    base = copy.deepcopy(ldm.unet).eval()
    try:
        peft_model = PeftModel.from_pretrained(base, str(d))
        merged = peft_model.merge_and_unload()
    except Exception as exc:  # peft raises KeyError/ValueError/RuntimeError on mismatch
        raise IncompatibleAdapter(f"adapter {d} does not fit this base UNet: {exc}; export "
                                  "with the base model the adapter was trained on") from exc
    return merged.eval().requires_grad_(False)


# -- ONNX export --------------------------------------------------------------------------

class _UNetGraph(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=class_labels).sample


class _DecoderGraph(torch.nn.Module):
    def __init__(self, ldm: LatentDiffusion) -> None:
        super().__init__()
        self.vae = ldm.vae
        mean, std = ldm._latent_stats(torch.zeros(1))  # same statistics as ldm.decode
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.source_size = ldm.spec.source_size

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(latents * self.std + self.mean).sample.clamp(-1, 1)
        return crop_center(img, self.source_size)


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], names: list[str],
            path: Path, opset: int, axes: dict[str, dict[int, str]] | None = None) -> None:
    axes = axes or {n: {0: "batch"} for n in names}
    with warnings.catch_warnings():
        # Tracing warns about Python branches on shapes; the parity checks cover them.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # dynamo=True needs onnxscript, which dpfl does not depend on; the TorchScript
        # exporter is deliberate here, and parity below checks its output.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=names[:-1], output_names=names[-1:], dynamic_axes=axes)
    _check_graph(path)


def _check_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelError(f"exported {path.name} fails onnx.checker: {exc}") from exc


def _image_reference(ldm: LatentDiffusion, unet: torch.nn.Module, cfg: ExportConfig
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, initial noise and torch images (``ddim_sample`` + ``decode``, guidance 2)."""
    n = max(cfg.parity_batch_sizes)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    labels = torch.arange(n) % ldm.spec.num_classes
    noise = torch.randn((n, *ldm.latent_shape), generator=gen)
    z = ddim_sample(unet, ldm.scheduler, labels, ldm.latent_shape, ldm.spec.null_class,
                    steps=cfg.parity_steps, guidance=2.0, initial_noise=noise)
    return labels.numpy(), noise.numpy(), ldm.decode(z).numpy()


def _image_parity(bundle_dir: Path, variant: str, cfg: ExportConfig,
                  reference: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, float]:
    """The ONNX sampler's images vs torch's, from the same noise."""
    labels, noise, ref = reference
    bundle = EdgeBundle.load(bundle_dir, variant=variant)
    got = sample_images(bundle, labels, SamplerConfig(steps=cfg.parity_steps, guidance=2.0),
                        initial_noise=noise)
    diff = np.abs(got.astype(np.float64) - ref)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "steps": cfg.parity_steps, "guidance": 2.0, "images": int(labels.shape[0])}


_VARIANT_WRITERS = {"fp16": write_fp16}


# -- the bundle ---------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _scheduler_config(ldm: LatentDiffusion) -> dict[str, Any]:
    """The DDIM scheduler configuration the torch sampler uses (``ddim_sample``)."""
    from diffusers import DDIMScheduler

    cfg = dict(DDIMScheduler.from_config(ldm.scheduler.config).config)
    cfg["_class_name"] = "DDIMScheduler"
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _metadata(ldm: LatentDiffusion, unet: torch.nn.Module, adapter_dir: Path | None,
              privacy: PrivacyGuarantee) -> dict[str, Any]:
    mean, std = ldm._latent_stats(torch.zeros(1))
    spec = ldm.spec
    return {
        "format": BUNDLE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "image": {"size": spec.image_size, "channels": spec.channels,
                  "source_size": spec.source_size, "range": [-1.0, 1.0]},
        "latent": {"shape": list(ldm.latent_shape), "mean": mean.flatten().tolist(),
                   "std": std.flatten().tolist(), "normalised": True,
                   "note": "the decoder graph de-normalises, clamps and crops itself"},
        "class_names": list(spec.class_names),
        "null_class": spec.null_class,
        "scheduler": _scheduler_config(ldm),
        "base_fingerprint": ldm.card.get("fingerprint") or ldm.fingerprint(),
        "adapter": None if adapter_dir is None else {
            "fingerprint": adapter_fingerprint(adapter_dir), "path": str(adapter_dir),
            "config": json.loads((adapter_dir / ADAPTER_CONFIG).read_text())},
        "merged_unet_fingerprint": fingerprint_modules({"unet": unet}),
        "adapter_inputs": None,
        "privacy": privacy.to_json(),
    }


def _check(name: str, parity: dict[str, float], tol: float, what: str) -> None:
    if parity["max_abs_diff"] > tol:
        raise ModelError(f"{what} differs from torch by max |diff| = {parity['max_abs_diff']:.3g} "
                         f"(mean {parity['mean_abs_diff']:.3g}) for {name}, above the tolerance "
                         f"{tol:g}; the bundle was not written. Check the export (opset, "
                         "custom layers) or raise the tolerance if this is expected")


def export_bundle(ldm: LatentDiffusion, out_dir: str | Path, adapter_dir: str | Path | None = None,
                  privacy: PrivacyGuarantee | None = None, config: ExportConfig | None = None,
                  overwrite: bool = False) -> Path:
    """Merge ``adapter_dir`` (optional) into ``ldm`` and write an ONNX bundle to ``out_dir``.

    ``privacy``: the guarantee the bundle states (e.g. ``PrivacyGuarantee.from_file`` of the
    adapter's ``privacy.json``); None records it as unknown, never guessed.

    Raises :class:`ModelError` (and writes nothing) when fp32 parity with torch exceeds the
    configured tolerances; the message carries the measured difference.
    """
    cfg = config or ExportConfig()
    privacy = privacy or PrivacyGuarantee()
    out = Path(out_dir)
    if cfg.lora_preset is not None and adapter_dir is not None:
        raise ConfigError("an adapter-swappable base bundle (lora_preset) holds no merged "
                          "adapter; export the adapter on its own with export_adapter")
    if out.exists() and not (overwrite and (out / BUNDLE_FILE).is_file()):
        raise ModelError(f"{out} already exists; choose a new bundle directory"
                         + ("" if not overwrite else " (overwrite only replaces a bundle)"))
    adapter = None if adapter_dir is None else Path(adapter_dir)
    unet = merge_adapter(ldm, adapter) if adapter is not None else copy.deepcopy(ldm.unet).eval()
    ldm.vae.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = _metadata(ldm, unet, adapter, privacy)
        if cfg.lora_preset is not None:
            meta["adapter_inputs"] = {"lora_preset": cfg.lora_preset,
                                      "format": ADAPTER_FORMAT,
                                      "note": "feed an edge adapter: dpfl-sample --adapter"}
        meta["variants"] = _export_variants(ldm, unet, stage, cfg, meta)
        atomic_write_json(stage / BUNDLE_FILE, meta)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("wrote ONNX bundle %s (variants %s)", out, sorted(meta["variants"]))
    return out


def _export_fp32(ldm: LatentDiffusion, unet: torch.nn.Module, stage: Path, cfg: ExportConfig
                 ) -> tuple[dict[str, torch.nn.Module], dict[str, Path]]:
    """The fp32 UNet (plain, or with adapter inputs) and decoder graphs, written to ``stage``."""
    swappable = None if cfg.lora_preset is None else SwappableUNet(unet, cfg.lora_preset)
    graphs = {"unet": swappable or _UNetGraph(unet).eval(), "decoder": _DecoderGraph(ldm).eval()}
    trace = random_inputs(ldm, 2, torch.Generator().manual_seed(cfg.seed))
    fp32 = {k: stage / f"{k}.onnx" for k in graphs}
    _export(graphs["decoder"], tuple(trace["decoder"].values()), ["latents", "images"],
            fp32["decoder"], cfg.opset)
    if swappable is None:
        _export(graphs["unet"], tuple(trace["unet"].values()), [*UNET_INPUTS, "out"],
                fp32["unet"], cfg.opset)
        return graphs, fp32
    defaults = swappable.defaults()
    args = (*trace["unet"].values(), *(torch.from_numpy(defaults[n])
                                       for n in swappable.input_names))
    _export(swappable, args, [*UNET_INPUTS, *swappable.input_names, "out"], fp32["unet"],
            cfg.opset, axes=input_axes(swappable))
    add_input_defaults(fp32["unet"], defaults)
    _check_graph(fp32["unet"])
    return graphs, fp32


def _export_variants(ldm: LatentDiffusion, unet: torch.nn.Module, stage: Path,
                     cfg: ExportConfig, meta: dict[str, Any]) -> dict[str, Any]:
    graphs, fp32 = _export_fp32(ldm, unet, stage, cfg)
    cases = torch_references({"unet": graphs["unet"], "decoder": ldm.decode}, ldm,
                             cfg.parity_batch_sizes, cfg.seed)
    image_ref = None
    variants: dict[str, Any] = {}
    wanted = ["fp32"] + (["fp16"] if cfg.fp16 else [])
    for variant in wanted:
        files = fp32 if variant == "fp32" else {k: stage / f"{k}.{variant}.onnx" for k in graphs}
        if variant != "fp32":
            for key in graphs:
                _VARIANT_WRITERS[variant](fp32[key], files[key])
                _check_graph(files[key])
        parity = measure_parity(files, cases)
        if variant == "fp32":
            for key in graphs:
                _check(f"{key}.onnx", parity[key], cfg.tolerance, f"the ONNX {key}")
        entry: dict[str, Any] = {"files": {k: p.name for k, p in files.items()},
                                 "sha256": {k: _sha256_file(p) for k, p in files.items()},
                                 "parity": {**parity,
                                            "batch_sizes": list(cfg.parity_batch_sizes)}}
        variants[variant] = entry
        # the sampler needs bundle.json to open a variant: write the partial one
        atomic_write_json(stage / BUNDLE_FILE, {**meta, "variants": variants})
        image_ref = image_ref or _image_reference(ldm, unet, cfg)
        entry["image_parity"] = _image_parity(stage, variant, cfg, image_ref)
        if variant == "fp32":
            _check("sampled images", entry["image_parity"], cfg.image_tolerance,
                   "the ONNX sampler's output")
        log.info("%s parity: %s", variant, {k: v["max_abs_diff"] for k, v in parity.items()}
                 | {"images": entry["image_parity"]["max_abs_diff"]})
    return variants
