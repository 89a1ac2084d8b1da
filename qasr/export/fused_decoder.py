"""The fused decoder graph: a Qwen3 step of 13 ONNX Runtime nodes per layer, built from the
checkpoint's tensors with onnx's helper (no tracing).

Per layer (contract and layout in docs/graphs.md, "decoder (fused)"):

    SkipSimplifiedLayerNormalization      residual add + input RMS norm (plain SLN in layer 0)
    MatMul qkv -> Split [q+k, v] -> BranchwiseRMSNorm (per-head q/k norm) -> Concat
    GroupQueryAttention                   rotary, grouped KV heads, cache read and written in place
    MatMul o -> SkipSimplifiedLayerNormalization
    MatMul gate, MatMul up -> QuickGelu(alpha=1), i.e. SiLU -> Mul -> MatMul down

The step holds no shape arithmetic: every Reshape is gone (the per-head norm reads the packed
[B, S, (heads + kv_heads) x hd] rows directly), positions come from the per-row `seqlens_k`
and the rotary tables are constants. With `qk_norm="attention"` the q/k norm moves into
GroupQueryAttention's own `q_norm_weight`/`k_norm_weight` inputs (10 nodes per layer), which only
the CUDA and WebGPU providers honour; the CPU provider rejects such a node.

The weights are read one tensor at a time and appended to the external data file as they are
made, so building the 0.6B graph holds one layer's matrices in memory, never the model. The
matrices become MatMulNBits through the same quantizer pass as the traced graph's
(qasr.export.quantize), since they are plain MatMuls on 2-D initializers, the head a
Gemm(transB=1) on the embedding table stored once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qasr.errors import UsageError
from qasr.export.onnx_files import DATA_THRESHOLD, graph_contract
from qasr.models.checkpoint import (DECODER_PREFIX, EMBED_NAME, HEAD_NAME, _open, check_checkpoint, read_rows,
                                   read_tensor)
from qasr.models.config import ModelConfig, load_config
from qasr.models.decoder import rope_inv_freq

OPSET = 20
IR_VERSION = 9  # what the traced graphs carry; onnx's default (14 in onnx 1.23) is refused by ONNX Runtime 1.31
MS = "com.microsoft"
LAYOUT = "slots"  # manifest value: one cache slot [kvh, P, hd] per batch row, per layer and kind
QK_NORMS = ("branchwise", "attention")
CONTRIB = ("SkipSimplifiedLayerNormalization", "GroupQueryAttention", "BranchwiseRMSNorm", "QuickGelu")
ALIGN = 4096  # data file offsets: page-aligned, so ONNX Runtime can map each weight as it stands


def fused_cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The per-layer cache inputs (past_key_0, past_value_0, ...) and outputs (present_...)."""
    past = [f"past_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past_", "present_", 1) for name in past]


