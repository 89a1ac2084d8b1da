"""The TensorRT path: builder, engine records and backend (ONNX Runtime's CUDA provider: test_gpu.py).

CPU tests (run everywhere): mypy against tensorrt-stubs, `qasr build` without TensorRT or a GPU
fails with one line, engine-record mismatches are refused, the cache-row copy geometry, the
optimization profiles. GPU tests (parity of the engines against the fp32 graphs on ONNX Runtime
CPU) skip with the reason where TensorRT or a CUDA device is missing, and need no oracle.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import types
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from support import AUDIO, check_batch, check_parity

from qasr.errors import EngineError
from qasr.export import tensorrt_build
from qasr.runtime.backends.cuda import row_copy
from qasr.runtime.backends.onnxruntime_cpu import OnnxRuntimeBackend
from qasr.runtime.backends.tensorrt_engines import RECORD_FORMAT, check_record
from qasr.runtime.bundle import Bundle
from qasr.runtime.decode import PREFILL_CHUNK, token_budget
from qasr.runtime.embed import WINDOW_BATCH

ROOT = Path(__file__).parent.parent
GPU_MODULES = ["qasr/runtime/backends/tensorrt_engines.py", "qasr/runtime/backends/cuda.py",
               "qasr/runtime/backends/onnxruntime_cuda.py", "qasr/runtime/backends/onnxruntime_cuda_fused.py",
               "qasr/runtime/backends/select.py",
               "qasr/runtime/backends/prepack.py", "qasr/export/tensorrt_build.py", "qasr/export/precision.py",
               "qasr/export/quantize.py", "qasr/runtime/verify.py"]
MYPY_CONFIG = """
[mypy]
python_version = 3.10
check_untyped_defs = True
warn_unused_ignores = True
follow_imports = silent
mypy_path = {stubs}

[mypy-cuda.*,onnxruntime.*,tensorrt_libs]
ignore_missing_imports = True

[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]
ignore_errors = True
"""


# -- CPU -------------------------------------------------------------------------------------------

def repaired_stubs(out: Path) -> Path:
    """tensorrt-stubs 10.13 as mypy can parse it.

    Its generator emitted `in` as a parameter name and required parameters after defaulted ones
    (syntax errors that stop mypy); both are mended, nothing else is touched.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    for package in ("tensorrt", "tensorrt_bindings"):
        (out / package).mkdir(parents=True, exist_ok=True)
        for stub in (site / package).glob("*.pyi"):
            text = "\n".join(_mend(line) for line in stub.read_text().splitlines())
            (out / package / stub.name).write_text(text + "\n")
    return out


def _mend(line: str) -> str:
    if not line.lstrip().startswith("def ") or "(" not in line:
        return line
    start, depth, parts, begin = line.index("("), 0, [], line.index("(") + 1
    for end in range(start, len(line)):
        depth += line[end] in "([{"
        depth -= line[end] in ")]}"
        if depth == 1 and line[end] == ",":
            parts.append(line[begin:end])
            begin = end + 1
        if depth == 0:
            break
    parts.append(line[begin:end])
    params, defaulted = [], False
    for part in (p.strip() for p in parts if p.strip()):
        part = re.sub(r"^in:", "in_:", part)
        if "=" in part:
            defaulted = True
        elif defaulted and not part.startswith("*"):
            part += " = ..."
        params.append(part)
    return line[: start + 1] + ", ".join(params) + line[end:]


