"""Edge adapters: a fine-tuned LoRA adapter as one small file that a device applies to the
base bundle it already holds, instead of receiving a whole merged UNet again.

The file is safetensors (a JSON header and raw data; no code objects), read with the
safetensors library's numpy side, so a device needs no torch.
It holds only float32 tensors named after the base graph's adapter inputs (see
:mod:`dpfl.shared.export.lora_graph`):

``lora.<module>.down``   Linear: (in, rank); Conv2d: (rank, in, kh, kw)
``lora.<module>.up``     Linear: (rank, out); Conv2d: (out, rank, 1, 1); LoRA scale folded in
``class_embedding``      (classes + 1, dim), when the adapter trained the class embedding

and string metadata (``__metadata__``): ``format`` (:data:`ADAPTER_FORMAT`),
``base_fingerprint`` (the base model it was trained on and fits), ``privacy`` (the
``privacy.json`` content, :mod:`dpfl.shared.privacy.guarantee`), ``adapter_fingerprint``
(of the peft adapter directory it came from), ``adapter_config``, ``parity`` (measured
against the merged torch UNet at export) and ``created``. The one writer is
:func:`dpfl.shared.export.lora_graph.export_adapter`; the one reader is :meth:`EdgeAdapter.load`.

numpy only: never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpfl.shared.errors import IncompatibleAdapter

ADAPTER_FORMAT = "dpfl-edge-adapter/1"
ADAPTER_SUFFIX = ".safetensors"
LORA_PREFIX = "lora."
CLASS_EMBEDDING_INPUT = "class_embedding"
JSON_FIELDS = ("privacy", "adapter_config", "parity")  # metadata values that hold JSON


@dataclass(frozen=True)
class EdgeAdapter:
    """An opened edge adapter: its tensors (graph input name -> float32 array) and metadata."""

    path: Path
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> EdgeAdapter:
        """Read with the safetensors library's numpy side (no torch); everything in the file
        is checked before use: the metadata, float32 dtype, finite values."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise IncompatibleAdapter(f"cannot read adapter file {p}: no such file")
        try:
            with safe_open(str(p), framework="np") as f:
                meta = _metadata(f.metadata(), p)
                tensors = {name: _tensor(name, f.get_tensor(name), p) for name in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise IncompatibleAdapter(f"{p} is not a readable safetensors adapter file: "
                                      f"truncated or corrupt ({exc})") from exc
        if not tensors:
            raise IncompatibleAdapter(f"adapter file {p} holds no tensors")
        return cls(p, tensors, meta)

    @property
    def base_fingerprint(self) -> str:
        return str(self.meta["base_fingerprint"])

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("adapter_fingerprint")

    def check_fits(self, base_fingerprint: str | None, inputs: dict[str, list[Any]]) -> None:
        """Refuse (:class:`IncompatibleAdapter`) unless this adapter was made for the base with
        ``base_fingerprint`` and every tensor matches a graph input of ``inputs`` (name ->
        shape, symbolic dimensions as strings or None)."""
        if base_fingerprint != self.base_fingerprint:
            raise IncompatibleAdapter(
                f"adapter {self.path} was made for base model {self.base_fingerprint}, but this "
                f"bundle's base is {base_fingerprint}; export the adapter against this base "
                "(dpfl-server export-adapter) or use the bundle of the base it was trained on")
        unknown = sorted(set(self.tensors) - set(inputs))
        if unknown:
            raise IncompatibleAdapter(
                f"adapter {self.path} adapts layers this bundle's UNet has no adapter inputs for: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}; export the base bundle with "
                "the LoRA preset the adapter was trained with (--lora-preset)")
        for name, arr in self.tensors.items():
            want = inputs[name]
            fits = len(want) == arr.ndim and all(
                not isinstance(w, int) or w == a for w, a in zip(want, arr.shape))
            if not fits:
                raise IncompatibleAdapter(f"adapter tensor {name!r} has shape {list(arr.shape)}, "
                                          f"the bundle's UNet expects {want}")
        for name in (n for n in self.tensors if n.endswith(".down")):
            up = self.tensors.get(name[:-len(".down")] + ".up")
            if up is None or _rank(name, self.tensors[name]) != _rank(name, up, up=True):
                raise IncompatibleAdapter(f"adapter {self.path}: {name!r} has no matching '.up' "
                                          "tensor of the same rank")


def _rank(name: str, arr: np.ndarray, up: bool = False) -> int:
    conv = arr.ndim == 4
    if up:
        return int(arr.shape[1] if conv else arr.shape[0])
    return int(arr.shape[0] if conv else arr.shape[1])


def _metadata(meta: Any, p: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise IncompatibleAdapter(
            f"{p} is not a dpfl edge adapter (metadata format {found!r}, expected "
            f"{ADAPTER_FORMAT!r}); a peft adapter directory must first be exported with "
            "'dpfl-server export-adapter'")
    out: dict[str, Any] = dict(meta)
    for key in JSON_FIELDS:
        if key in out:
            try:
                out[key] = json.loads(out[key])
            except (TypeError, json.JSONDecodeError) as exc:
                raise IncompatibleAdapter(f"{p}: metadata {key!r} is not JSON ({exc})") from exc
    if not isinstance(out.get("base_fingerprint"), str) or not isinstance(out.get("privacy"), dict):
        raise IncompatibleAdapter(f"{p} lacks its base fingerprint or privacy metadata; refusing "
                                  "an adapter whose origin and guarantee are unknown")
    return out


def _tensor(name: str, arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.dtype != np.float32:
        raise IncompatibleAdapter(f"{p}: tensor {name!r} is {arr.dtype}; edge adapters are "
                                  "float32")
    if not np.isfinite(arr).all():
        raise IncompatibleAdapter(f"{p}: tensor {name!r} holds non-finite values (NaN/inf)")
    return np.ascontiguousarray(arr)