class _Weights:
    """Initializers written straight to the external data file, none held in the model proto."""

    def __init__(self, data: Path):
        self.data, self.file = data, data.open("wb")
        self.tensors: list[TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        """Small constants (shapes, ids, norm scales) stay inline, as shape inference needs them."""
        array = np.require(array, requirements="C")  # not ascontiguousarray, which makes scalars 1-D
        if array.nbytes < DATA_THRESHOLD:
            self.tensors.append(numpy_helper.from_array(array, name))
            return name
        return self.add_blocks(name, array.shape, array.dtype, [array])

    def add_blocks(self, name: str, shape: tuple[int, ...], dtype: np.dtype, blocks: Iterable[np.ndarray]) -> str:
        """A large tensor written block by block (rows in order), so that it is never whole in memory."""
        offset = -(-self.file.tell() // ALIGN) * ALIGN
        self.file.seek(offset)
        for block in blocks:
            self.file.write(memoryview(np.ascontiguousarray(block, dtype=dtype)).cast("B"))  # no bytes copy
        length = self.file.tell() - offset
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data.name), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        self.tensors.append(tensor)
        return name

    def alias(self, name: str, of: str) -> str:
        """A second name over the same bytes (the tied head's Gemm weight, see docs/graphs.md)."""
        source = next(t for t in self.tensors if t.name == of)
        tensor = TensorProto()
        tensor.CopyFrom(source)
        tensor.name = name
        self.tensors.append(tensor)
        return name

    def close(self) -> None:
        self.file.close()


class _Reader:
    """Checkpoint tensors in float32 numpy, each read from its safetensors file opened for it alone
    (a file kept open counts every page read so far as this process's memory)."""

    def __init__(self, checkpoint: Path, config: ModelConfig):
        self.files = check_checkpoint(checkpoint, config)

    def __call__(self, name: str) -> np.ndarray:
        return read_tensor(self.files[name], name).numpy()

    def rows(self, name: str) -> Iterator[np.ndarray]:
        """The tensor in blocks of rows: the 1.7B's embedding is 1.24 GB in float32."""
        return (block.numpy() for block in read_rows(self.files[name], name))

    def shape(self, name: str) -> tuple[int, ...]:
        with _open(self.files[name]) as f:
            return tuple(f.get_slice(name).get_shape())


def rope_tables(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim / 2] exactly as the traced decoder computes its angles
    (qasr.models.decoder: fp32 inverse frequencies times fp32 positions, cos/sin in fp32)."""
    angles = torch.arange(positions).float()[:, None] * rope_inv_freq(head_dim, theta)[None]
    return angles.cos().numpy(), angles.sin().numpy()


def check_fusable(config: ModelConfig) -> None:
    """One line for a model the fused graph cannot be built for (ModelConfig.fusable)."""
    if not config.fusable:
        what = "an aligner" if config.is_aligner else f"head_dim {config.text.head_dim} (not a multiple of 16)"
        raise UsageError(f"the fused decoder cannot be built for {what}; export with --decoder traced")


def build_fused_decoder(checkpoint: str | Path, path: Path, qk_norm: str = "branchwise") -> dict:
    """Write the fused decoder graph of an ASR checkpoint to `path` (+ `path`.data); its contract."""
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm {qk_norm!r}: choose from {', '.join(QK_NORMS)}")
    checkpoint = Path(checkpoint)
    config = load_config(checkpoint)
    data = path.with_name(path.name + ".data")
    weights, read = _Weights(data), _Reader(checkpoint, config)
    try:
        nodes = _Builder(config, weights, read, qk_norm).graph()
    finally:
        weights.close()
    model = helper.make_model(
        helper.make_graph(nodes, "qasr_fused_decoder", _inputs(config), _outputs(config), weights.tensors),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], producer_name="qasr",
        ir_version=IR_VERSION)
    onnx.save_model(model, str(path))  # not onnx.checker: it knows no SimplifiedLayerNormalization; ORT loads it
    contract = graph_contract(model)
    return {"file": path.name, "data": [data.name], "layout": LAYOUT, "qk_norm": qk_norm, **contract}


def _inputs(config: ModelConfig) -> list:
    t = config.text
    past, _ = fused_cache_names(t.num_hidden_layers)
    cache: list[str | int] = ["batch", t.num_key_value_heads, "capacity", t.head_dim]
    return [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "new"]),
            helper.make_tensor_value_info("audio_embeds", TensorProto.FLOAT, ["batch", "audio", t.hidden_size]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
            *[helper.make_tensor_value_info(name, TensorProto.FLOAT, cache) for name in past]]


def _outputs(config: ModelConfig) -> list:
    t = config.text
    _, present = fused_cache_names(t.num_hidden_layers)
    cache: list[str | int] = ["batch", t.num_key_value_heads, "capacity", t.head_dim]
    return [helper.make_tensor_value_info("next_token", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", config.head_rows]),
            *[helper.make_tensor_value_info(name, TensorProto.FLOAT, cache) for name in present]]


class _Builder:
    """The node list, with the weights written as they are first used."""

    def __init__(self, config: ModelConfig, weights: _Weights, read: _Reader, qk_norm: str):
        self.config, self.t, self.weights, self.read, self.qk_norm = config, config.text, weights, read, qk_norm
        self.nodes: list[onnx.NodeProto] = []

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> list[str]:
        domain = MS if op in CONTRIB else None  # SimplifiedLayerNormalization is ORT's, in the ONNX domain
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const(self, name: str, array: np.ndarray) -> str:
        return self.weights.add(name, array)

    def graph(self) -> list[onnx.NodeProto]:
        t = self.t
        x = self.embed()
        cos, sin = rope_tables(t.head_dim, t.rope_theta, t.max_position_embeddings)
        self.const("rope.cos", cos), self.const("rope.sin", sin)
        residual, mlp = x, ""  # layer 0 has no previous MLP output to add
        for layer in range(t.num_hidden_layers):
            residual, mlp = self.layer(layer, residual, mlp)
        return self.head(residual, mlp)

    def embed(self) -> str:
        """Token embeddings with the <|audio_pad|> rows taken, in order, from `audio_embeds` (the
        running count of pads indexes them; -1 before the first pad reads a row the Where drops)."""
        table = self.weights.add_blocks(EMBED_NAME, self.read.shape(EMBED_NAME), np.dtype(np.float32),
                                        self.read.rows(EMBED_NAME))
        audio_id = self.const("audio_token_id", np.array(self.config.audio_token_id, dtype=np.int64))
        one = self.const("one", np.array(1, dtype=np.int64))
        self.node("Equal", ["input_ids", audio_id], ["is_audio"], "embed/is_audio")
        self.node("Unsqueeze", ["is_audio", self.const("axes_2", np.array([2], dtype=np.int64))], ["is_audio3"],
                  "embed/unsqueeze")
        self.node("Cast", ["is_audio3"], ["pads"], "embed/cast", to=TensorProto.INT64)
        self.node("CumSum", ["pads", one], ["pads_before"], "embed/cumsum")
        self.node("Sub", ["pads_before", one], ["audio_row"], "embed/row")
        self.node("GatherND", ["audio_embeds", "audio_row"], ["audio_rows"], "embed/audio", batch_dims=1)
        self.node("Gather", [table, "input_ids"], ["token_rows"], "embed/tokens")
        return self.node("Where", ["is_audio3", "audio_rows", "token_rows"], ["embeds"], "embed/where")[0]

    def norm(self, name: str, x: str, skip: str | None, weight: str) -> tuple[str, str]:
        """RMS norm of x (+ skip); returns (normed, the residual sum, or x itself without skip)."""
        w = self.const(weight, self.read(weight))
        eps = self.t.rms_norm_eps
        if skip is None:
            return self.node("SimplifiedLayerNormalization", [x, w], [f"{name}/out"], name, axis=-1,
                             epsilon=eps, stash_type=1)[0], x
        normed, _, _, total = self.node("SkipSimplifiedLayerNormalization", [x, skip, w],
                                        [f"{name}/out", "", "", f"{name}/sum"], name, epsilon=eps)
        return normed, total

    def matmul(self, name: str, x: str, matrices: list[str]) -> str:
        """x @ W^T of the checkpoint's [out, in] matrices, stacked along out (one weight, one node)."""
        weight = np.concatenate([self.read(m) for m in matrices], axis=0).T
        return self.node("MatMul", [x, self.const(f"{name}.weight", weight)], [f"{name}/out"], name)[0]

    def layer(self, i: int, residual: str, mlp: str) -> tuple[str, str]:
        t, p = self.t, f"{DECODER_PREFIX}layers.{i}."
        heads, kvh, hd = t.num_attention_heads, t.num_key_value_heads, t.head_dim
        if not mlp:
            x, residual = self.norm(f"l{i}/input_norm", residual, None, p + "input_layernorm.weight")
        else:
            x, residual = self.norm(f"l{i}/input_norm", mlp, residual, p + "input_layernorm.weight")
        attn = p + "self_attn."
        qkv = self.matmul(f"l{i}/qkv", x, [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"])
        q_norm, k_norm = self.read(attn + "q_norm.weight"), self.read(attn + "k_norm.weight")
        extra: dict = {}
        inputs = [qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length",
                  "rope.cos", "rope.sin"]
        if self.qk_norm == "branchwise":
            qk, v = self.node("Split", [qkv, self.const(f"l{i}/split", np.array([(heads + kvh) * hd, kvh * hd]))],
                              [f"l{i}/qk", f"l{i}/v"], f"l{i}/split", axis=-1)
            scale = self.const(f"{attn}qk_norm.weight", np.concatenate([np.tile(q_norm, heads), np.tile(k_norm, kvh)]))
            self.node("BranchwiseRMSNorm", [qk, scale], [f"l{i}/qk_normed"], f"l{i}/qk_norm",
                      num_branches=heads + kvh, epsilon=t.rms_norm_eps)
            inputs[0] = self.node("Concat", [f"l{i}/qk_normed", v], [f"l{i}/qkv_normed"], f"l{i}/concat", axis=-1)[0]
        else:
            inputs += ["", "", "", "", "", self.const(attn + "q_norm.weight", q_norm),
                       self.const(attn + "k_norm.weight", k_norm)]
            extra = {"qk_norm_epsilon": t.rms_norm_eps}
        self.node("GroupQueryAttention", inputs, [f"l{i}/attn", f"present_key_{i}", f"present_value_{i}"],
                  f"l{i}/attention", num_heads=heads, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0,
                  scale=float(hd**-0.5), **extra)
        out = self.matmul(f"l{i}/o", f"l{i}/attn", [attn + "o_proj.weight"])
        x, residual = self.norm(f"l{i}/post_norm", out, residual, p + "post_attention_layernorm.weight")
        gate = self.matmul(f"l{i}/gate", x, [p + "mlp.gate_proj.weight"])
        up = self.matmul(f"l{i}/up", x, [p + "mlp.up_proj.weight"])
        self.node("QuickGelu", [gate], [f"l{i}/silu"], f"l{i}/silu", alpha=1.0)
        self.node("Mul", [f"l{i}/silu", up], [f"l{i}/gated"], f"l{i}/gated")
        return residual, self.matmul(f"l{i}/down", f"l{i}/gated", [p + "mlp.down_proj.weight"])

    def head(self, residual: str, mlp: str) -> list[onnx.NodeProto]:
        """Final norm, the last position of each row, the head (a Gemm on the table as stored) and
        the argmax, so only one id per row need leave the graph."""
        x, _ = self.norm("final_norm", mlp, residual, DECODER_PREFIX + "norm.weight")
        last = self.const("last", np.array(-1, dtype=np.int64))
        self.node("Gather", [x, last], ["last_hidden"], "last_position", axis=1)
        if self.config.tied_head:
            head = self.weights.alias(f"{EMBED_NAME}.gemm", EMBED_NAME)
        else:
            head = self.weights.add_blocks(HEAD_NAME, self.read.shape(HEAD_NAME), np.dtype(np.float32),
                                           self.read.rows(HEAD_NAME))
        self.node("Gemm", ["last_hidden", head], ["logits"], "head", transB=1)
        self.node("ArgMax", ["logits"], ["next_token"], "argmax", axis=-1, keepdims=0)
        return self.nodes