def test_gpu_modules_type_check_against_tensorrt_stubs(tmp_path):
    try:
        metadata.version("tensorrt-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)")
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG.format(stubs=repaired_stubs(tmp_path / "stubs")))
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
                             str(tmp_path / "cache"), *GPU_MODULES], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def build_args(bundle: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tensorrt_build.add_arguments(parser)
    return parser.parse_args([str(bundle), *extra])


def test_build_without_tensorrt_fails_with_one_line(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(EngineError) as error:
        tensorrt_build.run(build_args(bundle("tiny")))
    assert "TensorRT is not installed" in str(error.value) and "\n" not in str(error.value)
    assert not (bundle("tiny") / "engines").exists()


def test_qasr_build_exits_1_with_one_line_without_tensorrt(bundle, monkeypatch, capsys):
    from qasr.cli import build_parser, main

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "build" not in commands.choices:
        pytest.skip("`qasr build` is not wired into qasr/cli.py yet")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build", str(bundle("tiny"))]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TensorRT is not installed" in err


def test_build_without_a_gpu_fails_with_one_line(bundle, monkeypatch):
    """TensorRT imports, but CUDA sees no device."""
    runtime = types.SimpleNamespace(cudaError_t=types.SimpleNamespace(cudaSuccess=0),
                                    cudaGetDeviceCount=lambda: (100, 0))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(Builder=object, __version__="10.3.0.30"))
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(runtime=runtime))
    with pytest.raises(EngineError, match="^no CUDA device is visible"):
        tensorrt_build.run(build_args(bundle("tiny")))


