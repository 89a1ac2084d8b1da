"""The CPU kernels of an AVX2-only machine. ONNX Runtime picks its MLAS kernels by CPUID when it
loads, so a machine with AVX-512 runs none of the AVX2 ones that many laptops, small servers and
older workstations run, and those differ most for int4 and int8 weights (packing and dot products)
and the encoder's convolutions. QEMU's user mode with `-cpu Haswell` runs this same Python under a
CPUID with AVX2 and no AVX-512 (QEMU 7.2 and later emulate AVX2), so a tiny bundle transcribed
there takes the AVX2 kernels: its ids must be this machine's, its logits close. On an AVX2 host the
two runs take the same kernels, and the test still holds them to it. Timing under emulation means
nothing, so only results are compared here (docs/benchmarks.md has what was estimated of memory).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

from support import DATA

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or QEMU is None,
                                reason="needs an x86-64 host and QEMU's user mode (apt-get install qemu-user)")

WORKER = """
import json, sys
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__ as cpu
from qasr.runtime.transcribe import Transcriber
model = Transcriber.load(sys.argv[1], backend="onnxruntime", threads=1)
result = model.transcribe(sys.argv[2], max_new_tokens=12)
np.save(sys.argv[3], model.backend.step_logits())
print(json.dumps({"avx2": cpu["AVX2"], "avx512f": cpu["AVX512F"], "ids": result.token_ids}))
"""


def transcribe(bundle, audio, logits, emulated: bool) -> dict:
    """Ids and CPU features of a fresh process, natively or under QEMU's Haswell; last logits to `logits`."""
    python = os.path.realpath(sys.executable)  # QEMU runs a binary, not a launcher script
    argv = [QEMU, "-cpu", "Haswell", python] if emulated else [python]
    done = subprocess.run([*argv, "-c", WORKER, str(bundle), str(audio), str(logits)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def bundles(bundle, fused, tmp_path_factory):
    """The three kinds of kernels: fp32 (SGEMM, convolutions), int8 weights, int4 weights beside the
    fused decoder's attention, the last two with the int8 audio encoder."""
    from qasr.export.quantize import quantize_bundle

    folder = tmp_path_factory.mktemp("simd")
    quiet = {"progress": lambda line: None}
    return {"fp32": bundle("tiny-untied"),
            "int8": quantize_bundle(bundle("tiny-untied"), folder / "int8", "int8", "int8", **quiet),
            "int4 fused": quantize_bundle(fused("fp32"), folder / "int4", "int4", "int8", **quiet)}


@pytest.mark.parametrize("kind, audio, tolerance", [("fp32", "en_16k_s16.wav", 1e-4),
                                                    ("int8", "zh_16k_f32_loud.wav", 1e-2),
                                                    ("int4 fused", "en_16k_s16.wav", 1e-2)])
def test_the_avx2_kernels_give_this_machines_ids(bundles, tmp_path, kind, audio, tolerance):
    """Quantized kernels quantize the activations to int8 per block, so one value rounding the other
    way (after fp32 sums taken in another order) moves a logit by about 1e-3: their tolerance."""
    native = transcribe(bundles[kind], DATA / audio, tmp_path / "native.npy", emulated=False)
    emulated = transcribe(bundles[kind], DATA / audio, tmp_path / "emulated.npy", emulated=True)
    assert emulated["avx2"] and not emulated["avx512f"], f"QEMU's Haswell CPUID is not AVX2 alone: {emulated}"
    assert emulated["ids"] == native["ids"] and len(native["ids"]) >= 4
    here, there = np.load(tmp_path / "native.npy"), np.load(tmp_path / "emulated.npy")
    assert np.abs(here - there).max() <= tolerance * np.abs(here).max()
