"""A base UNet graph whose LoRA weights are inputs, and fine-tuned adapters as small edge
files (:mod:`dpfl.shared.edge.adapter`), so a device holds the base once and swaps adapters.

Every layer a LoRA preset (:data:`dpfl.shared.ldm.lora.PRESETS`) can adapt gets two graph
inputs, ``lora.<module>.down`` and ``lora.<module>.up`` (rank a dynamic axis), and computes
``base(x) + up(down(x))`` (Hu et al., "LoRA", ICLR 2022; the scale alpha/r is folded into
``up``); the class embedding table is an input too, since adapters may train it. Each input
has an ONNX initializer of the same name as its default: zero LoRA factors of rank 1 and the
base embedding, so without an adapter the graph is exactly the base model.

onnxruntime's own LoRA format (``onnxruntime.AdapterFormat``, fed with
``RunOptions.add_active_adapter``) also binds named graph inputs, but carries only two version
integers beside the tensors; an edge adapter must carry its privacy guarantee and the base
fingerprint, so it is a safetensors file with metadata, fed as ordinary inputs.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dpfl.shared.edge.adapter import ADAPTER_FORMAT, CLASS_EMBEDDING_INPUT, LORA_PREFIX
from dpfl.shared.errors import IncompatibleAdapter, ModelError
from dpfl.shared.io import atomic_write_bytes
from dpfl.shared.ldm.lora import CLASS_EMBEDDING, LoraSpec, target_modules
from dpfl.shared.ldm.models import LatentDiffusion
from dpfl.shared.privacy.guarantee import PrivacyGuarantee

__all__ = ["SwappableUNet", "adapter_tensors", "export_adapter", "input_axes"]

UNET_INPUTS = ["sample", "timestep", "class_labels"]


class _LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.down = torch.zeros(base.in_features, 1)
        self.up = torch.zeros(1, base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + torch.matmul(torch.matmul(x, self.down), self.up)


class _LoraConv(torch.nn.Module):
    def __init__(self, base: torch.nn.Conv2d) -> None:
        super().__init__()
        if base.groups != 1 or base.dilation != (1, 1) or isinstance(base.padding, str):
            raise ModelError(f"cannot give {base} LoRA inputs (grouped, dilated or string "
                             "padding); peft's Conv2d LoRA assumes none of these")
        self.base = base
        self.down = torch.zeros(1, base.in_channels, *base.kernel_size)
        self.up = torch.zeros(base.out_channels, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.down, stride=self.base.stride, padding=self.base.padding)
        return self.base(x) + F.conv2d(h, self.up)


class _InputEmbedding(torch.nn.Module):
    def __init__(self, base: torch.nn.Embedding) -> None:
        super().__init__()
        self.weight = base.weight.detach().clone()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return F.embedding(labels, self.weight)


class SwappableUNet(torch.nn.Module):
    """A copy of ``unet`` whose LoRA factors (every layer ``preset`` targets) and class
    embedding are forward arguments, in the order of :attr:`input_names`; omitted ones keep
    their defaults (zero LoRA, base embedding), i.e. the base model."""

    def __init__(self, unet: torch.nn.Module, preset: str) -> None:
        super().__init__()
        self.unet = copy.deepcopy(unet).eval().requires_grad_(False)
        if getattr(self.unet, CLASS_EMBEDDING, None) is None:
            raise ModelError("the UNet has no class embedding; adapter inputs need a "
                             "class-conditional base model")
        self.layers: dict[str, _LoraLinear | _LoraConv] = {}
        for name in target_modules(self.unet, LoraSpec(preset=preset,
                                                       train_class_embedding=False)):
            parent, _, child = name.rpartition(".")
            base = self.unet.get_submodule(name)
            wrapped = _LoraLinear(base) if isinstance(base, torch.nn.Linear) else _LoraConv(base)
            setattr(self.unet.get_submodule(parent) if parent else self.unet, child, wrapped)
            self.layers[name] = wrapped
        self.embedding = _InputEmbedding(self.unet.class_embedding)
        self.unet.class_embedding = self.embedding
        self.preset = preset

    @property
    def input_names(self) -> list[str]:
        lora = [f"{LORA_PREFIX}{n}.{part}" for n in self.layers for part in ("down", "up")]
        return [CLASS_EMBEDDING_INPUT, *lora]

    def defaults(self) -> dict[str, np.ndarray]:
        """Each adapter input's default value (what the graph uses when it is not fed)."""
        out = {CLASS_EMBEDDING_INPUT: self.embedding.weight.numpy().copy()}
        for n, layer in self.layers.items():
            out[f"{LORA_PREFIX}{n}.down"] = layer.down.numpy().copy()
            out[f"{LORA_PREFIX}{n}.up"] = layer.up.numpy().copy()
        return out

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                *adapter: torch.Tensor) -> torch.Tensor:
        saved = [(m, m.down, m.up) for m in self.layers.values()]
        saved_emb = self.embedding.weight
        try:
            if adapter:
                self.embedding.weight = adapter[0]
                for k, m in enumerate(self.layers.values()):
                    m.down, m.up = adapter[1 + 2 * k], adapter[2 + 2 * k]
            return self.unet(sample, timestep, class_labels=class_labels).sample
        finally:
            for m, down, up in saved:
                m.down, m.up = down, up
            self.embedding.weight = saved_emb


def input_axes(graph: SwappableUNet) -> dict[str, dict[int, str]]:
    """Dynamic axes for ``torch.onnx.export``: the batch, and each layer's rank."""
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in [*UNET_INPUTS, "out"]}
    for k, (name, layer) in enumerate(graph.layers.items()):
        conv = isinstance(layer, _LoraConv)
        axes[f"{LORA_PREFIX}{name}.down"] = {0 if conv else 1: f"rank{k}"}
        axes[f"{LORA_PREFIX}{name}.up"] = {1 if conv else 0: f"rank{k}"}
    return axes