def test_graphs_only_needs_no_tensorrt(bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert tensorrt_build.run(build_args(bundle("tiny"), "--precision", "fp16", "--graphs-only")) == 0
    assert (Path(capsys.readouterr().out.strip()) / "decoder.onnx").is_file()


def fake_record(bundle: Bundle, **changes) -> dict:
    record = {"format": RECORD_FORMAT[0], "format_version": RECORD_FORMAT[1], "tensorrt": "10.3.0.30",
              "gpu": "Orin", "compute_capability": "8.7", "precision": "bf16", "max_audio_s": 300.0,
              "source_sha256": bundle.manifest["source"]["sha256"], "engines": {}}
    return {**record, **changes}


@pytest.mark.parametrize("changes, says", [
    ({"tensorrt": "10.16.2.1"}, "TensorRT 10.16.2.1 (this machine has 10.3.0.30)"),
    ({"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
     "NVIDIA H100 80GB HBM3 (sm 9.0; this machine has Orin, sm 8.7)"),
    ({"source_sha256": "0" * 64}, "another bundle"),
    ({"format_version": 0}, "another qasr engine format"),
])
def test_engines_built_elsewhere_are_refused_with_one_line(bundle, changes, says):
    loaded = Bundle.load(bundle("tiny"))
    here = {"tensorrt": "10.3.0.30", "gpu": "Orin", "compute_capability": "8.7"}
    check_record(fake_record(loaded), loaded, here)
    with pytest.raises(EngineError) as error:
        check_record(fake_record(loaded, **changes), loaded, here)
    message = str(error.value)
    assert says in message and "\n" not in message
    assert message.endswith(f"rebuild with `qasr build {loaded.path} --precision bf16 --max-audio 300`")


@pytest.mark.parametrize("new, position, itemsize", [(1, 0, 2), (1, 37, 4), (7, 11, 2), (64, 0, 4)])
def test_row_copy_writes_the_rows_where_numpy_would(new, position, itemsize):
    """cudaMemcpy2D's geometry, emulated byte by byte, against slicing the cache."""
    dtype = {2: np.float16, 4: np.float32}[itemsize]
    rng = np.random.default_rng(new)
    cache = rng.standard_normal((3, 2, 1, 2, 80, 16)).astype(dtype)
    rows = rng.standard_normal((3, 2, 1, 2, new, 16)).astype(dtype)
    expected = cache.copy()
    expected[:, :, :, :, position : position + new] = rows
    offset, dst_pitch, src_pitch, width, height = row_copy(cache.shape, rows.shape, position, itemsize)
    dst, src = bytearray(cache.tobytes()), rows.tobytes()
    for row in range(height):
        at = offset + row * dst_pitch
        dst[at : at + width] = src[row * src_pitch : row * src_pitch + width]
    assert np.array_equal(np.frombuffer(bytes(dst), dtype=dtype).reshape(cache.shape), expected)


def test_profiles_cover_the_longest_request(bundle):
    manifest = Bundle.load(bundle("tiny")).manifest
    plans = tensorrt_build.profiles(manifest, 300, max_batch=6)
    prefill, decode = plans["decoder"]
    assert prefill["new"] == [1, PREFILL_CHUNK, PREFILL_CHUNK] and decode["new"] == [1, 1, 1]
    assert prefill["batch"] == [1, 1, 1] and decode["batch"] == [1, 6, 6]
    assert decode["capacity"][2] == 6 * prefill["capacity"][2]  # the shared cache holds 6 of the longest
    audio_tokens = 13 * 300
    assert prefill["capacity"][2] >= audio_tokens + token_budget(300) + 100
    assert plans["encoder"] == [{"windows": [1, WINDOW_BATCH, WINDOW_BATCH], "frames": [100, 800, 800]}]
    assert plans["projector"][0]["tokens"][2] == WINDOW_BATCH * manifest["audio"]["window_tokens"]
    shapes = tensorrt_build.profile_shapes(manifest["graphs"]["decoder"], decode)
    assert shapes["input_ids"] == ((1, 1), (6, 1), (6, 1)) and shapes["cache_start"] == ((1,), (6,), (6,))
    assert shapes["past_key_0"][2][0] == 1 and shapes["past_key_0"][2][2] == decode["capacity"][2]


@pytest.mark.parametrize("preset", ["tiny", "tiny-aligner"])
def test_every_symbolic_dimension_has_a_profile(bundle, preset):
    """Each input of each graph gets min/opt/max shapes from its profiles, with min <= opt <= max."""
    manifest = Bundle.load(bundle(preset)).manifest
    for name, plans in tensorrt_build.profiles(manifest, 120).items():
        for dims in plans:
            for low, opt, high in tensorrt_build.profile_shapes(manifest["graphs"][name], dims).values():
                assert all(a <= b <= c for a, b, c in zip(low, opt, high)), name


# -- GPU -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu():
    """Skip, with the reason, unless TensorRT and a CUDA device are here."""
    from qasr.runtime.backends.cuda import Cuda
    from qasr.runtime.backends.tensorrt_engines import tensorrt_version

    try:
        tensorrt_version()
    except EngineError:
        pytest.skip("TensorRT is not installed")
    try:
        Cuda()
    except EngineError as error:
        pytest.skip("no CUDA device" if "device" in str(error) else str(error))


@pytest.fixture(scope="module")
def engines(gpu, bundle, tmp_path_factory):
    """engines(preset, precision) -> a copy of the bundle with engines built for this GPU."""
    built: dict = {}

    def get(preset: str, precision: str) -> Bundle:
        if (preset, precision) not in built:
            path = tmp_path_factory.mktemp(f"engines-{preset}-{precision}") / "bundle"
            shutil.copytree(bundle(preset), path)
            assert tensorrt_build.run(build_args(path, "--precision", precision, "--max-audio", "30")) == 0
            built[preset, precision] = Bundle.load(path)
        return built[preset, precision]

    return get


@pytest.mark.gpu
def test_tensorrt_engines_batch_like_one_at_a_time(engines, speech):
    from qasr.runtime.backends.tensorrt_engines import TensorRTBackend

    bundle = engines("tiny", "fp32")
    check_batch(TensorRTBackend(bundle), OnnxRuntimeBackend(bundle), speech)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 2e-2), ("bf16", 5e-2)])
def test_tensorrt_engines_match_the_fp32_graphs(engines, speech, precision, tolerance):
    from qasr.runtime.backends.tensorrt_engines import TensorRTBackend

    bundle = engines("tiny", precision)
    check_parity(TensorRTBackend(bundle), OnnxRuntimeBackend(bundle), speech, precision != "bf16", tolerance)


@pytest.mark.gpu
def test_tensorrt_aligner_engine_matches_the_fp32_graph(engines):
    from qasr.runtime.backends.tensorrt_engines import TensorRTBackend

    bundle = engines("tiny-aligner", "bf16")
    stamp = bundle.tokens["timestamp"]
    ids = np.array([[151669] + [AUDIO] * 20 + [151670, 100, stamp, stamp, 200, stamp, stamp]], dtype=np.int64)
    embeds = np.random.default_rng(1).standard_normal((1, 20, bundle.model["text"]["hidden_size"])).astype(np.float32)
    _, expected = OnnxRuntimeBackend(bundle).align(ids, embeds)
    _, got = TensorRTBackend(bundle).align(ids, embeds)
    assert got.shape == expected.shape
    assert min(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(got, expected)) >= 0.99
