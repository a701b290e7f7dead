"""Run directories: resolved configuration, package versions, JSONL metrics, images."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from dpfl.shared.io import append_jsonl, atomic_write_json, read_jsonl

PACKAGES = ("dpfl", "torch", "diffusers", "peft", "opacus", "flwr", "onnx", "onnxruntime",
            "numpy", "safetensors")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class RunDir:
    """A folder holding everything one run produced.

    ``config.json`` (resolved config, versions, start time), ``metrics.jsonl`` (one line per
    logged step/round), and whatever images or models the run writes beside them.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"

    def write_config(self, config: Any, **extra: Any) -> None:
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        atomic_write_json(self.path / "config.json", {
            "config": cfg, "versions": versions(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra})

    def log(self, **record: Any) -> None:
        append_jsonl(self.metrics_path, record)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path) if self.metrics_path.exists() else []

    def __truediv__(self, name: str) -> Path:
        return self.path / name