def add_input_defaults(path: Path, defaults: dict[str, np.ndarray]) -> None:
    """Give each adapter input of the ONNX file at ``path`` its default (an initializer of
    the same name, which onnxruntime lets a fed input override)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    names = {i.name for i in model.graph.input}
    missing = sorted(set(defaults) - names)
    if missing:
        raise ModelError(f"exported UNet lacks adapter inputs {missing[:5]} (unused by the "
                         "graph?); the LoRA wrapper did not trace")
    model.graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in defaults.items())
    onnx.save(model, str(path))


# -- adapters -----------------------------------------------------------------------------

def _lora_factors(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    if getattr(module, "use_dora", {}).get("default", False):
        raise IncompatibleAdapter("DoRA adapters cannot be applied as edge adapters; merge "
                                  "them with 'dpfl-server export --adapter' instead")
    a = module.lora_A["default"].weight.detach().float()
    b = module.lora_B["default"].weight.detach().float()
    return a, b, float(module.scaling["default"])


def adapter_tensors(unet: torch.nn.Module, adapter_dir: str | Path) -> dict[str, np.ndarray]:
    """The edge tensors of the peft adapter in ``adapter_dir`` (see
    :mod:`dpfl.shared.edge.adapter` for names and layouts)."""
    from dpfl.shared.ldm.lora import load_adapter

    model = load_adapter(unet, adapter_dir)
    saved = set(model.peft_config["default"].modules_to_save or [])
    if saved - {CLASS_EMBEDDING}:
        raise IncompatibleAdapter(f"adapter {adapter_dir} trains whole modules "
                                  f"{sorted(saved - {CLASS_EMBEDDING})}; an edge adapter can "
                                  "only carry LoRA factors and the class embedding")
    out: dict[str, np.ndarray] = {}
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b, scale = _lora_factors(module)
        key = LORA_PREFIX + name.removeprefix(prefix)
        if a.ndim == 2:  # Linear: x @ A^T @ (s B)^T
            out[key + ".down"], out[key + ".up"] = a.T, (scale * b).T
        elif a.ndim == 4:  # Conv2d: conv(conv(x, A), s B)
            out[key + ".down"], out[key + ".up"] = a, scale * b
        else:
            raise IncompatibleAdapter(f"adapter layer {name} is neither Linear nor Conv2d")
    if CLASS_EMBEDDING in saved:
        emb = model.base_model.model.class_embedding.modules_to_save["default"].weight
        out[CLASS_EMBEDDING_INPUT] = emb.detach().float()
    return {k: np.ascontiguousarray(torch.as_tensor(v).numpy(), dtype=np.float32)
            for k, v in out.items()}


def _parity(ldm: LatentDiffusion, merged: torch.nn.Module, tensors: dict[str, np.ndarray],
            preset: str, seed: int) -> dict[str, float]:
    """The swappable UNet fed ``tensors`` vs the merged UNet, on random inputs."""
    graph = SwappableUNet(ldm.unet, preset)
    unknown = sorted(set(tensors) - set(graph.input_names))
    if unknown:
        raise IncompatibleAdapter(f"adapter layers {unknown[:5]} are outside LoRA preset "
                                  f"{preset!r}; export with the preset it was trained with")
    defaults = graph.defaults()
    feed = [torch.from_numpy(tensors.get(n, defaults[n])) for n in graph.input_names]
    gen = torch.Generator().manual_seed(seed)
    n_train = int(ldm.scheduler.config.num_train_timesteps)
    x = torch.randn((3, *ldm.latent_shape), generator=gen)
    t = torch.randint(0, n_train, (3,), generator=gen)
    y = torch.arange(3) % (ldm.spec.num_classes + 1)
    with torch.no_grad():
        diff = (graph(x, t, y, *feed) - merged(x, t, class_labels=y).sample).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


def export_adapter(ldm: LatentDiffusion, adapter_dir: str | Path, out: str | Path,
                   privacy: PrivacyGuarantee | None = None, preset: str = "attention",
                   tolerance: float = 1e-4) -> Path:
    """Write the peft adapter in ``adapter_dir`` as one edge adapter file at ``out``.

    The file states ``privacy`` (unknown when None, never guessed) and the fingerprint of
    ``ldm``, the base it fits. Refused (:class:`ModelError`, nothing written) when the base
    graph fed these tensors differs from the merged torch UNet by more than ``tolerance``.
    """
    from safetensors.numpy import save as st_save

    from dpfl.shared.export.onnx_bundle import adapter_fingerprint, merge_adapter

    privacy = privacy or PrivacyGuarantee()
    adapter = Path(adapter_dir)
    merged = merge_adapter(ldm, adapter)
    tensors = adapter_tensors(ldm.unet, adapter)
    parity = _parity(ldm, merged, tensors, preset, seed=0)
    if not parity["max_abs_diff"] <= tolerance:
        raise ModelError(f"edge adapter differs from the merged UNet by max |diff| = "
                         f"{parity['max_abs_diff']:.3g} (tolerance {tolerance:g}); not written")
    meta: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "base_fingerprint": ldm.card.get("fingerprint") or ldm.fingerprint(),
        "adapter_fingerprint": adapter_fingerprint(adapter),
        "privacy": privacy.to_json(),
        "adapter_config": json.loads((adapter / "adapter_config.json").read_text()),
        "parity": {**parity, "against": "merged torch UNet", "lora_preset": preset},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    text = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}
    return atomic_write_bytes(out, st_save(tensors, metadata=text))
