"""fp32 graphs -> int8 / int4 weight-only graphs, through ONNX Runtime's own quantizer, weight by weight.

A pass over the canonical fp32 graphs (they stay the source of truth), from an fp32 bundle or
straight from a checkpoint's traced graphs (qasr.export.onnx_export), one weight in memory at a
time (qasr.export.weight_stream): every weight matrix
of the decoder (or aligner), the output head included, becomes a `MatMulNBits` (block-wise along
K, one scale per block, ONNX Runtime's `matmul_nbits_quantizer`), and the embedding gather becomes
a `GatherBlockQuantized`. The graphs keep their contracts (inputs, outputs, fp32 logits), so the
greedy loop, streaming and the backends run them unchanged.

The tied head is one table stored once: the quantizer packs the head as B [V, k_blocks, blob]
(rows of the table, blocks along the hidden size), which is byte for byte the uint8 layout
`GatherBlockQuantized` reads as [V, hidden * bits / 8]; the gather gets a second initializer name
over the same bytes of the data file, and shares the scales and zero points outright.

Settings (docs/benchmarks.md, "Choosing the settings", has the measurements behind them):
- int4: block 128, asymmetric (a zero point per block), accuracy_level 4;
- int8: block 128, symmetric, accuracy_level 4.
accuracy_level 4 lets MLAS quantize the activations to int8 per block and run VNNI dot products;
fp32 activations (0) decode several times slower. Blocks of 128 decode faster than blocks of 32
on this CPU for a somewhat larger error; asymmetric int4 is both faster and closer than
symmetric at 128.
The audio encoder and projector stay fp32 unless `encoder_weights="int8"`: they are compute-bound
and run once per clip, and low-bit encoders are known to drift, so 8 bits at least. A quantized
encoder runs its conv stack one chunk at a time (qasr.export.conv_scan).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from qasr.errors import BundleError, UsageError
from qasr.export.conv_scan import scan_conv_chunks
from qasr.export.onnx_files import graph_contract, unalias_shared_weights
from qasr.export.weight_stream import DataFile, StreamedGraph
from qasr.memory import return_freed_memory
from qasr.runtime.bundle import AUDIO_GRAPHS, MANIFEST, Bundle, staged
from qasr.version import __version__

WEIGHTS = ("fp32", "int8", "int4")
ENCODER_WEIGHTS = ("fp32", "int8")
QUANTIZER = "onnxruntime.quantization.matmul_nbits_quantizer"
SKIPPED = ("derived", "engines", "prepacked")  # products of the fp32 graphs: rebuilt, never copied
PART_BYTES = 8 << 20  # the most packed weight bytes one MatMulNBits holds (split_wide_matmuls)
PART_ROWS = 256  # a part's rows: a multiple of this, so MLAS tiles its columns as it tiled the whole weight's


@dataclass(frozen=True)
class Scheme:
    """One weight-only format: MatMulNBits' bits, block size, symmetry and accuracy level."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int


SCHEMES = {"int8": Scheme(8, 128, True, 4), "int4": Scheme(4, 128, False, 4)}
TENSORRT_INT4_BLOCK = 128  # the block size TensorRT's int4 weight-only examples use (unverified here)


def quantize_bundle(source: str | Path, out: str | Path, weights: str = "int4", encoder_weights: str = "fp32",
                    progress: Callable[[str], None] = print, reference: bool = True) -> Path:
    """Write `out`: the fp32 bundle `source` with its weights in `weights` (and the audio graphs'
    in `encoder_weights`). `reference` records `source` as the bundle `qasr verify` compares with.

    Staged beside `out` and moved into place when complete, like the export itself.
    """
    check_weights(weights, encoder_weights)
    if weights == encoder_weights == "fp32":
        raise UsageError(f"{source}: nothing to quantize (give --weights int8 or int4, or --encoder-weights int8)")
    bundle = Bundle.load(source)
    if bundle.manifest.get("precision", "fp32") != "fp32" or "weights" in bundle.manifest:
        raise BundleError(f"{bundle.path}: already quantized; quantize from the fp32 bundle it came from")
    out = Path(out)
    if out.resolve() == bundle.path.resolve():
        raise UsageError(f"{out}: write the quantized bundle beside its fp32 source, not over it (verify needs both)")
    return_freed_memory()
    manifest = json.loads(json.dumps(bundle.manifest))
    settings = {}
    with staged(out) as staging:
        for name, entry in bundle.manifest["graphs"].items():
            precision = encoder_weights if name in AUDIO_GRAPHS else weights
            if precision == "fp32":
                for file in [entry["file"], *entry.get("data", [])]:
                    shutil.copyfile(bundle.path / file, staging / file)
                continue
            progress(f"quantizing {name} to {precision}")
            contract, settings[name] = quantize_graph(
                StreamedGraph.from_file(bundle.graph_path(name)), staging / entry["file"], SCHEMES[precision])
            kept = {key: entry[key] for key in ("layout", "qk_norm") if key in entry}  # the fused decoder's
            manifest["graphs"][name] = {**contract, **kept}
        _copy_other_files(bundle, staging)
        manifest = quantized_manifest(manifest, weights, settings, str(bundle.path.resolve()) if reference else None)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


