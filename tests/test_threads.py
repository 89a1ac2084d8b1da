"""qasr's commands run every ONNX Runtime session of their process in one shared thread pool
(qasr.runtime.backends.onnxruntime_cpu.share_threads). The pool is process-wide, so each case runs
in a child process of its own; the test process itself keeps a pool per session (conftest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qasr.runtime.backends.onnxruntime_cpu import PER_SESSION
from support import DATA, user_env

ROOT = Path(__file__).parent.parent
CLIP = DATA / "en_16k_s16.wav"

# After the command, a session made with ONNX Runtime's default options (a pool of its own) must be
# refused: the proof that the process-wide pool existed while the command's sessions ran in it.
PROBE = """
import contextlib, io, sys
import onnxruntime as ort
from qasr.cli import main
code = main(sys.argv[2:])
try:
    with contextlib.redirect_stdout(io.StringIO()):  # ORT prints its retry notice
        ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    print("own-pool session: accepted")
except Exception as exc:
    print("own-pool session: refused" if "use_per_session_threads" in str(exc) else f"own-pool session: {exc}")
sys.exit(code)
"""


def child(graph: Path, *argv, shared: bool = True, before: str = "") -> list[str]:
    """`qasr ARGV` through cli.main in a fresh interpreter; its stdout lines."""
    env = user_env(PYTHONPATH=str(ROOT), **({} if shared else {PER_SESSION: "per-session"}))
    done = subprocess.run([sys.executable, "-c", before + PROBE, str(graph), *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.rstrip("\n").split("\n")  # not splitlines: a random model's text holds other line breaks


@pytest.mark.parametrize("command", [["transcribe", CLIP, "--format", "json"], ["stream", CLIP, "--format", "jsonl"]])
def test_a_command_shares_one_pool_and_its_output_does_not_change(fused, command):
    """The fused decoder, the encoder and the projector run in the one pool (a session with a pool of
    its own is refused afterwards), and the transcript or every stream event is what a pool per
    session gives (compute seconds aside)."""
    bundle = fused()
    argv = [*command, "--model", bundle, "--threads", "2"]
    shared = child(bundle / "projector.onnx", *argv)
    alone = child(bundle / "projector.onnx", *argv, shared=False)
    assert shared[-1] == "own-pool session: refused"
    assert alone[-1] == "own-pool session: accepted"
    assert _without_seconds(shared[:-1]) == _without_seconds(alone[:-1])
    assert len(shared) > 1


def test_pools_made_by_other_code_are_joined(bundle):
    """Where the process made ONNX Runtime's pools before the command, the command's sessions run in
    them (ORT refuses any other) instead of failing to load."""
    model = bundle("tiny")
    before = "import onnxruntime\nonnxruntime.set_global_thread_pool_sizes(1, 1)\n"
    lines = child(model / "projector.onnx", "transcribe", CLIP, "--model", model, "--threads", "2", before=before)
    assert lines[-1] == "own-pool session: refused"
    assert lines[:-1] == child(model / "projector.onnx", "transcribe", CLIP, "--model", model, "--threads", "2",
                               shared=False)[:-1]


def _without_seconds(lines: list[str]) -> list[str]:
    """JSON lines with their timing fields dropped: the only part that differs from run to run."""
    import json

    out = []
    for line in lines:
        record = json.loads(line)
        for key in ("timings", "compute_seconds", "rtf"):
            record.pop(key, None)
        out.append(json.dumps(record, sort_keys=True))
    return out
