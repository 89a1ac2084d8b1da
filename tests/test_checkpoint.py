"""Checkpoint loading: the official layout, sharding, tied heads, and one clear line per defect."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qasr.cli import main
from qasr.errors import CheckpointError
from qasr.models.checkpoint import (
    EMBED_NAME,
    HEAD_NAME,
    INDEX_FILE,
    check_checkpoint,
    load_weights,
    parameter_counts,
)
from qasr.models.config import load_config, parse_config
from qasr.models.synthetic import PRESETS, make_checkpoint, official_config


@pytest.fixture
def broken(checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint to damage."""
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tiny"), target)
    return target


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_weights(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def _edit_config(path, edit) -> None:
    raw = json.loads((path / "config.json").read_text())
    edit(raw)
    (path / "config.json").write_text(json.dumps(raw))


def test_missing_directory(tmp_path):
    assert "config.json: missing" in _error(tmp_path / "nowhere")


def test_config_not_json(broken):
    (broken / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _error(broken)


def test_config_not_the_official_layout(broken):
    _edit_config(broken, lambda raw: raw.pop("thinker_config"))
    assert "no 'thinker_config' section" in _error(broken)


def test_unknown_model_type(broken):
    _edit_config(broken, lambda raw: raw["thinker_config"].update(model_type="whisper"))
    assert "unknown model type 'whisper'" in _error(broken)


def test_unsupported_window_is_named(broken):
    _edit_config(broken, lambda raw: raw["thinker_config"]["audio_config"].update(n_window=100))
    assert "n_window 100" in _error(broken)


def test_missing_weights(broken):
    (broken / "model.safetensors").unlink()
    assert "no model.safetensors" in _error(broken)


@pytest.mark.parametrize("damage", [lambda d: d[: len(d) // 2], lambda d: b"garbage" * 9, lambda d: b""])
def test_corrupt_safetensors(broken, damage):
    path = broken / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    message = _error(broken)
    assert str(path) in message and "not a valid safetensors file" in message


def test_wrong_shape_names_the_tensor(broken):
    tensors = load_file(broken / "model.safetensors")
    tensors["thinker.model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 48, dtype=torch.bfloat16)
    save_file(tensors, broken / "model.safetensors")
    message = _error(broken)
    assert "thinker.model.layers.1.mlp.up_proj.weight has shape [7, 48]" in message
    assert "[96, 48]" in message


def test_missing_tensor_is_named(broken):
    tensors = load_file(broken / "model.safetensors")
    del tensors["thinker.audio_tower.conv2d2.bias"]
    save_file(tensors, broken / "model.safetensors")
    assert "tensor thinker.audio_tower.conv2d2.bias not found" in _error(broken)


def test_sharded_equals_single(checkpoint, tmp_path):
    sharded = make_checkpoint(tmp_path / "sharded", "tiny-untied", seed=0, max_shard_bytes=3 << 20)
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    single = load_weights(checkpoint("tiny-untied"))
    split = load_weights(sharded)
    assert single.keys() == split.keys()
    assert all(torch.equal(single[k], split[k]) for k in single)


def test_missing_shard(tmp_path):
    sharded = make_checkpoint(tmp_path / "sharded", "tiny", seed=0, max_shard_bytes=3 << 20)
    (sharded / "model-00002-of-00004.safetensors").unlink()
    assert "model-00002-of-00004.safetensors: missing" in _error(sharded)


def test_tied_head_is_the_embedding(checkpoint):
    weights = load_weights(checkpoint("tiny"))
    assert weights[HEAD_NAME] is weights[EMBED_NAME]


def test_untied_head_is_its_own(checkpoint):
    weights = load_weights(checkpoint("tiny-untied"))
    assert not torch.equal(weights[HEAD_NAME], weights[EMBED_NAME])


def test_tied_head_that_differs_warns(broken):
    tensors = load_file(broken / "model.safetensors")
    tensors[HEAD_NAME] = tensors[HEAD_NAME] + 1
    save_file(tensors, broken / "model.safetensors")
    with pytest.warns(UserWarning, match="differs from embed_tokens"):
        weights = load_weights(broken)
    assert weights[HEAD_NAME] is weights[EMBED_NAME]


def test_aligner_config(checkpoint):
    config = load_config(checkpoint("tiny-aligner"))
    assert config.is_aligner and config.classify_num == 5000 and config.head_rows == 5000
    assert config.timestamp_token_id == 151705 and config.timestamp_segment_time == 80
    assert load_weights(checkpoint("tiny-aligner"))[HEAD_NAME].shape == (5000, 32)


@pytest.mark.parametrize("preset,expected", [
    ("0.6b", {"encoder": 184.7, "projector": 1.7, "decoder": 440.5, "embedding": 155.6, "head": 0}),
    ("1.7b", {"encoder": 314.3, "projector": 3.2, "decoder": 1409.4, "embedding": 311.2, "head": 0}),
    ("aligner", {"encoder": 314.3, "projector": 2.1, "decoder": 440.5, "embedding": 155.7, "head": 5.1}),
])
def test_released_shapes_have_the_published_sizes(preset, expected):
    counts = parameter_counts(parse_config(official_config(PRESETS[preset])))
    assert {k: round(v / 1e6, 1) for k, v in counts.items()} == expected


def test_check_reads_headers_only(checkpoint):
    files = check_checkpoint(checkpoint("tiny"))
    assert EMBED_NAME in files and HEAD_NAME in files


def test_cli_info_describes(checkpoint, capsys):
    assert main(["info", str(checkpoint("tiny-mqa"))]) == 0
    out = capsys.readouterr().out
    assert "4 s windows" in out and "4 q / 1 kv heads x 12" in out and "untied" in out


def test_cli_info_one_line_on_corrupt(broken, capsys):
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    assert main(["info", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qasr: error: ") and err.count("\n") == 1 and "Traceback" not in err