def quantized_manifest(manifest: dict, weights: str, settings: dict, reference: str | None) -> dict:
    """An fp32 manifest whose graphs' contracts are already the quantized ones, marked as quantized:
    the settings per graph, the quantizer that wrote them, and the fp32 bundle `qasr verify` compares
    with (None when the checkpoint was quantized directly)."""

    manifest = {**manifest, "precision": weights, "weights": settings}
    manifest["quantizer"] = {"name": QUANTIZER, "onnxruntime": onnxruntime.__version__, "qasr": __version__}
    manifest["reference"] = reference
    return manifest


def check_weights(weights: str, encoder_weights: str) -> None:
    if weights not in WEIGHTS:
        raise UsageError(f"weights {weights!r}: choose from {', '.join(WEIGHTS)}")
    if encoder_weights not in ENCODER_WEIGHTS:
        raise UsageError(f"encoder weights {encoder_weights!r}: choose from {', '.join(ENCODER_WEIGHTS)} "
                         "(low-bit audio encoders drift: 8 bits at least)")


def _quantizer():
    """ONNX Runtime's quantizer module. Importing it calls logging.basicConfig(level=INFO), which
    would make every library's INFO lines appear; the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    matmul_nbits_quantizer.logger.setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _copy_other_files(bundle: Bundle, staging: Path) -> None:
    """The tokenizer files and whatever else the bundle holds beside its graphs and manifest."""
    graph_files = {f for e in bundle.manifest["graphs"].values() for f in [e["file"], *e.get("data", [])]}
    for item in bundle.path.iterdir():
        if item.is_file() and item.name not in graph_files | {MANIFEST}:
            shutil.copyfile(item, staging / item.name)
        elif item.is_dir() and item.name not in SKIPPED:
            shutil.copytree(item, staging / item.name)


def quantize_graph(graph: StreamedGraph, dst: Path, scheme: Scheme) -> tuple[dict, dict]:
    """One fp32 graph -> its quantized copy `dst` with its own data file; (contract, settings).

    Weight by weight: each weight is read, packed by ONNX Runtime's block quantizer into the node
    its MatMulNBitsQuantizer writes, and its packed form goes to the data file at once, so memory
    holds one fp32 weight and the graph's structure, never the graph's weights.
    """
    model = graph.model
    unalias_shared_weights(model)  # a tied head and the embedding: one initializer, quantized once
    block = _block_size(model, scheme.block_size)
    gemms_to_matmuls(model, graph)
    scheme = Scheme(scheme.bits, block, scheme.symmetric, scheme.accuracy_level)
    data = dst.with_name(dst.name + ".data")
    with DataFile(data) as out:
        quantize_matmuls(graph, out, scheme)
        aliases = quantize_gathers(graph, out, scheme)
        graph.save(dst, out)
    saved = onnx.load(str(dst), load_external_data=False)  # the graph as written, its weights in the data file
    _add_aliases(saved, aliases, dst)
    split_wide_matmuls(saved)
    scan_conv_chunks(saved)  # the encoder's conv stack, one chunk at a time (qasr.export.conv_scan)
    onnx.save_model(saved, str(dst))
    if not any(node.op_type == "SimplifiedLayerNormalization" for node in model.graph.node):
        onnx.checker.check_model(str(dst))  # it knows no ORT ops in the ONNX domain (the fused decoder's)
    settings = {**asdict(scheme), "format": "MatMulNBits",
                "quantized": _count_ops(saved), "tied_table_stored_once": bool(aliases)}
    return {"file": dst.name, "data": [data.name], **graph_contract(saved)}, settings


def quantize_matmuls(graph: StreamedGraph, out: DataFile, scheme: Scheme) -> None:
    """MatMul(x, W) on a 2-D float weight -> MatMulNBits, as ONNX Runtime's MatMulNBitsQuantizer
    (QOperator format) writes it: W packed to `<W>_Q<bits>` [N, K blocks, blob], `<W>_scales`,
    `<W>_zero_points` when asymmetric, node `<name>_Q<bits>`; each written to `out` at once."""
    model = graph.model
    packer = _packer(scheme)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        k, n = weight.dims
        packed, scales, zero_points = _pack(packer, graph.column_blocks(weight.name))
        stored = [(packed, f"{weight.name}_Q{scheme.bits}"), (scales, f"{weight.name}_scales")]
        stored += [] if scheme.symmetric else [(zero_points, f"{weight.name}_zero_points")]
        for values, name in stored:
            model.graph.initializer.append(numpy_helper.from_array(values, name))
            out.store(model.graph.initializer[-1])
        del packed, scales, zero_points
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": scheme.bits, "block_size": scheme.block_size}
        attrs.update({"accuracy_level": scheme.accuracy_level} if scheme.accuracy_level else {})
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *(name for _, name in stored)], [node.output[0]],
                                      name=f"{node.name}_Q{scheme.bits}" if node.name else "", domain="com.microsoft",
                                      **attrs))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _pack(packer, blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed, scales, zero points) of a matrix given as blocks of its columns: each column is
    quantized on its own (blocks run along K), so packing block by block gives the same bytes."""
    parts = [packer.qbits_block_quant(block) for block in blocks]
    packed, scales, zero_points = (np.concatenate(part) for part in zip(*parts))
    return packed, scales, zero_points


