"""Shared fixtures: random checkpoints in the official layout, generated once per session."""

from __future__ import annotations

import pytest

from support import DATA


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """qasr's model cache for the whole session, never the user's ~/.cache/qasr (subprocesses inherit it)."""
    import os

    os.environ["QASR_CACHE"] = str(tmp_path_factory.mktemp("qasr-cache"))
    return os.environ["QASR_CACHE"]


@pytest.fixture(scope="session", autouse=True)
def per_session_pools():
    """The CLI's commands, run in this process, would make ONNX Runtime's process-wide thread pool,
    after which ORT refuses the tests' own sessions (default options): one pool per session here.
    qasr's child processes (servers, Ray replicas, streams: support.user_env) and
    tests/test_threads.py run the shared pool, as a user's qasr does."""
    import os

    from qasr.runtime.backends.onnxruntime_cpu import PER_SESSION

    os.environ[PER_SESSION] = "per-session"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(preset, seed=0) -> path of a random checkpoint directory (cached per session)."""
    from qasr.models.synthetic import make_checkpoint

    made: dict = {}

    def get(preset: str = "tiny", seed: int = 0):
        key = (preset, seed)
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp(f"ckpt-{preset}-{seed}"), preset, seed)
        return made[key]

    return get


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory):
    """bundle(preset, seed=0) -> path of that checkpoint exported to an fp32 ONNX bundle (cached)."""
    from qasr.export.onnx_export import export_bundle

    made: dict = {}

    def get(preset: str = "tiny", seed: int = 0):
        key = (preset, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"bundle-{preset}-{seed}") / "bundle"
            made[key] = export_bundle(checkpoint(preset, seed), out, progress=lambda line: None)
        return made[key]

    return get


@pytest.fixture(scope="session")
def fused(checkpoint, tmp_path_factory):
    """fused(weights) -> the tiny checkpoint exported with the fused decoder (fp32, or quantized from it)."""
    from qasr.export.onnx_export import export_bundle
    from qasr.export.quantize import quantize_bundle

    made: dict = {}

    def get(weights: str = "fp32"):
        if weights not in made:
            folder = tmp_path_factory.mktemp(f"fused-{weights}")
            made[weights] = (export_bundle(checkpoint("tiny"), folder / "bundle", progress=lambda line: None,
                                           decoder="fused") if weights == "fp32" else
                             quantize_bundle(get("fp32"), folder / "bundle", weights, progress=lambda line: None))
        return made[weights]

    return get


SPEECH_16K = ("en_16k_s16.wav", "zh_16k_f32_loud.wav")


@pytest.fixture(scope="module")
def model_pair(checkpoint, bundle):
    """`get(preset, budget)`: the official qwen-asr model (max_new_tokens=budget) and qasr's
    Transcriber on ONNX Runtime, both on that preset's random checkpoint, loaded once per module.
    Skips the test where the official package is missing (oracle.py)."""
    from oracle import load_official
    from qasr.runtime.transcribe import Transcriber

    cache: dict = {}

    def get(preset: str = "tiny-untied", budget: int = 20):
        if (preset, budget) not in cache:
            cache[preset, budget] = (load_official(checkpoint(preset), max_new_tokens=budget),
                                     Transcriber.load(bundle(preset), backend="onnxruntime"))
        return cache[preset, budget]

    return get


@pytest.fixture(scope="session")
def speech():
    """speech(seconds, start=0) -> float32 16 kHz mono speech of that length, cut from the fixtures.

    Longer clips repeat the English and Chinese recordings in turn; `start` rotates the order so
    two calls can give two different clips of the same length.
    """
    import numpy as np
    import soundfile as sf

    clips = []
    for name in SPEECH_16K:
        wav, rate = sf.read(DATA / name, dtype="float32")
        assert rate == 16000
        clips.append(wav / max(1.0, float(np.abs(wav).max())))

    def get(seconds: float, start: int = 0):
        n = int(round(seconds * 16000))
        parts, total, i = [], 0, start
        while total < n:
            parts.append(clips[i % len(clips)])
            total += len(parts[-1])
            i += 1
        return np.concatenate(parts)[:n].astype(np.float32)

    return get


@pytest.fixture(scope="session")
def hub_cache():
    """hub_cache(root, repo, checkpoint) lays `checkpoint` out as huggingface_hub caches `repo`.

    Blobs are named by their sha256, snapshot files are relative symlinks to them and refs/main
    names the commit (`hub_cache.commit`), so the real huggingface_hub code resolves it offline.
    """
    import hashlib
    import os
    import shutil

    def lay_out(root, repo: str, checkpoint):
        storage = root / ("models--" + repo.replace("/", "--"))
        snapshot = storage / "snapshots" / lay_out.commit
        (storage / "blobs").mkdir(parents=True)
        snapshot.mkdir(parents=True)
        for file in sorted(checkpoint.iterdir()):
            blob = storage / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text(lay_out.commit)
        return root

    lay_out.commit = "0123456789abcdef0123456789abcdef01234567"
    return lay_out


DEMO_MODEL = DATA.parent.parent / "models" / "qwen3-asr-demo"


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The committed demo checkpoint exported to an fp32 bundle (once per session)."""
    from qasr.export.onnx_export import export_bundle

    return export_bundle(DEMO_MODEL, tmp_path_factory.mktemp("demo") / "fp32", progress=lambda line: None)


@pytest.fixture(scope="session")
def held_out(tmp_path_factory):
    """held_out(count, seed) -> [(wav path, language, text)]: new sentences from the demo model's word
    lists, spoken with the voice and speed its training never used (needs espeak-ng and sox)."""
    import shutil

    from qasr.models.demo_data import held_out_clips

    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("needs espeak-ng and sox (apt install espeak-ng sox)")
    folder = tmp_path_factory.mktemp("held-out")
    return lambda count=6, seed=2026: held_out_clips(DEMO_MODEL, folder, count, seed)
