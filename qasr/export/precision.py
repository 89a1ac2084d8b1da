"""fp32 bundle graphs -> strongly typed bf16 / fp16 graphs for TensorRT (and a portable fp32 copy).

The canonical fp32 graphs stay the source of truth: this pass rewrites them instead of tracing
torch again, so every precision derives from the very graph the CPU parity tests check, and
TensorRT's strongly typed mode takes each tensor's type from the file. The rules:

- low precision (bf16, or fp16) for everything computed from activations or weights: MatMul,
  Gemm, Conv, the embedding Gather, elementwise ops, and the KV cache (`past_*`, `new_kv`);
- fp32 islands: RMSNorm statistics (x^2, mean, rsqrt, x * rsqrt), LayerNormalization, Softmax,
  ArgMax and the `logits` output; every other graph input and output stays fp32, so the host
  never handles bf16;
- index math stays fp32: float ops fed only by integers and constants (RoPE angles from
  positions, masks cast to float), since bf16 cannot even count past 256;
- fp16 only: the residual stream in fp32 and the encoder's clamp to +-(65504 - 1000) after every
  layer, as the official fp16 code path does;
- TensorRT portability, every precision: integer CumSum runs in fp32, integer Clip becomes
  Max/Min and NonZero reads fp32 (onnx-tensorrt documents those ops for float types only).

Mask constants stay finite (-65504 is representable in fp16 and bf16; the pass refuses a constant
that overflows). Weights are converted one tensor at a time from the external data file, so a
1.7B decoder is never held in memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from qasr.errors import BundleError
from qasr.export.onnx_files import DATA_THRESHOLD, graph_contract, unalias_shared_weights
from qasr.export.quantize import qdq_int4
from qasr.runtime.bundle import DERIVED_RECORD, Bundle, derived_dir, derived_is_current, staged
from qasr.version import __version__

FLOAT = TensorProto.FLOAT
LOW_TYPES = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16, "fp32": FLOAT}
NUMPY: dict[int, Any] = {TensorProto.BFLOAT16: ml_dtypes.bfloat16, TensorProto.FLOAT16: np.float16, FLOAT: np.float32}
FLOATS = set(NUMPY)
FP16_CLAMP = 65504.0 - 1000.0
PACKED = {TensorProto.INT4, TensorProto.UINT4}
def is_cache(name: str) -> bool:
    """The KV cache (past_key_i, past_value_i, new_kv) lives on the device in the engine's own type."""
    return name == "new_kv" or name.startswith(("past_key_", "past_value_"))
ISLAND_OPS = {"Softmax", "LayerNormalization", "ArgMax"}
TYPE_FREE_INPUTS = {"Shape", "Size", "Cast"}  # ops that read any input type


def derived_name(precision: str, weights: str = "fp32") -> str:
    """BUNDLE/derived/<this>: the precision, with `-int4` where the weights are int4 (Q/DQ)."""
    return precision if weights == "fp32" else f"{precision}-{weights}"


