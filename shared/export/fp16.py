"""The float16 variant of an fp32 ONNX graph (inputs and outputs stay float32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpfl.shared.errors import ModelError

__all__ = ["write_fp16"]


def _toposort(graph: Any) -> None:
    """Reorder ``graph.node`` topologically (the fp16 converter appends its input casts)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(range(len(graph.node))), []
    while pending:
        ready = [k for k in pending if all(i in known for i in graph.node[k].input)]
        if not ready:
            raise ModelError("fp16 conversion produced a graph with a cycle or a missing input")
        for k in ready:
            known.update(graph.node[k].output)
        ordered += ready
        done = set(ready)
        pending = [k for k in pending if k not in done]
    nodes = [graph.node[k] for k in ordered]
    del graph.node[:]
    graph.node.extend(nodes)


def write_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _toposort(model.graph)
    onnx.save(model, str(dst))
