"""The encoder's conv stack as a Scan over its chunks (qasr.export.conv_scan): same values as the
batched stack, in every quantized encoder, with the stack's weights its own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qasr.cli import main
from qasr.export.conv_scan import scan_conv_chunks
from qasr.export.quantize import quantize_bundle
from qasr.runtime.bundle import Bundle

EN = Path(__file__).parent / "data" / "en_16k_s16.wav"
WINDOWS = [  # (windows, mel frames, valid frames, frames convolved as signal)
    (2, 800, [800, 130], [800, 800]),  # a full window and a clip's last, shorter one
    (1, 300, [250], [300]),  # a window cut short to whole chunks
    (1, 100, [37], [37]),  # a clip shorter than one chunk: the stack masks beyond its length
]


def encoder_copy(bundle: Path, folder: Path) -> Path:
    """The bundle's encoder graph and its data in `folder` (the data copied: ONNX refuses hard links)."""
    folder.mkdir()
    for file in ("encoder.onnx", "encoder.onnx.data"):
        shutil.copyfile(bundle / file, folder / file)
    return folder / "encoder.onnx"


def outputs(path: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    return [session.run(None, {"mel": rng.standard_normal((w, 128, f)).astype(np.float32),
                               "frames": np.array(frames), "conv_frames": np.array(conv)})[0]
            for w, f, frames, conv in WINDOWS]


def test_the_scanned_stack_gives_the_batched_stacks_values(bundle, tmp_path):
    """The fp32 encoder with its stack rewritten: the same hidden states (to float rounding, the
    convs' kernels differ with the batch) for full, short and sub-chunk windows."""
    path = encoder_copy(Path(bundle("tiny")), tmp_path / "scanned")
    model = onnx.load(str(path), load_external_data=False)
    assert scan_conv_chunks(model)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    for batched, scanned in zip(outputs(Path(bundle("tiny")) / "encoder.onnx"), outputs(path)):
        assert batched.shape == scanned.shape
        np.testing.assert_allclose(scanned, batched, rtol=1e-4, atol=1e-4 * np.abs(batched).max())


def test_a_quantized_encoder_scans_its_chunks_with_its_own_weights(bundle, tmp_path):
    """`--encoder-weights int8`: one Scan holds the three convs, their weights are the body's (still
    in the data file), and the encoder's contract is the fp32 one. Other graphs are left as they are."""
    out = quantize_bundle(bundle("tiny"), tmp_path / "q", "int4", "int8", progress=lambda line: None)
    model = onnx.load(str(out / "encoder.onnx"), load_external_data=False)
    scans = [node for node in model.graph.node if node.op_type == "Scan"]
    assert len(scans) == 1 and not [node for node in model.graph.node if node.op_type == "Conv"]
    body = scans[0].attribute[0].g
    assert sorted(node.input[1] for node in body.node if node.op_type == "Conv") == [
        "conv2d1.weight", "conv2d2.weight", "conv2d3.weight"]
    owned = {tensor.name: tensor.data_location for tensor in body.initializer}
    assert set(owned) == {f"conv2d{i}.{kind}" for i in (1, 2, 3) for kind in ("weight", "bias")}
    assert owned["conv2d2.weight"] == onnx.TensorProto.EXTERNAL  # in the data file (small biases are inline)
    source, quantized = Bundle.load(bundle("tiny")).manifest, Bundle.load(out).manifest
    for side in ("inputs", "outputs"):
        assert quantized["graphs"]["encoder"][side] == source["graphs"]["encoder"][side]
    for name in ("projector", "decoder"):
        assert scan_conv_chunks(onnx.load(str(out / f"{name}.onnx"), load_external_data=False)) is False


def test_a_hard_linked_quantized_encoder_is_refused_in_one_line(bundle, tmp_path, capsys):
    """ONNX refuses external weights of a subgraph in a file with several hard links (a guard against
    reading other files); the Scan's weights are such. `qasr transcribe` says so in one line."""
    out = quantize_bundle(bundle("tiny"), tmp_path / "q", "int4", "int8", progress=lambda line: None)
    os.link(out / "encoder.onnx.data", tmp_path / "second-name")
    assert main(["transcribe", str(EN), "--model", str(out), "--max-new-tokens", "4"]) != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "copy the bundle instead of linking it" in lines[0], lines