def _packer(scheme: Scheme):
    """ONNX Runtime's block quantizer (the kernel its MatMulNBitsQuantizer calls) for `scheme`."""
    ort_quantizer = _quantizer()
    return ort_quantizer.DefaultWeightOnlyQuantizer(ort_quantizer.DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=scheme.symmetric, bits=scheme.bits,
        accuracy_level=scheme.accuracy_level))


def qdq_int4(model: onnx.ModelProto, block_size: int = TENSORRT_INT4_BLOCK) -> onnx.ModelProto:
    """The engine path's weight-only int4 (`qasr build --weights int4`): every weight MatMul, the head
    included, as DequantizeLinear(int4, scale, axis 0, block_size) -> MatMul, written by the same
    quantizer in its QDQ format, symmetric (TensorRT takes no zero points). Opset 21 (int4 and
    blocked DequantizeLinear). The embedding gather keeps its float table (a tied one is then held
    twice: float for the gather, int4 for the head). `model` must hold its weights (external data loaded).
    """
    gemms_to_matmuls(model)
    quantizer = _quantizer()
    quantizer.logger.setLevel(logging.ERROR)  # its warnings that it raises the opset to 21: wanted here
    run = quantizer.MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                         quant_format=_quant_format().QDQ, op_types_to_quantize=("MatMul",))
    run.process()
    return run.model.model


def _quant_format():
    from onnxruntime.quantization import QuantFormat

    return QuantFormat


def _block_size(model: onnx.ModelProto, wanted: int) -> int:
    """`wanted`, halved until it divides every embedding table's width (a shared table needs whole
    blocks), but not below 16, MatMulNBits' smallest; the released models' 1024 and 2048 keep 128."""
    widths = [t.dims[1] for t in _gather_tables(model).values()]
    block = wanted
    while block > 16 and any(w % block for w in widths):
        block //= 2
    return block


