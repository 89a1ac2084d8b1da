"""The `qasr` command: output on stdout or in files, and one clear line for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from pathlib import Path

from qasr.cli import main
from support import DATA

EN, DE = str(DATA / "en_16k_s16.wav"), str(DATA / "de_22k.flac")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("qasr: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_transcribe_txt_to_stdout(capsys, bundle):
    code, out, _ = run(capsys, "transcribe", EN, "--model", bundle("tiny-untied"), "--max-new-tokens", 5)
    assert code == 0 and out.endswith("\n") and out.count("\n") == 1


def test_transcribe_json_carries_the_contract(capsys, bundle):
    code, out, err = run(capsys, "transcribe", DE, "--model", bundle("tiny-untied"), "--format", "json",
                         "--language", "german", "--max-new-tokens", 4)
    result = json.loads(out)
    assert code == 0 and result["language"] == "German" and result["audio"] == DE
    assert len(result["token_ids"]) == 4 and result["truncated"] is True
    assert {"audio", "frontend", "encoder", "setup", "prefill", "decode", "total"} <= set(result["timings"])
    assert "token budget ran out" in err


def test_batch_keeps_going_past_a_bad_file(capsys, bundle, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    code, _, err = run(capsys, "transcribe", EN, bad, DE, "--model", bundle("tiny-untied"),
                       "--max-new-tokens", 3, "--output-dir", tmp_path / "out", "--format", "json")
    assert code == 1
    assert str(bad) in _one_error_line(err)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["de_22k.json", "en_16k_s16.json"]


def test_several_files_decode_side_by_side_with_the_ids_of_one_at_a_time(capsys, bundle, tmp_path):
    files = [EN, DE, str(DATA / "fr_48k.ogg")]
    ids = {}
    for size in (1, 2):
        out = tmp_path / str(size)
        code, _, _ = run(capsys, "transcribe", *files, "--model", bundle("tiny-untied"), "--format", "json",
                         "--max-new-tokens", 6, "--output-dir", out, "--batch-size", size)
        assert code == 0
        ids[size] = [json.loads((out / f"{name}.json").read_text())["token_ids"] for name in ("en_16k_s16", "de_22k", "fr_48k")]
    assert ids[1] == ids[2] and len({tuple(i) for i in ids[1]}) == 3


@pytest.mark.parametrize("files", [[EN], [EN, DE]])
def test_one_recording_loads_the_decoder_once_its_encoder_has_left(capsys, bundle, monkeypatch, files):
    """A one-shot command of one recording never holds the encoder's weights beside the decoder's:
    the decoder's session is made after the encoder's release. With several, it loads in the
    background from the start, while the first recording is encoded."""
    from qasr.runtime.backends.onnxruntime_cpu import OnnxRuntimeBackend

    events, session, release = [], OnnxRuntimeBackend._session, OnnxRuntimeBackend.release
    monkeypatch.setattr(OnnxRuntimeBackend, "_session",
                        lambda self, name: (events.append(name), session(self, name))[1])
    monkeypatch.setattr(OnnxRuntimeBackend, "release",
                        lambda self, graphs: (events.append("release"), release(self, graphs))[1])
    code, _, _ = run(capsys, "transcribe", *files, "--model", bundle("tiny-untied"), "--max-new-tokens", 3)
    assert code == 0 and sorted(events) == ["decoder", "encoder", "projector", "release"]
    assert (events.index("decoder") > events.index("release")) == (len(files) == 1)


def test_output_names_do_not_collide(capsys, bundle, tmp_path):
    (tmp_path / "a").mkdir()
    copy = tmp_path / "a" / "en_16k_s16.wav"
    shutil.copy(EN, copy)
    code, _, _ = run(capsys, "transcribe", EN, copy, "--model", bundle("tiny-untied"), "--max-new-tokens", 2,
                     "--output-dir", tmp_path / "out")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["en_16k_s16-2.txt", "en_16k_s16.txt"]


@pytest.mark.parametrize("argv,needle", [
    (["--language", "Klingon"], "unsupported language 'Klingon'"),
    (["--model", "/nowhere/bundle"], "/nowhere/bundle: no such bundle or checkpoint directory"),
])
def test_bad_options_one_line(capsys, bundle, argv, needle):
    args = ["transcribe", EN, "--model", bundle("tiny-untied"), *argv]
    code, _, err = run(capsys, *args)
    assert code == 1 and needle in _one_error_line(err)


@pytest.mark.parametrize("content", [b"my meeting notes, not audio\n" * 4, bytes(range(256)) * 12])
@pytest.mark.parametrize("suffix", [".mp3", ".wav", ".flac", ".ogg", ".opus"])
def test_not_audio_is_one_true_line(capfd, bundle, tmp_path, content, suffix):
    """libsndfile hands unknown files to libmpg123, which wrote "Note: Illegal Audio-MPEG-Header ..."
    to the terminal itself, and libsndfile then said the existing file did not exist."""
    bad = tmp_path / f"notes{suffix}"
    bad.write_bytes(content)
    code = main(["transcribe", str(bad), "--model", str(bundle("tiny-untied"))])
    out, err = capfd.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"qasr: error: {bad}: not a readable audio file (")
    assert "does not exist" not in err


@pytest.mark.parametrize("where", ["/proc/nope", "a-file", "a-file/below"])
def test_output_dir_is_checked_before_any_work(capsys, tmp_path, monkeypatch, where):
    """A wrong --output-dir is one line before the model loads (here: a model that does not exist)."""
    monkeypatch.chdir(tmp_path)
    Path("a-file").write_text("")
    code, _, err = run(capsys, "transcribe", EN, "--model", "/nowhere/bundle", "--output-dir", where)
    assert code == 1 and _one_error_line(err).startswith(f"qasr: error: {where}: ")
    assert "output directory" in err


def test_export_checks_its_target_before_loading(capsys, tmp_path):
    code, _, err = run(capsys, "export", "someone/not-downloaded-yet", "--out", "/proc/nope/bundle")
    assert code == 1 and "/proc/nope" in _one_error_line(err)


@pytest.mark.parametrize("make", [
    lambda d: (d / "decoder.onnx.data").unlink(),
    lambda d: (d / "manifest.json").write_text("{"),
    lambda d: (d / "decoder.onnx").write_bytes(b"\x00garbage"),
    lambda d: (d / "tokenizer.json").write_text("[]"),
])
def test_damaged_bundle_one_line(capsys, bundle, tmp_path, make):
    damaged = tmp_path / "bundle"
    shutil.copytree(bundle("tiny"), damaged)
    make(damaged)
    code, _, err = run(capsys, "transcribe", EN, "--model", damaged)
    assert code == 1 and str(damaged) in _one_error_line(err)


def test_export_writes_nothing_on_failure(capsys, checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tiny"), broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "export", broken, "--out", tmp_path / "bundle")
    assert code == 1 and "model.safetensors" in _one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_export_unknown_model_id(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "export", "nobody/no-such-model", "--out", tmp_path / "b")
    assert code == 1 and "nobody/no-such-model" in _one_error_line(err)


def test_console_script_entry_point(bundle):
    """The installed `python -m qasr` path, in a fresh process: exit status and stderr only."""
    done = subprocess.run([sys.executable, "-m", "qasr", "transcribe", "/no/such.wav", "--model",
                           str(bundle("tiny"))], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == "qasr: error: /no/such.wav: no such file"