def derive_bundle(bundle: Bundle, precision: str, progress: Callable[[str], None] = print,
                  weights: str = "fp32") -> Path:
    """Write BUNDLE/derived/<precision>[-int4]/ (graphs + graphs.json) unless it is already current.

    Staged beside the target and moved into place when complete, like the export itself.
    `weights="int4"`: the decoder's (or aligner's) weight matrices as int4 Q/DQ (unverified on
    TensorRT: docs/tensorrt.md); the audio graphs keep `precision`.
    """
    if bundle.manifest.get("weights"):
        reference = bundle.manifest.get("reference") or "the fp32 bundle it was quantized from"
        raise BundleError(f"{bundle.path}: {bundle.manifest['precision']} weights (MatMulNBits) run on ONNX Runtime; "
                          f"TensorRT engines are built from the fp32 graphs: `qasr build {reference}`")
    name = derived_name(precision, weights)
    out = derived_dir(bundle, name)
    if derived_is_current(bundle, name):
        return out
    layers = bundle.model["audio"]["encoder_layers"]
    with staged(out) as staging:
        contracts = {}
        for graph in bundle.manifest["graphs"]:
            int4 = weights == "int4" and graph in ("decoder", "aligner")
            progress(f"deriving {precision}{' with int4 weights' if int4 else ''} {graph}")
            if bundle.fused_decoder and graph == "decoder":
                entry = bundle.manifest["graphs"][graph]
                contracts[graph] = _derive_fused(bundle.graph_path(graph), staging / f"{graph}.onnx", precision,
                                                 weights) | {key: entry[key] for key in ("layout", "qk_norm")}
                continue
            contracts[graph] = derive_graph(bundle.graph_path(graph), staging / f"{graph}.onnx", precision,
                                            layers if graph == "encoder" else 0, int4_weights=int4)
        record = {"precision": precision, "weights": weights, "dialect": "portable", "qasr_version": __version__,
                  "source_sha256": bundle.manifest["source"]["sha256"], "graphs": contracts}
        (staging / DERIVED_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return out


def _derive_fused(src: Path, dst: Path, precision: str, weights: str) -> dict:
    """The fused decoder (one cache slot per row) for ONNX Runtime's CUDA provider, in fp16 or bf16:
    its GroupQueryAttention kernels take no other type.

    Simpler than the traced graphs' pass: the fused graph holds no index math in floats (positions
    and masks live inside GroupQueryAttention), so every float tensor takes the low type, weights
    and cache included, but for the ends. The audio splice stays fp32 (the token rows are cast up
    before it, the spliced rows down after it: the CUDA provider has no bf16 Where), and `logits`
    leave as fp32 (cast after the head; the argmax reads the cast), so the host never handles a low
    type. The RMS norms keep fp32 statistics inside the ops either way.
    """
    if precision not in ("fp16", "bf16") or weights != "fp32":
        raise BundleError(f"{src.parent}: its fused decoder is derived in fp16 or bf16 for onnxruntime-cuda (its "
                          f"GroupQueryAttention kernels take no other type), not {derived_name(precision, weights)}")
    low = LOW_TYPES[precision]
    model = onnx.load(str(src), load_external_data=False)
    unalias_shared_weights(model)  # only the CPU repacks the head: elsewhere one name serves gather and head
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_", "present_")):
            value.type.tensor_type.elem_type = low
    for name, to in (("token_rows", FLOAT), ("embeds", low), ("logits", FLOAT)):  # qasr.export.fused_decoder's names
        _cast_after(graph, name, to)
    write_weights(model, src.parent, dst, {t.name: low for t in graph.initializer if t.data_type == FLOAT})
    onnx.save_model(model, str(dst))
    return {"file": dst.name, "data": [dst.name + ".data"], **graph_contract(model)}


def _cast_after(graph: onnx.GraphProto, name: str, to: int) -> None:
    """Tensor `name` becomes a Cast to `to` of what its producer now writes under `name`/raw."""
    producer = next(i for i, node in enumerate(graph.node) if name in node.output)
    raw = f"{name}/raw"
    graph.node[producer].output[:] = [raw if output == name else output for output in graph.node[producer].output]
    graph.node.insert(producer + 1, helper.make_node("Cast", [raw], [name], name=f"{name}/cast", to=to))


def derive_graph(src: Path, dst: Path, precision: str, encoder_layers: int = 0, int4_weights: bool = False) -> dict:
    """One graph file -> its derived copy with its own external data; returns its contract."""
    model = onnx.load(str(src), load_external_data=False)
    unalias_shared_weights(model)
    if int4_weights:
        load_external_data_for_model(model, str(src.parent))
        model = qdq_int4(model)
    model = onnx.shape_inference.infer_shapes(model)
    graph = TypedGraph(model, str(src))
    graph.make_portable()
    if precision != "fp32":
        graph.lower(LOW_TYPES[precision], clamp_layers=encoder_layers if precision == "fp16" else 0)
    write_weights(model, src.parent, dst, graph.initializer_types)
    graph.finish()
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))
    return {"file": dst.name, "data": [dst.name + ".data"], **graph_contract(model)}


