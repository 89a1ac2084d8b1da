"""Where the CPU time of the ONNX Runtime path goes: the profiles behind docs/benchmarks.md.

    python scripts/profile_cpu.py gemv                  # fp32 matrix-vector bandwidth of ORT's kernels
    python scripts/profile_cpu.py prefill BUNDLE [--filled 512]   # time per operator, one 512-token chunk

`gemv` answers why a decode step stays far from the memory-bandwidth floor: it runs a chain of
decode-sized fp32 matrix-vector products (weights well past the caches) through ONNX Runtime in
the layouts it could use, and reports the bytes of weight read per second. `prefill` runs one
prompt chunk through a bundle's decoder graph under ORT's profiler and sums the kernel time per
operator and per projection, which shows how much of the time to first token is GEMM work.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qasr.runtime.bundle import Bundle, cache_names
from qasr.runtime.backends.onnxruntime_cpu import session_options


def gemv_model(transposed: bool, layers: int, k: int, n: int) -> bytes:
    """`layers` fp32 products x[1,k] @ W[k,n], each output cut back to k columns for the next."""
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        shape = (n, k) if transposed else (k, n)
        weights.append(numpy_helper.from_array(rng.standard_normal(shape, dtype=np.float32), f"w{i}"))
        op = helper.make_node("Gemm", [x, f"w{i}"], [f"y{i}"], transB=1) if transposed else \
            helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"])
        nodes += [op, helper.make_node("Slice", [f"y{i}", "zero", "k", "one"], [f"s{i}"])]
        x = f"s{i}"
    weights += [numpy_helper.from_array(np.array([v]), name) for name, v in (("zero", 0), ("k", k), ("one", 1))]
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, k])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def gemv(threads: int, repeats: int) -> None:
    layers, k, n = 40, 1024, 3072  # the 0.6B decoder's MLP shape; 500 MB of weights
    x = np.ones((1, k), dtype=np.float32)
    print(f"{layers} fp32 products [1,{k}] x [{k},{n}], {layers * k * n * 4 / 1e6:.0f} MB of weights, "
          f"{threads} threads, median of {repeats}")
    for transposed in (False, True):
        for prepack in (True, False):
            options = session_options(threads)
            if not prepack:
                options.add_session_config_entry("session.disable_prepacking", "1")
            session = ort.InferenceSession(gemv_model(transposed, layers, k, n), options)
            session.run(None, {"x": x})
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                session.run(None, {"x": x})
                times.append(time.perf_counter() - began)
            seconds = float(np.median(times))
            name = "Gemm(transB=1)" if transposed else "MatMul"
            print(f"  {name:15s} {'prepacked' if prepack else 'as stored':10s} {seconds * 1e3:7.1f} ms "
                  f"{layers * k * n * 4 / seconds / 1e9:6.1f} GB/s")


def prefill(bundle_path: Path, filled: int, threads: int) -> None:
    bundle = Bundle.load(bundle_path)
    text = bundle.model["text"]
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prefill")
        session = ort.InferenceSession(str(bundle.graph_path("decoder")), options)
        feeds = {"input_ids": np.full((1, 512), 1000, dtype=np.int64),
                 "audio_embeds": np.zeros((1, 1, text["hidden_size"]), dtype=np.float32),
                 "position": np.array([filled], dtype=np.int64)}
        for name in cache_names(text["num_hidden_layers"]):
            feeds[name] = np.zeros((1, text["num_key_value_heads"], filled, text["head_dim"]), dtype=np.float32)
        for _ in range(2):  # the first run allocates; the second is profiled
            began = time.perf_counter()
            session.run(None, feeds)
        wall = time.perf_counter() - began
        events = json.loads(Path(session.end_profiling()).read_text())
    last = [e for e in events if e.get("name") == "model_run"][-1]["ts"]
    kernels = [e for e in events if e.get("cat") == "Node" and e["ts"] >= last and e["name"].endswith("_kernel_time")]
    by_op, by_node = collections.Counter(), collections.Counter()
    for event in kernels:
        by_op[event["args"]["op_name"]] += event["dur"] / 1e3
        node = re.sub(r"layers\.\d+", "layers.*", event["name"].removesuffix("_kernel_time"))
        if "_proj" in node:
            by_node[re.sub(r"/MatMul.*", "", node)] += event["dur"] / 1e3
    print(f"one 512-token chunk after {filled} filled rows, {threads} threads: {wall:.2f} s wall, "
          f"{sum(by_op.values()) / 1e3:.2f} s in kernels")
    for op, ms in by_op.most_common(10):
        print(f"  {op:30s} {ms:8.0f} ms")
    print("projections (all layers):")
    for node, ms in by_node.most_common():
        print(f"  {node:50s} {ms:8.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gemv").add_argument("--repeats", type=int, default=15)
    p = sub.add_parser("prefill")
    p.add_argument("bundle", type=Path)
    p.add_argument("--filled", type=int, default=512)
    args = parser.parse_args()
    if args.command == "gemv":
        gemv(args.threads, args.repeats)
    else:
        prefill(args.bundle, args.filled, args.threads)


if __name__ == "__main__":
    main()