def _gather_tables(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Embedding tables: 2-D float initializers read by a Gather on axis 0."""
    inits = {t.name: t for t in model.graph.initializer}
    tables = {}
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is not None and len(table.dims) == 2 and table.data_type == TensorProto.FLOAT and axis == 0:
            tables[table.name] = table
    return tables


def gemms_to_matmuls(model: onnx.ModelProto, graph: StreamedGraph | None = None) -> None:
    """Gemm(x, W, b, transB=1) on a weight initializer -> MatMul(x, W^T) (+ b), which the quantizer reads.

    W^T is a new initializer `<W>.t`; the quantizer replaces it by its packed form, whose rows are
    the rows of W again (so a tied head packs to exactly the embedding table's layout). In a
    streamed `graph` W^T is read when needed; otherwise `model` holds its weights and W^T is made now.
    """
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if weight is None or not plain or len(weight.dims) != 2:
            nodes.append(node)
            continue
        name = f"{weight.name}.t"
        if name not in inits:
            transposed = bool(attrs.get("transB", 0))
            if graph is not None and transposed:
                graph.add_transpose(name, weight)
                inits[name] = graph.initializer(name)
            elif graph is not None:  # W as it is, under its MatMul name, read as W is
                copy = TensorProto()
                copy.CopyFrom(weight)
                copy.name = name
                graph.model.graph.initializer.append(copy)
                if weight.name in graph.readers:
                    graph.readers[name] = graph.readers[weight.name]
                inits[name] = graph.initializer(name)
            else:
                matrix = numpy_helper.to_array(weight)
                inits[name] = numpy_helper.from_array(np.ascontiguousarray(matrix.T if transposed else matrix), name)
                model.graph.initializer.append(inits[name])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}/matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}/Add"))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)


def quantize_gathers(graph: StreamedGraph, out: DataFile, scheme: Scheme) -> dict[str, str]:
    """Embedding Gathers -> GatherBlockQuantized; returns {alias: packed head weight} for tied tables.

    A table the head also reads takes the head's packed weight, scales and zero points (the alias
    is written after saving, over the same bytes); an untied one is packed here by the quantizer's
    own block kernel, in the same layout, and written to `out` at once.
    """
    model = graph.model
    inits = {t.name: t for t in model.graph.initializer}
    tables = _gather_tables(model)
    aliases: dict[str, str] = {}
    packer = _packer(scheme)
    nodes = []
    for node in model.graph.node:
        table = tables.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.dims[1] % scheme.block_size:
            nodes.append(node)
            continue
        rows, width = table.dims
        packed_name = f"{table.name}.t_Q{scheme.bits}"
        if packed_name in inits:  # tied: the quantized head
            data = f"{table.name}_Q{scheme.bits}.gather"
            aliases[data] = packed_name
            stem = f"{table.name}.t"
        else:
            packed, scales, zero_points = _pack(packer, graph.column_blocks(table.name, transposed=True))
            data, stem = f"{table.name}_Q{scheme.bits}", table.name
            for values, name in ((packed.reshape(rows, width * scheme.bits // 8), data), (scales, f"{stem}_scales"),
                                 (zero_points, f"{stem}_zero_points")):
                model.graph.initializer.append(numpy_helper.from_array(values, name))
                out.store(model.graph.initializer[-1])
            del packed, scales, zero_points
        inputs = [data, node.input[1], f"{stem}_scales"] + ([] if scheme.symmetric else [f"{stem}_zero_points"])
        nodes.append(helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=f"{node.name}_Q",
                                      domain="com.microsoft", bits=scheme.bits, block_size=scheme.block_size,
                                      gather_axis=0, quantize_axis=1))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    used = {name for n in model.graph.node for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used or t.name in aliases.values()]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    return aliases


def _add_aliases(model: onnx.ModelProto, aliases: dict[str, str], path: Path) -> None:
    """Give each tied gather its 2-D name over the head's packed bytes in the data file."""
    inits = {t.name: t for t in model.graph.initializer}
    for alias, packed_name in aliases.items():
        packed = inits[packed_name]
        if packed.data_location != TensorProto.EXTERNAL:
            raise BundleError(f"{path}: {packed_name} was not written to the data file; cannot share it")
        tensor = TensorProto(name=alias, data_type=packed.data_type,
                             dims=[packed.dims[0], int(np.prod(packed.dims[1:]))])
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.extend(packed.external_data)
        model.graph.initializer.append(tensor)


def split_wide_matmuls(model: onnx.ModelProto, part_bytes: int = PART_BYTES) -> None:
    """Each MatMulNBits whose packed weight passes `part_bytes` (the head: 155 MB in int4 on the 1.7B)
    -> one per range of its output rows, over views of the same bytes, outputs concatenated.

    Why: ONNX Runtime repacks a weight into its kernel's layout when a session opens, while the
    original is still mapped, so the largest weight is briefly held twice: that moment was the
    1.7B int4 run's peak memory (docs/benchmarks.md, "The 1.7B on a small machine"). A part is
    rows [a, b) of the weight, its scales and zero points (all stored row by row), described as
    external data at an offset into the same file, as the tied gather's alias is, so nothing is
    stored twice and each output column is the same dot product as before. Parts of 8 MB leave a
    layer's weights whole (6 MB at most) and cut the 1.7B's head into 19: its decoder then peaks
    at 1.06 GB while it loads instead of 1.09 GB with parts of 32 MB (and 1.26 GB unsplit), at the
    same decode speed.
    """
    inits = {t.name: t for t in model.graph.initializer}
    nodes, changed = [], False
    for node in model.graph.node:
        parts = _row_parts(node, inits, part_bytes)
        if not parts:
            nodes.append(node)
            continue
        changed = True
        outputs = []
        for i, (start, rows) in enumerate(parts):
            views = [_row_view(inits[name], start, rows, _attr(node, "N"), f"{name}.rows{i}")
                     for name in node.input[1:]]
            model.graph.initializer.extend(views)
            outputs.append(f"{node.output[0]}/rows{i}")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} | {"N": rows}
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], *(v.name for v in views)], [outputs[-1]],
                                          name=f"{node.name}/rows{i}", domain="com.microsoft", **attrs))
        nodes.append(helper.make_node("Concat", outputs, [node.output[0]], name=f"{node.name}/concat", axis=-1))
    if not changed:
        return
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    used = {name for n in model.graph.node for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def _row_parts(node: onnx.NodeProto, inits: dict[str, TensorProto], part_bytes: int) -> list[tuple[int, int]]:
    """(first row, rows) of each part of a MatMulNBits too wide to pack in one piece; [] to keep it whole.
    Only nodes whose every weight input lies in the data file can be split into views."""
    if node.op_type != "MatMulNBits" or node.input[1] not in inits:
        return []
    weights = [inits[name] for name in node.input[1:] if name in inits]
    if len(weights) < len(node.input) - 1 or any(w.data_location != TensorProto.EXTERNAL for w in weights):
        return []
    length = int(next(e.value for e in weights[0].external_data if e.key == "length"))
    if length <= part_bytes:
        return []
    n = _attr(node, "N")
    rows = -(-n // -(-length // part_bytes))
    rows = -(-rows // PART_ROWS) * PART_ROWS  # whole kernel tiles: only the last part ends where the whole did
    return [(start, min(rows, n - start)) for start in range(0, n, rows)]


def _row_view(tensor: TensorProto, start: int, rows: int, n: int, name: str) -> TensorProto:
    """Rows [start, start + rows) of a weight stored row by row ([N, ...], or flat [N x per-row])."""
    region = {e.key: e.value for e in tensor.external_data}
    row_bytes = int(region["length"]) // n
    dims = [rows, *tensor.dims[1:]] if tensor.dims[0] == n else [rows * (int(np.prod(tensor.dims)) // n)]
    view = TensorProto(name=name, data_type=tensor.data_type, dims=dims)
    view.data_location = TensorProto.EXTERNAL
    offset = int(region.get("offset", 0)) + start * row_bytes
    for key, value in (("location", region["location"]), ("offset", str(offset)), ("length", str(rows * row_bytes))):
        view.external_data.add(key=key, value=value)
    return view


def _count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Quantized ops, and the ops that still read a float weight matrix (none in a decoder)."""
    inits = {t.name for t in model.graph.initializer if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT}
    counts = {"MatMulNBits": 0, "GatherBlockQuantized": 0, "float_weights": 0}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
        elif node.op_type in ("MatMul", "Gemm", "Gather") and any(i in inits for i in node.input):
            counts["float_weights"] += 1
    return counts
