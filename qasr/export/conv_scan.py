"""The audio encoder's conv stack as an ONNX Scan: the same nodes, run one 1 s chunk at a time.

The encoder convolves every chunk of mel on its own (qasr.models.encoder), so the traced graph runs
the three convs over one batch of all the chunks of a call. The first conv's output is then
channels x 64 x 50 floats a chunk, 49 MB for an 8 s window of the 1.7B (480 channels), and ONNX
Runtime holds two such tensors at once (the conv's and its GELU's): 100 MB more a window, 200 MB
for a call of two windows, on top of the loaded weights, when a model's peak memory is reached.
Wrapped in a Scan over the chunks, the stack holds one chunk's tensors (15 MB), and on the CPU it
runs as fast (docs/benchmarks.md, "The 1.7B on a small machine").

Only quantized bundles get it. They run on ONNX Runtime; the fp32 bundle is also the source of the
GPU graphs, whose precision rewrites walk the top-level graph and whose convs want the batch.
"""

from __future__ import annotations

import onnx
from onnx import helper

from qasr.errors import BundleError

FIRST, LAST = "conv2d1.weight", "conv2d3.weight"  # the stack's first and last conv weights, as traced
CHUNK_SOURCE = "conv_frames"  # the graph input every per-chunk value besides the mel derives from


def scan_conv_chunks(model: onnx.ModelProto) -> bool:
    """Wrap the conv stack of an encoder graph in a Scan over its chunks, in place; False where the
    graph has no such stack (not an encoder)."""
    graph = model.graph
    nodes = list(graph.node)
    convs = {node.input[1]: node for node in nodes if node.op_type == "Conv" and len(node.input) > 1}
    if FIRST not in convs or LAST not in convs:
        return False
    readers = [i for i, node in enumerate(nodes) if convs[LAST].output[0] in node.input]
    if len(readers) != 1:
        raise BundleError(f"encoder graph: the last conv feeds {len(readers)} nodes, not its activation alone")
    mel, stacked = convs[FIRST].input[0], nodes[readers[0]].output[0]
    region = _between(nodes, mel, stacked)
    scanned = _per_chunk_inputs(graph, [nodes[i] for i in region], mel)
    types = _elem_types(model)
    scan = helper.make_node("Scan", scanned, [stacked], name="conv_stack/scan", num_scan_inputs=len(scanned),
                            body=_body([nodes[i] for i in region], scanned, stacked, types))
    kept = [node for i, node in enumerate(nodes) if i not in region[:-1]]
    kept[kept.index(nodes[region[-1]])] = scan  # where the stack's output was made: after all it reads
    graph.ClearField("node")
    graph.node.extend(kept)
    inner = {name for i in region for name in nodes[i].output} - {stacked}
    values = [value for value in graph.value_info if value.name not in inner]
    graph.ClearField("value_info")
    graph.value_info.extend(values)
    placed = next(node for node in graph.node if node.name == scan.name)  # extend() stored a copy
    _move_weights(graph, next(attr.g for attr in placed.attribute if attr.name == "body"))
    return True


def _move_weights(graph: onnx.GraphProto, body: onnx.GraphProto) -> None:
    """Make the weights only the stack reads the body's own initializers (an external tensor moves
    as its reference: its bytes stay where they are). ONNX Runtime lays out and packs a conv's
    weight for its fastest kernels (NCHWc) only where the weight is a constant of the conv's own
    graph: read from the outer graph, the stack ran 10% slower."""
    inside = {name for node in body.node for name in node.input}
    outside = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    moved = [tensor for tensor in graph.initializer if tensor.name in inside and tensor.name not in outside]
    body.initializer.extend(moved)
    kept = [tensor for tensor in graph.initializer if tensor.name not in {t.name for t in moved}]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def _between(nodes: list[onnx.NodeProto], start: str, end: str) -> list[int]:
    """Indices of the nodes on a path from value `start` to value `end`, in graph order; the stack's
    inner values must not be read elsewhere."""
    ahead, reached = set(), {start}
    for i, node in enumerate(nodes):  # graph order is topological
        if any(name in reached for name in node.input):
            ahead.add(i)
            reached.update(node.output)
    made = {name: i for i, node in enumerate(nodes) for name in node.output}
    behind, todo = set(), [end]
    while todo:
        i = made.get(todo.pop())
        if i is not None and i not in behind:
            behind.add(i)
            todo.extend(nodes[i].input)
    region = sorted(ahead & behind)
    inner = {name for i in region for name in nodes[i].output} - {end}
    if any(name in inner for i, node in enumerate(nodes) if i not in region for name in node.input):
        raise BundleError("encoder graph: a value inside the conv stack is used outside it")
    return region


def _per_chunk_inputs(graph: onnx.GraphProto, region: list[onnx.NodeProto], mel: str) -> list[str]:
    """The values the stack reads that have a row per chunk: the mel chunks, and what the chunks'
    lengths give (their time masks). Weights and constants are read from the outer graph as they are."""
    fixed = {tensor.name for tensor in graph.initializer}
    fixed |= {name for node in graph.node if node.op_type == "Constant" for name in node.output}
    inner = {name for node in region for name in node.output}
    outside = [name for node in region for name in node.input if name and name not in inner and name not in fixed]
    scanned = list(dict.fromkeys([mel, *outside]))
    derived = {CHUNK_SOURCE}
    for node in graph.node:
        if any(name in derived for name in node.input):
            derived.update(node.output)
    strays = [name for name in scanned[1:] if name not in derived]
    if strays:
        raise BundleError(f"encoder graph: the conv stack reads {strays}, neither the mel nor the chunks' lengths")
    return scanned


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value of the graph, by ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    values = [*inferred.input, *inferred.output, *inferred.value_info]
    return {value.name: value.type.tensor_type.elem_type for value in values}


def _body(region: list[onnx.NodeProto], scanned: list[str], stacked: str, types: dict[str, int]) -> onnx.GraphProto:
    """The Scan body: each scanned value comes in without its chunk axis and is given it back (a batch
    of one), the stack's nodes run as traced, and its output leaves without that axis again."""
    axis = helper.make_tensor("axis", onnx.TensorProto.INT64, [1], [0])
    nodes = [helper.make_node("Constant", [], ["conv_stack/axis"], value=axis)]
    for name in scanned:  # a new name: a subgraph may not assign one of the outer graph's
        nodes.append(helper.make_node("Unsqueeze", [f"{name}/chunk", "conv_stack/axis"], [f"{name}/one"]))
    renamed = {name: f"{name}/one" for name in scanned}
    for node in region:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [renamed.get(name, name) for name in node.input]
        nodes.append(copy)
    nodes.append(helper.make_node("Squeeze", [stacked, "conv_stack/axis"], [f"{stacked}/chunk"]))
    inputs = [helper.make_tensor_value_info(f"{name}/chunk", types[name], None) for name in scanned]
    output = helper.make_tensor_value_info(f"{stacked}/chunk", types[stacked], None)
    return helper.make_graph(nodes, "conv_stack", inputs, [output])
