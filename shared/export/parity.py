"""Parity of exported ONNX graphs with torch: random inputs at several batch sizes, the
torch outputs for them computed once, and max/mean |ONNX - torch| per graph."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfl.shared.errors import ModelError
from dpfl.shared.ldm.models import LatentDiffusion

__all__ = ["Case", "measure_parity", "random_inputs", "session", "torch_references"]


def session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def random_inputs(ldm: LatentDiffusion, batch: int, gen: torch.Generator
                   ) -> dict[str, dict[str, torch.Tensor]]:
    shape = (batch, *ldm.latent_shape)
    n_train = int(ldm.scheduler.config.num_train_timesteps)
    return {
        "unet": {"sample": torch.randn(shape, generator=gen),
                 "timestep": torch.randint(0, n_train, (batch,), generator=gen),
                 "class_labels": torch.randint(0, ldm.spec.num_classes + 1, (batch,),
                                               generator=gen)},
        "decoder": {"latents": torch.randn(shape, generator=gen)},
    }


Case = tuple[str, dict[str, np.ndarray], np.ndarray]  # (graph, ONNX feed, torch output)


def torch_references(references: dict[str, Callable[..., torch.Tensor]], ldm: LatentDiffusion,
                     batch_sizes: tuple[int, ...], seed: int) -> list[Case]:
    """Random inputs at each batch size and the torch outputs for them (computed once)."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for b in batch_sizes:
        inputs = random_inputs(ldm, b, gen)
        for key, ref in references.items():
            with torch.no_grad():
                out = ref(*inputs[key].values()).float().numpy()
            cases.append((key, {k: v.numpy() for k, v in inputs[key].items()}, out))
    return cases


def measure_parity(paths: dict[str, Path], cases: list[Case]) -> dict[str, dict[str, float]]:
    """Max/mean abs difference of each ONNX graph vs its torch outputs, over all cases."""
    sessions = {k: session(p) for k, p in paths.items()}
    result: dict[str, dict[str, float]] = {}
    for key, feed, ref in cases:
        got = sessions[key].run(None, feed)[0]
        if got.shape != ref.shape:
            raise ModelError(f"{paths[key].name} returned shape {got.shape} where torch gives "
                             f"{ref.shape}; the export is broken")
        diff = np.abs(got.astype(np.float64) - ref)
        entry = result.setdefault(key, {"max_abs_diff": 0.0, "mean_abs_diff": 0.0})
        entry["max_abs_diff"] = max(entry["max_abs_diff"], float(diff.max()))
        entry["mean_abs_diff"] = max(entry["mean_abs_diff"], float(diff.mean()))
    return result