class TypedGraph:
    """A graph with the element type of every tensor, rewritten node list by node list."""

    def __init__(self, model: onnx.ModelProto, source: str):
        self.model, self.graph, self.source = model, model.graph, source
        self.types: dict[str, int] = {}
        for value in [*self.graph.input, *self.graph.output, *self.graph.value_info]:
            self.types[value.name] = value.type.tensor_type.elem_type
        for tensor in self.graph.initializer:
            self.types[tensor.name] = tensor.data_type
        self.initializer_types = {t.name: t.data_type for t in self.graph.initializer}
        self.serial = 0
        names: set[str] = set()
        for n in self.graph.node:  # nodes are keyed by name below: make every name unique
            if not n.name or n.name in names:
                n.name = self.fresh(n.op_type)
            names.add(n.name)

    # -- helpers -------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self.serial += 1
        return f"{base}/qasr_{self.serial}"

    def node(self, op: str, inputs: list[str], out_type: int, **attrs) -> onnx.NodeProto:
        output = self.fresh(inputs[0] or op)
        self.types[output] = out_type
        return helper.make_node(op, inputs, [output], name=self.fresh(op), **attrs)

    def constant(self, value: float, elem_type: int) -> str:
        name = self.fresh("const")
        self.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        self.types[name] = self.initializer_types[name] = elem_type
        return name

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {out: n for n in self.graph.node for out in n.output}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        found: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for name in n.input:
                found.setdefault(name, []).append(n)
        return found

    def rename_uses(self, old: str, new: str) -> None:
        for n in self.graph.node:
            n.input[:] = [new if name == old else name for name in n.input]

    def replace_nodes(self, rewrite: Callable[[onnx.NodeProto], Iterable[onnx.NodeProto] | None]) -> None:
        nodes: list[onnx.NodeProto] = []
        for n in self.graph.node:
            replaced = rewrite(n)
            nodes.extend([n] if replaced is None else replaced)
        self.graph.ClearField("node")
        self.graph.node.extend(nodes)

    def fail(self, node: onnx.NodeProto, problem: str) -> BundleError:
        return BundleError(f"{self.source}: node {node.name} ({node.op_type}) {problem}; "
                           "qasr/export/precision.py does not know this graph layout")

    # -- TensorRT portability --------------------------------------------------------------------
    def make_portable(self) -> None:
        """Rewrite the few integer/bool uses that onnx-tensorrt documents for float types only."""
        def rewrite(n: onnx.NodeProto):
            kind = self.types.get(n.input[0], 0) if n.input else 0
            if n.op_type == "CumSum" and kind not in FLOATS:
                as_float = self.node("Cast", [n.input[0]], FLOAT, to=FLOAT)
                total = self.node("CumSum", [as_float.output[0], n.input[1]], FLOAT)
                back = helper.make_node("Cast", [total.output[0]], [n.output[0]], name=self.fresh("Cast"), to=kind)
                return [as_float, total, back]
            if n.op_type == "Clip" and kind not in FLOATS:
                bounds = [(op, b) for op, b in zip(("Max", "Min"), n.input[1:3]) if b]
                steps, value = [], n.input[0]
                for i, (op, bound) in enumerate(bounds):
                    last = i == len(bounds) - 1
                    steps.append(helper.make_node(op, [value, bound], [n.output[0]], name=self.fresh(op)) if last
                                 else self.node(op, [value, bound], kind))
                    value = steps[-1].output[0]
                return steps
            if n.op_type == "NonZero" and kind not in FLOATS:
                as_float = self.node("Cast", [n.input[0]], FLOAT, to=FLOAT)
                return [as_float, helper.make_node("NonZero", [as_float.output[0]], [n.output[0]], name=n.name)]
            return None

        self.replace_nodes(rewrite)

    # -- low precision ---------------------------------------------------------------------------
    def lower(self, low: int, clamp_layers: int) -> None:
        """Type every float tensor: islands and index math in fp32, the rest in `low`."""
        self.drop_float_casts()
        islands = self.rms_statistics() | {n.name for n in self.graph.node if n.op_type in ISLAND_OPS}
        if low == TensorProto.FLOAT16:
            residual = self.residual_adds()
            islands |= {n.name for n in residual}
            if clamp_layers:
                islands |= self.clamp(residual, clamp_layers)
        compute = self.compute_types(low, islands)
        self.retype(low, compute)

    def drop_float_casts(self) -> None:
        """Remove float -> float Casts (`.float()`, `.to(x.dtype)`): the typing below decides."""
        outputs = {o.name for o in self.graph.output}
        for n in list(self.graph.node):
            if (n.op_type == "Cast" and self.types.get(n.input[0]) in FLOATS
                    and self.types.get(n.output[0]) in FLOATS and n.output[0] not in outputs):
                self.rename_uses(n.output[0], n.input[0])
                self.graph.node.remove(n)

    def rms_statistics(self) -> set[str]:
        """The nodes of every RMSNorm's statistics: Pow(x, 2), ReduceMean, +eps, Sqrt, 1/., x * ."""
        producers, consumers = self.producers(), self.consumers()

        def only(name: str, ops: tuple[str, ...], after: onnx.NodeProto) -> onnx.NodeProto:
            users = consumers.get(name, [])
            if len(users) != 1 or users[0].op_type not in ops:
                raise self.fail(after, f"is not followed by {'/'.join(ops)} as in an RMSNorm")
            return users[0]

        found: set[str] = set()
        for reduce in [n for n in self.graph.node if n.op_type == "ReduceMean"]:
            square = producers.get(reduce.input[0])
            if square is None or square.op_type != "Pow":
                raise self.fail(reduce, "does not read Pow(x, 2) as in an RMSNorm")
            eps = only(reduce.output[0], ("Add",), reduce)
            root = only(eps.output[0], ("Sqrt",), eps)
            inverse = only(root.output[0], ("Div", "Reciprocal"), root)
            scale = only(inverse.output[0], ("Mul",), inverse)
            if square.input[0] not in scale.input:
                raise self.fail(scale, "does not scale the normalised input")
            found |= {n.name for n in (square, reduce, eps, root, inverse, scale)}
        return found

    def residual_adds(self) -> list[onnx.NodeProto]:
        """Adds of the residual stream: those feeding a normalisation, and those continuing them."""
        normed = {n.input[0] for n in self.graph.node if n.op_type in ("LayerNormalization", "Pow")}
        adds = [n for n in self.graph.node if n.op_type == "Add" and self.types.get(n.output[0]) in FLOATS]
        stream = {n.output[0] for n in adds if n.output[0] in normed}
        grew = True
        while grew:
            grew = False
            for n in adds:
                if n.output[0] not in stream and any(i in stream for i in n.input):
                    stream.add(n.output[0])
                    grew = True
        return [n for n in adds if n.output[0] in stream]

    def clamp(self, residual: list[onnx.NodeProto], layers: int) -> set[str]:
        """Clip every encoder layer's output (the second residual add of each layer)."""
        if len(residual) != 2 * layers:
            raise BundleError(f"{self.source}: found {len(residual)} residual adds for {layers} encoder layers; "
                              "qasr/export/precision.py does not know this graph layout")
        low, high = self.constant(-FP16_CLAMP, FLOAT), self.constant(FP16_CLAMP, FLOAT)
        layer_outputs = {n.name for n in residual[1::2]}
        clips: set[str] = set()

        def rewrite(n: onnx.NodeProto):
            if n.name not in layer_outputs:
                return None
            clipped = self.node("Clip", [n.output[0], low, high], FLOAT)
            self.rename_uses(n.output[0], clipped.output[0])  # `clipped` joins the graph after this
            clips.add(clipped.name)
            return [n, clipped]

        self.replace_nodes(rewrite)
        return clips

    def compute_types(self, low: int, islands: set[str]) -> dict[str, int]:
        """The type each float-handling node computes in: fp32 on islands and index math, else low."""
        live = {v.name for v in self.graph.input if v.type.tensor_type.elem_type in FLOATS}
        live |= {t.name for t in self.graph.initializer if t.data_type in FLOATS}
        compute: dict[str, int] = {}
        for n in self.graph.node:
            float_inputs = [i for i in n.input if self.types.get(i) in FLOATS]
            float_outputs = [o for o in n.output if self.types.get(o) in FLOATS]
            from_data = any(i in live for i in float_inputs)
            if from_data:
                live.update(float_outputs)
            if n.op_type in TYPE_FREE_INPUTS or not (float_inputs or float_outputs):
                continue
            kind = FLOAT if n.name in islands or not from_data else low
            compute[n.name] = kind if self.schema_allows(n, kind) else FLOAT
            if n.op_type in ("Cos", "Sin") and compute[n.name] != FLOAT:
                raise self.fail(n, "computes RoPE angles from activations")
        return compute

    def schema_allows(self, node: onnx.NodeProto, elem_type: int) -> bool:
        """Whether the graph's opset lets `node` compute in `elem_type` (Conv-20 has no bf16)."""
        opset = next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        index = next((i for i, name in enumerate(node.input) if self.types.get(name) in FLOATS), None)
        if index is None or not schema.inputs:
            return True
        param = schema.inputs[min(index, len(schema.inputs) - 1)].type_str
        allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
        name = f"tensor({helper.tensor_dtype_to_string(elem_type).split('.')[-1].lower()})"
        return name in allowed.get(param, [name])

    def retype(self, low: int, compute: dict[str, int]) -> None:
        """Give every float tensor its type and insert the Casts where producer and user differ."""
        consumers = self.consumers()
        wanted = {name: {compute[u.name] for u in users if u.name in compute}
                  for name, users in consumers.items()}

        def settle(name: str) -> int:
            """Constants and weights take their users' type when all agree (no Cast at run time)."""
            kinds = wanted.get(name, set())
            return next(iter(kinds)) if len(kinds) == 1 else FLOAT

        for tensor in self.graph.initializer:
            if tensor.data_type in FLOATS:
                self.types[tensor.name] = self.initializer_types[tensor.name] = settle(tensor.name)
        for value in self.graph.input:
            if value.type.tensor_type.elem_type in FLOATS:
                self.types[value.name] = low if is_cache(value.name) else FLOAT
        casts: dict[tuple[str, int], str] = {}

        def rewrite(n: onnx.NodeProto):
            kind = compute.get(n.name)
            if n.op_type == "Constant" and self.types.get(n.output[0]) in FLOATS:
                kind = settle(n.output[0])
                n.attribute[0].t.CopyFrom(convert_tensor(n.attribute[0].t, kind, self.source))
            if kind is None:
                return None
            added = []
            if n.op_type not in TYPE_FREE_INPUTS:
                for index, name in enumerate(n.input):
                    if self.types.get(name) in FLOATS and self.types[name] != kind:
                        if (name, kind) not in casts:
                            added.append(self.node("Cast", [name], kind, to=kind))
                            casts[(name, kind)] = added[-1].output[0]
                        n.input[index] = casts[(name, kind)]
            for name in n.output:
                if self.types.get(name) in FLOATS and n.op_type != "Cast":
                    self.types[name] = kind
            return [*added, n]

        self.replace_nodes(rewrite)
        self.bind_outputs(low)

    def bind_outputs(self, low: int) -> None:
        """Graph outputs keep their contract: fp32, except the new cache rows in the cache's type."""
        producers = self.producers()
        for value in self.graph.output:
            if value.type.tensor_type.elem_type not in FLOATS:
                continue
            declared = low if is_cache(value.name) else FLOAT
            if self.types[value.name] != declared:
                inner = self.fresh(value.name)
                producer = producers[value.name]
                producer.output[:] = [inner if o == value.name else o for o in producer.output]
                self.rename_uses(value.name, inner)
                self.types[inner] = self.types[value.name]
                self.graph.node.append(helper.make_node("Cast", [inner], [value.name], name=self.fresh("Cast"),
                                                        to=declared))
                self.types[value.name] = declared

    # -- the end ---------------------------------------------------------------------------------
    def finish(self) -> None:
        """Write the decided types into the graph's declarations and re-infer the rest."""
        for value in [*self.graph.input, *self.graph.output]:
            value.type.tensor_type.elem_type = self.types[value.name]
        self.graph.ClearField("value_info")
        inferred = onnx.shape_inference.infer_shapes(self.model, check_type=True, strict_mode=True)
        self.graph.value_info.extend(inferred.graph.value_info)


