"""Tracing the reference model to ONNX without holding its weights.

TorchScript's exporter needs a module with parameters, and in fp32 the 1.7B's are 7 GB; the
export that loaded them also held their protobuf copy and the reloaded graph (20 GB at its peak).
Here every parameter lies over one private anonymous memory map: pages that are never written
read as zeros and take no memory, so tracing (tiny example inputs) and the exporter's constant
folding (its transposes are views) touch almost nothing. The exporter's passes run as they are,
with two hooks: ONNX shape inference sees the weights by their types only (it would copy each one
a node reads into a protobuf), and the last pass over the initializers (their deduplication):

- deduplication merges initializers whose values are equal. Each stand-in parameter carries, in
  its first two elements, a fingerprint of its checkpoint tensor, so exactly the tensors that are
  equal in the checkpoint are merged, as when the real weights are traced;
- after it, every initializer that is a parameter, or a view of one, is recorded (which checkpoint
  tensor, which shape, strides and offset) and handed to the writer as an empty tensor, so the
  file torch writes is the graph's structure alone.

Each recorded view becomes a reader of its checkpoint tensor (qasr.export.weight_stream), called
when that initializer is written: one tensor in memory at a time, converted to fp32 on its own.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qasr.errors import BundleError
from qasr.export.weight_stream import StreamedGraph
from qasr.models.checkpoint import official_name, read_rows, read_tensor
from qasr.models.config import ModelConfig
from qasr.models.thinker import Thinker

PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class View:
    """An initializer as a view of a checkpoint tensor."""

    tensor: str
    file: Path
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def read(self) -> Iterator[np.ndarray]:
        """The view's rows: block by block when it is the tensor itself, else whole."""
        if self.offset == 0 and self.stride == _contiguous(self.shape):
            for block in read_rows(self.file, self.tensor):
                yield block.numpy()
            return
        values = read_tensor(self.file, self.tensor)
        yield torch.as_strided(values, self.shape, self.stride, self.offset).contiguous().numpy()


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class StandIn:
    """A Thinker whose parameters are zero pages marked with their checkpoint tensors' fingerprints."""

    def __init__(self, config: ModelConfig, files: dict[str, Path]):
        with _parameters_on_meta():
            self.model = Thinker(config).eval()
        params = dict(self.model.named_parameters())  # a tied head is listed once, as the embedding
        self.arena = mmap.mmap(-1, sum(_pages(p) for p in params.values()),
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.owners: dict[int, tuple[str, Path]] = {}
        replaced, offset = {}, 0
        for name, param in params.items():
            tensor = official_name(name)
            values = torch.frombuffer(self.arena, dtype=torch.float32, count=param.numel(), offset=offset)
            values[:2] = torch.from_numpy(fingerprint(files[tensor], tensor))[:param.numel()]
            replaced[id(param)] = nn.Parameter(values.view(param.shape))
            self.owners[values.untyped_storage().data_ptr()] = (tensor, files[tensor])
            offset += _pages(param)
        for module in self.model.modules():
            for key, param in module._parameters.items():
                if param is not None:
                    module._parameters[key] = replaced[id(param)]

    @contextmanager
    def recording(self, views: dict[str, View]) -> Iterator[None]:
        """While exporting: record each parameter initializer's view and leave it empty in the file."""
        deduplicate, infer = (torch._C._jit_pass_onnx_deduplicate_initializers,
                              torch._C._jit_pass_onnx_graph_shape_type_inference)

        def record(graph, params, training):
            kept = {}
            for name, value in deduplicate(graph, params, training).items():
                owner = self._owner(value)
                if owner is None:
                    kept[name] = value
                    continue
                views[name] = View(owner[0], owner[1], tuple(value.shape), tuple(value.stride()),
                                   value.storage_offset())
                kept[name] = torch.empty(0, dtype=value.dtype)
            return kept

        def shapes_only(graph, params, opset):
            """ONNX shape inference copies every initializer a node reads into a protobuf (twice the
            embedding, at once); weights' values never decide a shape, and their shapes are in the
            graph's types, so they are left out."""
            return infer(graph, {name: value for name, value in params.items() if self._owner(value) is None}, opset)

        torch._C._jit_pass_onnx_deduplicate_initializers = record
        torch._C._jit_pass_onnx_graph_shape_type_inference = shapes_only
        try:
            yield
        finally:
            torch._C._jit_pass_onnx_deduplicate_initializers = deduplicate
            torch._C._jit_pass_onnx_graph_shape_type_inference = infer

    def _owner(self, value: torch.Tensor) -> tuple[str, Path] | None:
        """The checkpoint tensor (name, file) that `value` is a view of, if any."""
        return self.owners.get(value.untyped_storage().data_ptr()) if value.device.type == "cpu" else None

    def streamed(self, model, module: nn.Module, views: dict[str, View]) -> StreamedGraph:
        """The traced structure `model` with a checkpoint reader for each recorded initializer."""
        used = {view.tensor for view in views.values()}
        params = {self.owners[p.untyped_storage().data_ptr()][0] for p in module.parameters()}
        if params - used:
            raise BundleError(f"the traced graph does not read {sorted(params - used)[0]} as a weight; "
                              "qasr/export/trace.py cannot stream this graph's weights")
        for tensor in model.graph.initializer:
            if tensor.name in views:
                tensor.dims[:] = views[tensor.name].shape
                tensor.ClearField("raw_data")
        return StreamedGraph(model, {name: view.read for name, view in views.items()})


def _pages(param: torch.Tensor) -> int:
    return -(-param.numel() * 4 // PAGE) * PAGE


def fingerprint(file: Path, name: str) -> np.ndarray:
    """Two floats in (0, 1] from the sha256 of the tensor's fp32 values (-0 read as 0, as
    torch.equal does), so stand-ins are equal exactly where the checkpoint's tensors are."""
    digest = hashlib.sha256()
    for block in read_rows(file, name):
        digest.update(block.add_(0.0).numpy().data)
    words = np.frombuffer(digest.digest()[:8], dtype=np.uint32).astype(np.float64)
    return ((words + 1) / 2**32).astype(np.float32)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, initialisers run on
    nothing); buffers, which are computed and not in the checkpoint, stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"))
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
