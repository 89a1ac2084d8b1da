"""First use: a checkpoint directory or a Hugging Face id wherever a bundle goes, exported once into
qasr's cache. The hub tests run the real huggingface_hub code over a cache laid out as the hub lays it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qasr.errors import BundleError, CheckpointError
from qasr.runtime import resolve
from qasr.runtime.resolve import DEFAULT_MODEL, ENTRY_RECORD, resolve_model
from support import DATA

EN = str(DATA / "en_16k_s16.wav")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "qasr-cache"
    monkeypatch.setenv("QASR_CACHE", str(folder))
    return folder


@pytest.fixture
def own_checkpoint(checkpoint, tmp_path):
    """A private copy of the tiny checkpoint, so tests may change it."""
    return Path(shutil.copytree(checkpoint("tiny-untied"), tmp_path / "ckpt"))


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "bundles").iterdir() if not p.name.startswith("."))


def lines():
    said: list[str] = []
    return said, said.append


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("QASR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve.cache_dir() == tmp_path / "xdg" / "qasr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve.cache_dir() == Path("~/.cache/qasr").expanduser()
    monkeypatch.setenv("QASR_CACHE", str(tmp_path / "mine"))
    assert resolve.cache_dir() == tmp_path / "mine"


def test_a_bundle_is_used_as_it_is(bundle, cache):
    assert resolve_model(bundle("tiny-untied")) == bundle("tiny-untied")
    assert not (cache / "bundles").exists()


def test_quantized_first_use_on_the_cpu_takes_the_fused_decoder(own_checkpoint, checkpoint, cache):
    """int8/int4 weights bound for ONNX Runtime's CPU provider get the fused decoder (faster there);
    for a GPU, fp32, an aligner, or a head size GroupQueryAttention does not take (tiny-untied's 12),
    the first use exports the traced graph."""
    from qasr.runtime.backends.onnxruntime_fused import OnnxRuntimeFusedBackend
    from qasr.runtime.bundle import Bundle
    from qasr.runtime.transcribe import Transcriber

    quiet = {"progress": lambda line: None}
    tiny = checkpoint("tiny")
    fused = resolve_model(tiny, weights="int4", on_cpu=True, **quiet)
    traced = resolve_model(tiny, weights="int4", **quiet)
    assert fused.name.endswith("-int4-fused") and Bundle.load(fused).fused_decoder
    assert traced.name.endswith("-int4") and not Bundle.load(traced).fused_decoder
    assert not Bundle.load(resolve_model(tiny, on_cpu=True, **quiet)).fused_decoder
    for other, kind in ((checkpoint("tiny-aligner"), "aligner"), (own_checkpoint, "asr")):
        assert resolve_model(other, kind, weights="int4", on_cpu=True, **quiet).name.endswith("-int4")
    model = Transcriber.load(tiny, backend="onnxruntime", weights="int4")
    assert model.bundle.path == fused and isinstance(model.backend, OnnxRuntimeFusedBackend)
    assert model.transcribe(EN, max_new_tokens=4).token_ids


def test_a_checkpoint_is_exported_once_and_reused(own_checkpoint, cache, bundle):
    said, progress = lines()
    first = resolve_model(own_checkpoint, progress=progress)
    assert any("first use" in line for line in said) and entries(cache) == [first]
    stamp = (first / "decoder.onnx").stat().st_mtime_ns
    said.clear()
    assert resolve_model(own_checkpoint, progress=progress) == first and said == []
    assert (first / "decoder.onnx").stat().st_mtime_ns == stamp
    manifest = json.loads((first / "manifest.json").read_text())
    reference = json.loads((bundle("tiny-untied") / "manifest.json").read_text())
    assert first.name.startswith(manifest["source"]["sha256"][:16])
    assert manifest["source"]["sha256"] == reference["source"]["sha256"]


def test_a_changed_checkpoint_is_exported_again(own_checkpoint, cache):
    first = resolve_model(own_checkpoint, progress=lambda line: None)
    weights = own_checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)  # the last weight's last bytes: same size, other content
    weights.write_bytes(bytes(data))
    second = resolve_model(own_checkpoint, progress=lambda line: None)
    assert second != first and entries(cache) == sorted([first, second])


@pytest.mark.parametrize("damage", ["truncate", "manifest", "record"])
def test_a_damaged_entry_is_rebuilt_with_one_line(own_checkpoint, cache, damage):
    entry = resolve_model(own_checkpoint, progress=lambda line: None)
    if damage == "truncate":
        with open(entry / "decoder.onnx.data", "r+b") as f:
            f.truncate(100)
    elif damage == "manifest":
        (entry / "manifest.json").write_text("{")
    else:
        (entry / ENTRY_RECORD).unlink()
    said, progress = lines()
    assert resolve_model(own_checkpoint, progress=progress) == entry
    notes = [line for line in said if "exporting it again" in line]
    assert len(notes) == 1 and str(entry) in notes[0]
    assert (entry / "decoder.onnx.data").stat().st_size > 100 and (entry / ENTRY_RECORD).is_file()


def test_the_wrong_kind_is_refused_before_exporting(checkpoint, cache):
    with pytest.raises(BundleError, match="forced-aligner checkpoint, not a speech recognition checkpoint"):
        resolve_model(checkpoint("tiny-aligner"), "asr")
    assert not (cache / "bundles").exists() or entries(cache) == []


def test_neither_a_bundle_nor_a_checkpoint(tmp_path, cache):
    with pytest.raises(BundleError, match="neither a qasr bundle"):
        resolve_model(tmp_path)
    with pytest.raises(CheckpointError, match="no such bundle or checkpoint directory"):
        resolve_model(tmp_path / "missing" / "deeper" / "path")


def run_cli(*argv, env=None, check=True):
    full = {**os.environ, **(env or {})}
    done = subprocess.run([sys.executable, "-m", "qasr", *map(str, argv)], capture_output=True, text=True, env=full)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def ids(done) -> list[int]:
    return json.loads(done.stdout)["token_ids"]


def test_two_first_uses_at_once_export_once(own_checkpoint, cache, bundle):
    argv = [sys.executable, "-m", "qasr", "transcribe", EN, "--model", str(own_checkpoint), "--format", "json",
            "--max-new-tokens", "6"]
    env = {**os.environ, "QASR_CACHE": str(cache)}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(err.count("first use") for _, err in outs) == 1
    expected = run_cli("transcribe", EN, "--model", bundle("tiny-untied"), "--format", "json",
                       "--max-new-tokens", 6)
    assert [json.loads(out)["token_ids"] for out, _ in outs] == [ids(expected)] * 2
    assert len(entries(cache)) == 1


def test_the_default_model_resolves_from_the_hub_cache_offline(checkpoint, bundle, cache, tmp_path, hub_cache):
    hub = hub_cache(tmp_path / "hub", DEFAULT_MODEL, checkpoint("tiny-untied"))
    env = {"QASR_CACHE": str(cache), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    first = run_cli("transcribe", EN, "--format", "json", "--max-new-tokens", 6, env=env)
    pinned = run_cli("transcribe", EN, "--model", f"{DEFAULT_MODEL}@{hub_cache.commit}", "--format", "json",
                     "--max-new-tokens", 6, env=env)
    expected = run_cli("transcribe", EN, "--model", bundle("tiny-untied"), "--format", "json", "--max-new-tokens", 6)
    assert ids(first) == ids(pinned) == ids(expected)
    assert "first use" in first.stderr and "first use" not in pinned.stderr
    assert len(entries(cache)) == 1


def test_an_uncached_hub_id_offline_is_one_line(cache, tmp_path):
    env = {"QASR_CACHE": str(cache), "HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"}
    done = run_cli("transcribe", EN, "--model", "Qwen/Qwen3-ASR-1.7B", env=env, check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("qasr: error: Qwen/Qwen3-ASR-1.7B: not found in the Hugging Face hub or its cache")


def test_without_the_export_extra_a_checkpoint_is_one_line(checkpoint, cache):
    """torch made unimportable, as in a runtime-only install (`pip install qwen3-asr-edge`)."""
    code = ("import sys; sys.modules['torch'] = None; from qasr.cli import main; "
            f"sys.exit(main(['transcribe', {EN!r}, '--model', {str(checkpoint('tiny-untied'))!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "QASR_CACHE": str(cache)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and 'pip install "qwen3-asr-edge[export]"' in done.stderr


def test_info_takes_a_bundle_a_checkpoint_or_a_hub_id(checkpoint, bundle, tmp_path, capsys, hub_cache):
    from qasr.cli import main

    outputs = []
    for model in (bundle("tiny-untied"), checkpoint("tiny-untied")):
        assert main(["info", str(model)]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    assert outputs[0][0].startswith("Qwen3-ASR bundle") and outputs[1][0].startswith("Qwen3-ASR checkpoint")
    assert outputs[0][1:] == outputs[1][1:]
    hub = hub_cache(tmp_path / "hub", "someone/tiny-asr", checkpoint("tiny-untied"))
    done = run_cli("info", "someone/tiny-asr", env={"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    assert done.stdout.splitlines()[1:] == outputs[1][1:]
