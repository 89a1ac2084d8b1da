"""macOS and Windows, where many want a private, local transcriber: neither has /proc, and Windows
has no fcntl or resource module. Nothing here runs either system; instead a process of its own
hides all three, then imports every qasr module and runs a first use (a checkpoint exported into
the cache under its lock, then transcribed); memory figures read "unknown" there. (filelock falls
back to a soft lock when fcntl is hidden on Linux, and says so; on Windows it uses msvcrt.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

HIDE = """
import builtins, io, sys
import ray.serve  # the ray extra's own Linux modules (its vendored psutil reads `resource`) load first:
                  # on Windows its Windows ones would; what is checked is qasr's code
sys.modules["fcntl"] = None     # `import fcntl` raises ImportError, as on Windows
sys.modules["resource"] = None
_open = io.open

def _no_proc(file, *args, **kwargs):
    if str(file).startswith("/proc"):
        raise FileNotFoundError(2, "No such file or directory", str(file))
    return _open(file, *args, **kwargs)

builtins.open = io.open = _no_proc
"""

FIRST_USE = """
import importlib, math, pkgutil, sys
import numpy as np
import qasr
for module in pkgutil.walk_packages(qasr.__path__, "qasr."):
    if not module.name.endswith(".__main__"):  # that one runs the command line
        importlib.import_module(module.name)
from qasr.memory import peak_rss_gb, rss_gb, status_kb
assert status_kb("VmRSS") is None and math.isnan(rss_gb()) and math.isnan(peak_rss_gb())
from qasr.runtime.backends.prepack import packing_key
assert packing_key()["cpu"]
from qasr.runtime.transcribe import Transcriber
model = Transcriber.load(sys.argv[1], backend="onnxruntime")
wave = np.sin(np.arange(48000) / 16000 * 2 * np.pi * 220).astype(np.float32) * 0.1
print(len(model.transcribe((wave, 16000), language="English").token_ids) > 0)
"""


def test_every_module_imports_and_a_first_use_runs_without_fcntl_and_proc(checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QASR_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", HIDE + FIRST_USE, str(checkpoint("tiny"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert any((tmp_path / "cache" / "bundles").iterdir())  # exported into the cache, under the lock