def convert_tensor(tensor: TensorProto, elem_type: int, source: str, data: np.ndarray | None = None) -> TensorProto:
    """`tensor` (or `data` read for it) as `elem_type`, inline; refuses values that overflow."""
    array = numpy_helper.to_array(tensor) if data is None else data
    if tensor.data_type not in FLOATS or tensor.data_type == elem_type:
        converted = np.asarray(array)
        elem_type = tensor.data_type
    else:
        converted = np.asarray(array, dtype=np.float32).astype(NUMPY[elem_type])
        if not np.isfinite(converted.astype(np.float32)).all() and np.isfinite(array).all():
            raise BundleError(f"{source}: {tensor.name} overflows in {helper.tensor_dtype_to_string(elem_type)}")
    out = TensorProto(name=tensor.name, data_type=elem_type, dims=list(tensor.dims))
    out.raw_data = np.ascontiguousarray(converted).tobytes()
    return out


def read_initializer(tensor: TensorProto, base: Path) -> np.ndarray:
    """An initializer's values, memory-mapped from its external data file when it has one."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.memmap(base / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(tensor.dims))


def write_weights(model: onnx.ModelProto, source_dir: Path, dst: Path, types: dict[str, int]) -> None:
    """Convert `model`'s initializers to `types`, writing the large ones to `dst`.data."""
    data = dst.with_name(dst.name + ".data")
    with open(data, "wb") as out:
        for index, tensor in enumerate(model.graph.initializer):
            if tensor.data_type in PACKED:  # packed int4 (Q/DQ weights): its bytes as they are
                converted = TensorProto()
                converted.CopyFrom(tensor)
            else:
                converted = convert_tensor(tensor, types.get(tensor.name, tensor.data_type), str(dst),
                                           read_initializer(tensor, source_dir))
            if len(converted.raw_data) > DATA_THRESHOLD:
                offset = out.tell()
                out.write(converted.raw_data)
                converted.ClearField("raw_data")
                converted.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", str(offset)),
                                   ("length", str(out.tell() - offset))):
                    converted.external_data.add(key=key, value=value)
            model.graph.initializer[index].CopyFrom(converted)
