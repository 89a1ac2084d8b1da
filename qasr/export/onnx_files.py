"""ONNX files on disk: external weight data, shared-weight aliases, graph contracts.

Free of torch, so that deriving bf16 graphs and building engines (on a Jetson, say) needs only
onnx; only the export from a checkpoint needs torch.
"""

from __future__ import annotations

from pathlib import Path

import onnx

DATA_THRESHOLD = 1024  # initializers above this many bytes live in the external data file


def alias_shared_weights(path: Path) -> None:
    """Give a weight that a Gemm shares with another node (a tied head: the embedding) a second name.

    Both names point at the same bytes of the data file, so it is stored once. ONNX Runtime packs
    a Gemm's weight into its own layout at load and frees the original, unless another node still
    uses it; with one shared name the 600 MB embedding would then stay resident twice, with two
    names the Gather keeps only the rows it touches.
    """
    graph = onnx.load(str(path), load_external_data=False)
    initializers = {t.name: t for t in graph.graph.initializer}
    users: dict[str, int] = {}
    for node in graph.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    changed = False
    for node in graph.graph.node:
        weight = node.input[1] if node.op_type == "Gemm" else None
        if weight in initializers and users[weight] > 1:
            alias = onnx.TensorProto()
            alias.CopyFrom(initializers[weight])
            alias.name = f"{weight}.gemm"
            graph.graph.initializer.append(alias)
            node.input[1] = alias.name
            changed = True
    if changed:
        onnx.save_model(graph, str(path))


def graph_contract(graph: onnx.ModelProto) -> dict:
    """Names, element types and shapes (symbolic dims by name) of a graph's inputs and outputs."""
    def describe(values):
        return {
            v.name: {
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        }
    return {"inputs": describe(graph.graph.input), "outputs": describe(graph.graph.output)}


def unalias_shared_weights(graph: onnx.ModelProto) -> None:
    """Undo `alias_shared_weights`: one initializer per stored region of the data file.

    For graphs that TensorRT compiles: it builds its own weights, and two names would give the
    engine two copies of the embedding table.
    """
    first: dict[tuple, str] = {}
    renames: dict[str, str] = {}
    for tensor in list(graph.graph.initializer):
        region = tuple((e.key, e.value) for e in tensor.external_data)
        if region and region in first:
            renames[tensor.name] = first[region]
            graph.graph.initializer.remove(tensor)
        elif region:
            first[region] = tensor.name
    for node in graph.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
