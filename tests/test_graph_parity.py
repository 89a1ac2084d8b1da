"""Parity tier 2: each exported graph on ONNX Runtime (fp32, CPU) against qasr.models.

Relative error <= 1e-4 on every output, and identical greedy ids when the runtime's own loop
drives the decoder graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from oracle import relative_error
from qasr.models.thinker import Thinker
from qasr.runtime.bundle import Bundle
from qasr.runtime.batch import greedy_decode
from qasr.runtime.backends.onnxruntime_cpu import OnnxRuntimeBackend
from qasr.runtime.windows import join_windows, split_windows

TOL = 1e-4
PRESETS = ["tiny", "tiny-untied", "tiny-mqa"]


@pytest.fixture(scope="module")
def pair(checkpoint, bundle):
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = (Thinker.from_pretrained(checkpoint(preset)), OnnxRuntimeBackend(Bundle.load(bundle(preset))))
        return cache[preset]

    return get


def _mel(speech, seconds):
    from qasr.kernels.fbank import log_mel

    return log_mel(speech(seconds))


@pytest.mark.parametrize("preset", PRESETS)
def test_encoder_and_projector_graphs(pair, speech, preset):
    model, backend = pair(preset)
    window = model.config.audio.window_frames
    for seconds in (0.45, 3.0, 8.0, 13.7):
        mel = _mel(speech, seconds)
        windows, frames, conv = split_windows(mel, window)
        hidden = backend.encode(windows, frames, conv)
        with torch.no_grad():
            expected = model.encoder(torch.from_numpy(windows), torch.from_numpy(frames), torch.from_numpy(conv))
        valid = join_windows(hidden, frames)
        assert relative_error(valid, join_windows(expected.numpy(), frames)) <= TOL
        assert relative_error(backend.project(valid), model.encode(mel)) <= TOL


def test_encoder_windows_batch_across_clips(pair, speech):
    """Windows of different clips in one call give each clip's own result (the batch is free)."""
    model, backend = pair("tiny")
    mels = [_mel(speech, 9.3), _mel(speech, 0.7)]
    parts = [split_windows(m, 800) for m in mels]
    batch = [np.concatenate(x) for x in zip(*parts)]
    hidden = backend.encode(*batch)
    first = len(parts[0][0])
    for mel, rows, (_, frames, _) in zip(mels, (hidden[:first], hidden[first:]), parts):
        assert relative_error(backend.project(join_windows(rows, frames)), model.encode(mel)) <= TOL


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("chunk", [512, 7])
def test_decoder_graph_logits_and_ids(pair, speech, preset, chunk):
    model, backend = pair(preset)
    embeds = model.encode(_mel(speech, 6.0))
    prompt = [151644, 8948, 198, 151645, 198, 151644, 872, 198, 151669] + [151676] * len(embeds) + [
        151670, 151645, 198, 151644, 77091, 198]
    expected = model.generate(prompt, embeds, max_new_tokens=16)
    run = greedy_decode(backend, prompt, embeds.numpy(), 151676, 16, (151645, 151643), keep_logits=True,
                        prefill_chunk=chunk)
    assert run.tokens == expected.tokens
    assert len(run.logits) == len(expected.logits)
    for step, (mine, ref) in enumerate(zip(run.logits, expected.logits)):
        assert relative_error(mine, ref) <= TOL, f"step {step}"


def test_tied_head_stored_once(bundle):
    """The head and the embedding name the same bytes of the data file (the head under an alias)."""
    path = Bundle.load(bundle("tiny")).graph_path("decoder")
    graph = onnx.load(str(path), load_external_data=False)
    tables = [t for t in graph.graph.initializer if list(t.dims) in ([151936, 48], [48, 151936])]
    regions = {tuple((e.key, e.value) for e in t.external_data) for t in tables}
    assert len(tables) == 2 and len(regions) == 1
    table_bytes = 151936 * 48 * 4
    assert path.with_name(path.name + ".data").stat().st_size < 1.5 * table_bytes


def test_graphs_use_opset_20(bundle):
    bundle_ = Bundle.load(bundle("tiny"))
    for name in bundle_.manifest["graphs"]:
        graph = onnx.load(str(bundle_.graph_path(name)), load_external_data=False)
        assert {o.domain: o.version for o in graph.opset_import}[""] == 20


def test_window_batches_join_exactly(pair, speech):
    """A recording past one encoder batch (64 s) whose last batch holds under one chunk of frames."""
    from qasr.kernels.fbank import log_mel
    from qasr.runtime.embed import WINDOW_BATCH, embed_audio

    model, backend = pair("tiny")
    seconds = WINDOW_BATCH * 8 + 0.45
    wave = speech(seconds)
    assert relative_error(embed_audio(backend, wave, 800), model.encode(log_mel(wave))) <= TOL


@pytest.mark.parametrize("preset", PRESETS)
def test_decoder_graph_batch_rows_on_one_shared_cache(pair, preset):
    """A decode step of three rows, each at its own position in its own region of one cache,
    against the reference, and against each row run alone on a copy of its own rows."""
    model, backend = pair(preset)
    t = model.config.text
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((t.num_hidden_layers, 2, 1, t.num_key_value_heads, 40, t.head_dim)).astype(np.float32)
    ids, starts, positions = np.array([100, 2000, 30000]), np.array([0, 10, 25]), np.array([7, 12, 3])
    past = [torch.from_numpy(cache[layer, kind]) for layer in range(t.num_hidden_layers) for kind in (0, 1)]
    with torch.no_grad():
        _, logits, rows = model.lm()(torch.from_numpy(ids)[:, None], torch.zeros(3, 1, t.hidden_size),
                                     torch.from_numpy(positions), torch.from_numpy(starts), *past)
        for b in range(3):
            own = [p[:, :, starts[b] : starts[b] + positions[b]] for p in past]
            _, alone, _ = model.lm()(torch.tensor([[ids[b]]]), torch.zeros(1, 1, t.hidden_size),
                                     torch.tensor([positions[b]]), torch.tensor([0]), *own)
            assert relative_error(logits[b], alone[0]) <= TOL
    backend.reserve(40, keep=False)
    backend.cache[:] = cache
    assert backend.step(ids, starts, positions).tolist() == logits.argmax(-1).tolist()
    assert relative_error(backend.step_logits(), logits) <= TOL
    for b, row in enumerate(starts + positions):
        assert relative_error(backend.cache[:, :, 0, :, row], rows[b, :, :, :, 0]) <= TOL
