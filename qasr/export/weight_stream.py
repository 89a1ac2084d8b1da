"""Graphs whose weights are read one at a time: how a bundle is written in bounded memory.

A `StreamedGraph` is an ONNX model whose structure is in memory while its large initializers are
not: each has a reader that yields its values, in blocks of rows, when they are written (from a
checkpoint tensor, a bundle's data file, or a transform of another reader). Writing goes block
by block, initializer by initializer, in graph order, into one external data file laid out as `onnx.save_model(save_as_external_data=True,
all_tensors_to_one_file=True)` lays it out (same order, same size rule, no padding), so the
bundle is the same while the peak memory is one block, whatever the model's size; a weight
that must be whole (to be transposed or quantized) is assembled from its blocks alone.

Free of torch: quantizing a bundle (on a Jetson, say) needs only onnx and ONNX Runtime.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from qasr.errors import BundleError
from qasr.export.onnx_files import DATA_THRESHOLD

Reader = Callable[[], Iterator[np.ndarray]]  # an initializer's rows, block by block, in order
BYTES_OVERHEAD = sys.getsizeof(b"")  # onnx compares sys.getsizeof(raw_data), not its length, with the threshold


@dataclass
class StreamedGraph:
    model: onnx.ModelProto
    readers: dict[str, Reader] = field(default_factory=dict)
    transposes: dict[str, str] = field(default_factory=dict)  # a matrix read as the transpose of another

    @classmethod
    def from_file(cls, path: Path) -> StreamedGraph:
        """A bundle's graph: its structure loaded, its external weights read from their file when needed."""
        model = onnx.load(str(path), load_external_data=False)
        readers: dict[str, Reader] = {}
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                info = {entry.key: entry.value for entry in tensor.external_data}
                readers[tensor.name] = partial(file_rows, path.parent / info["location"], int(info.get("offset", 0)),
                                               helper.tensor_dtype_to_np_dtype(tensor.data_type), tuple(tensor.dims))
        return cls(model, readers)

    def initializer(self, name: str) -> TensorProto | None:
        return next((t for t in self.model.graph.initializer if t.name == name), None)

    def values(self, name: str, transposed: bool = False) -> np.ndarray:
        """An initializer's values (a matrix's transpose if asked), read now and assembled from its
        blocks in one array (the caller drops it when done)."""
        tensor = self.initializer(name)
        if tensor is None:
            raise BundleError(f"initializer {name}: not in the graph")
        if name not in self.readers:
            if tensor.data_location == TensorProto.EXTERNAL:
                raise BundleError(f"initializer {name}: its values are not available")
            values = onnx.numpy_helper.to_array(tensor)
            return np.ascontiguousarray(values.T if transposed else values)
        dims = list(tensor.dims)
        blocks = self.readers[name]()
        first = next(blocks)
        if list(first.shape) == dims:  # read whole: no second copy
            return np.ascontiguousarray(first.T) if transposed else first
        whole = np.empty(dims[::-1] if transposed else dims, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type))
        row = 0
        for block in itertools.chain([first], blocks):
            if transposed:
                whole[:, row:row + len(block)] = block.T
            else:
                whole[row:row + len(block)] = block
            row += len(block)
        return whole

    def add_transpose(self, name: str, source: TensorProto) -> None:
        """A new initializer `name`: the transpose of matrix `source`, read from it when needed."""
        self.model.graph.initializer.append(TensorProto(name=name, data_type=source.data_type,
                                                        dims=list(source.dims)[::-1]))
        self.transposes[name] = source.name
        self.readers[name] = lambda: iter([self.values(source.name, transposed=True)])

    def column_blocks(self, name: str, transposed: bool = False) -> Iterator[np.ndarray]:
        """The columns of matrix `name` (or of its transpose) in blocks, each a contiguous [rows, n]
        array; a transpose's are its source's rows, so the head's 1.24 GB transpose is never whole."""
        if name in self.transposes:
            yield from self.column_blocks(self.transposes[name], not transposed)
        elif transposed and name in self.readers:
            for block in self.readers[name]():
                yield np.ascontiguousarray(block.T)
        else:
            yield self.values(name, transposed)

    def save(self, path: Path, data: DataFile) -> None:
        """Write every initializer not yet in `data`, then the structure to `path`."""
        for tensor in self.model.graph.initializer:
            if tensor.name in self.readers:
                data.store(tensor, self.readers[tensor.name]())
            elif tensor.data_location != TensorProto.EXTERNAL:
                data.store(tensor)
        onnx.save_model(self.model, str(path))


class DataFile:
    """One graph's external data file, appended to one initializer at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def store(self, tensor: TensorProto, blocks: Iterable[np.ndarray] | None = None) -> None:
        """Put `blocks` (or the tensor's inline bytes) where onnx.save_model would: the data file when
        large, else inline."""
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
        if blocks is None:
            if not tensor.HasField("raw_data"):
                return  # typed fields (never written by torch or the quantizer): left inline as onnx does
            blocks, dtype = [np.frombuffer(tensor.raw_data, dtype=np.uint8)], np.dtype(np.uint8)
            nbytes = blocks[0].nbytes
        elif nbytes + BYTES_OVERHEAD < DATA_THRESHOLD:
            _inline(tensor)
            tensor.raw_data = b"".join(np.ascontiguousarray(b, dtype=dtype).tobytes() for b in blocks)
            return
        if nbytes + BYTES_OVERHEAD < DATA_THRESHOLD:
            return
        offset = self.file.tell()
        for block in blocks:
            self.file.write(np.ascontiguousarray(block, dtype=dtype).data)
            del block
        if self.file.tell() - offset != nbytes:
            raise BundleError(f"initializer {tensor.name}: read {self.file.tell() - offset} bytes, "
                              f"its shape {list(tensor.dims)} takes {nbytes}")
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(self.file.tell() - offset))):
            tensor.external_data.add(key=key, value=value)


def file_rows(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...],
              block_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """A stored tensor's rows in blocks, read from its data file (not mapped: mapped pages that were
    read would count as this process's memory until unmapped)."""
    dtype = np.dtype(dtype)
    row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
    rows = shape[0] if shape else 1
    step = max(1, block_bytes // max(1, row * dtype.itemsize))
    with open(path, "rb") as f:
        for start in range(0, rows, step):
            count = min(step, rows - start)
            f.seek(offset + start * row * dtype.itemsize)
            block = np.fromfile(f, dtype=dtype, count=count * row)
            if block.size != count * row:
                raise BundleError(f"{path}: ends before the tensor stored at offset {offset}")
            yield block.reshape((count, *shape[1:]) if shape else ())


def _inline(tensor: TensorProto) -> None:
    """Forget where a tensor's values were stored (they are about to be put in the proto)."""
    tensor.ClearField("data_location")
    del tensor.external_data[:]
