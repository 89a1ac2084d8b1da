"""Batched decoding: many requests share each decoder step, each in its own region of one cache.

fp32 ids must be those of one request at a time. The checks run on `tiny-untied`, a random
checkpoint whose output follows the audio (different recordings give different ids), so equal
ids mean the rows did not leak into each other.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from qasr.errors import AudioError, UsageError
from qasr.runtime import transcribe as transcribe_module
from qasr.runtime.batch import ALIGN, BatchDecoder, Regions
from qasr.runtime.decode import Sequence
from qasr.runtime.prompt import prompt_ids
from qasr.runtime.transcribe import Transcriber
from support import DATA

FILES = ["en_16k_s16.wav", "de_22k.flac", "zh_16k_f32_loud.wav", "fr_48k.ogg", "it_8k_s32.wav",
         "es_16k_4ch.wav", "short_44k.wav"]


@pytest.fixture(scope="module")
def model(bundle):
    return Transcriber.load(bundle("tiny-untied"), backend="onnxruntime")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory, speech):
    """The fixtures plus a 12 s recording and one as an array: different lengths, so rows leave
    the batch at different steps and later ones join the running batch."""
    path = tmp_path_factory.mktemp("batch") / "speech_12s.wav"
    sf.write(path, speech(12.0, start=1), 16000, subtype="PCM_16")
    return [str(DATA / name) for name in FILES] + [str(path), (speech(3.3), 16000)]


def _fields(result):
    return result.token_ids, result.text, result.language, result.truncated


@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_ids_equal_one_at_a_time(model, recordings, batch_size):
    alone = list(model.transcribe_many(recordings, max_new_tokens=24))
    batched = list(model.transcribe_many(recordings, batch_size=batch_size, max_new_tokens=24))
    assert [a for a, _ in batched] == recordings  # input order
    assert [_fields(r) for _, r in batched] == [_fields(r) for _, r in alone]
    assert len({tuple(r.token_ids) for _, r in alone}) == len(recordings)  # the output follows the audio


def test_default_budgets_and_options_batch_too(model, recordings):
    """The budget grown from each recording's length (rows leave at their own EOS or budget), a
    forced language and a context."""
    options = {"language": "English", "context": "McDonald's"}
    alone = [model.transcribe(audio, **options) for audio in recordings[:4]]
    batched = [r for _, r in model.transcribe_many(recordings[:4], batch_size=4, **options)]
    assert [_fields(r) for r in batched] == [_fields(r) for r in alone]


def test_long_recordings_decode_their_parts_in_the_batch(model, recordings, monkeypatch):
    """A recording cut into parts (here near 7 s): each part is a request of its own, joined in order."""
    monkeypatch.setattr(transcribe_module, "MAX_SECONDS", 7)
    alone = [model.transcribe(audio, max_new_tokens=12) for audio in recordings[-2:]]
    batched = [r for _, r in model.transcribe_many(recordings[-2:], batch_size=4, max_new_tokens=12)]
    assert [_fields(r) for r in batched] == [_fields(r) for r in alone]


def test_a_bad_recording_yields_its_error_and_the_others_go_on(model, recordings, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    audios = [recordings[0], str(broken), recordings[1], str(tmp_path / "missing.flac"), recordings[2]]
    results = list(model.transcribe_many(audios, batch_size=2, max_new_tokens=10))
    assert [a for a, _ in results] == audios
    assert isinstance(results[1][1], AudioError) and isinstance(results[3][1], AudioError)
    good = [model.transcribe(a, max_new_tokens=10).token_ids for a in (recordings[0], recordings[1], recordings[2])]
    assert [results[i][1].token_ids for i in (0, 2, 4)] == good


def test_a_bad_option_is_each_recording_s_error(model, recordings):
    results = list(model.transcribe_many(recordings[:2], batch_size=2, language="Klingon"))
    assert all(isinstance(r, UsageError) for _, r in results)


def _sequences(model, recordings, budget):
    embeds = [model.encode(audio) for audio in recordings]
    return [Sequence(prompt_ids(model.tokenizer, "", None, len(e)), e, model.audio_token, budget, model.eos_ids,
                     keep_logits=True) for e in embeds]


def test_requests_join_at_the_next_step_and_leave_at_their_end(model, recordings):
    engine = BatchDecoder(model.backend, max_batch=2)
    first, second, third = _sequences(model, recordings[:3], budget=10)
    first.budget = 6
    engine.add(first)
    assert engine.step() == [] and len(engine.running) == 1  # prefill gave its first id, one step the second
    engine.add(second)
    engine.add(third)
    engine.step()
    assert engine.running == [first, second] and list(engine.waiting) == [third]  # the batch is full
    finished = engine.step() + engine.step() + engine.step()
    assert finished == [first] and engine.running == [second] and list(engine.waiting) == [third]
    engine.step()
    assert engine.running == [second, third] and not engine.waiting  # third took the free row
    assert engine.run() == [second, third] and engine.idle
    assert [len(s.result.tokens) for s in (first, second, third)] == [6, 10, 10]
    assert all(len(s.result.logits) == len(s.result.tokens) for s in (first, second, third))


def test_batched_logits_equal_one_at_a_time(model, recordings):
    """Not only the ids: every row's fp32 logits at every step, bit for bit, against the request alone."""
    batched = _sequences(model, recordings[:5], budget=12)
    engine = BatchDecoder(model.backend, max_batch=5)
    for sequence in batched:
        engine.add(sequence)
    engine.run()
    for sequence in _sequences(model, recordings[:5], budget=12):
        alone = BatchDecoder(model.backend, max_batch=1)
        alone.add(sequence)
        alone.run()
        mine = batched.pop(0)
        assert mine.result.tokens == sequence.result.tokens
        assert len(mine.result.logits) == len(sequence.result.logits) == 12
        assert all(np.array_equal(a, b) for a, b in zip(mine.result.logits, sequence.result.logits))


def test_each_row_s_cache_is_sized_by_its_own_budget(model, recordings):
    """One long request beside short ones: the cache holds the sum of their regions, not the
    batch size times the longest."""
    sequences = _sequences(model, recordings[:3], budget=8)
    sequences[1].budget = 600
    engine = BatchDecoder(model.backend, max_batch=3)
    for sequence in sequences:
        engine.add(sequence)
    engine.step()
    capacities = [s.capacity for s in sequences]
    assert model.backend.cache.shape[4] == engine.rows == sum(-(-c // ALIGN) * ALIGN for c in capacities)
    assert engine.rows < 3 * max(capacities) / 2
    engine.run()


def test_regions_are_placed_first_fit_and_reused():
    regions = Regions()
    a, b, c = regions.place(100), regions.place(10), regions.place(50)  # sizes round up to ALIGN = 64
    assert ALIGN == 64 and (a, b, c) == (0, 128, 192) and regions.end == 256
    regions.release(a)
    assert regions.place(64) == 0 and regions.place(64) == 64  # the freed [0, 128) holds both
    regions.release(b)
    assert regions.place(64) == 128  # the hole [128, 192) left by b
    assert regions.place(120) == 256  # too big for any hole: after the last region
    assert regions.end == 384


def test_cache_rows_past_the_reserve_are_refused(model):
    from qasr.errors import EngineError

    model.backend.reserve(16, keep=False)
    with pytest.raises(EngineError, match="past the 16 reserved"):
        model.backend.step(np.array([1]), np.array([10]), np.array([6]))


def test_a_request_the_cache_has_no_room_for_fails_alone(model, recordings):
    """As on an engine built for shorter audio: the newcomer gets the error, the batch goes on."""
    from qasr.errors import EngineError
    from qasr.runtime.backends.onnxruntime_cpu import OnnxRuntimeBackend

    class FixedCache(OnnxRuntimeBackend):
        def reserve(self, rows, keep=True):
            if rows > 1024:
                raise EngineError(f"the batch needs {rows} cache rows and the engine holds 1024")
            super().reserve(rows, keep)

    backend = FixedCache(model.bundle)
    first, second = _sequences(model, recordings[:2], budget=5)
    second.budget = 2000
    engine = BatchDecoder(backend, max_batch=2)
    engine.add(first)
    engine.step()
    engine.add(second)
    assert engine.step() == [second] and "1024" in str(second.error)
    assert engine.run() == [first] and first.error is None and len(first.result.tokens) == 5


def _tapped(steps, seen: list):
    """Pass a stream's steps through, noting each decoder request."""
    while True:
        try:
            sequence = next(steps)
        except StopIteration as stop:
            return stop.value
        seen.append(sequence)
        yield sequence


def test_streams_share_the_batch_and_keep_their_rows(model, recordings, speech):
    """Two streams' steps beside file requests, in one batch: each stream gives the events it gives
    alone, every step after its first reuses the cache rows its stream kept, and a file request
    gets the ids it gets alone."""
    from qasr.runtime.batcher import Batcher
    from qasr.runtime.options import TranscribeOptions

    clips = [speech(7.0, start=0), speech(7.0, start=1)]

    def texts(events):
        return [(e.text, e.committed, e.final) for e in events]

    alone = []
    for clip in clips:
        stream = model.stream(max_new_tokens=8)
        alone.append(texts(stream.feed(clip) + stream.finish()))
    files = [model.transcribe(path, max_new_tokens=8).token_ids for path in recordings[:2]]

    batcher = Batcher(model, 4)
    streams = [model.stream(max_new_tokens=8) for _ in clips]
    seen: list[list] = [[], []]
    jobs = [batcher.open_steps(_tapped(s.feed_steps(c), seen[i])) for i, (s, c) in enumerate(zip(streams, clips))]
    uploads = [batcher.open(path, TranscribeOptions(max_new_tokens=8)) for path in recordings[:2]]
    together = 0
    while not batcher.idle:
        owners = {id(s.owner) for s in batcher.engine.running if s.owner is not None}
        together = max(together, len(owners))
        batcher.step()
    finals = [batcher.open_steps(_tapped(s.finish_steps(), seen[i])) for i, s in enumerate(streams)]
    while not batcher.idle:
        batcher.step()
    assert together == 2  # the two streams' steps shared decode steps
    assert [texts(job.result + final.result) for job, final in zip(jobs, finals)] == alone
    assert [upload.result.token_ids for upload in uploads] == files
    for requests in seen:
        assert len(requests) == 4 and all(r.kept > 0 for r in requests[1:])
    assert not batcher.engine.kept  # finished streams leave no rows behind


def test_a_dropped_stream_s_rows_are_freed(model, speech):
    """A stream abandoned without finish() holds its region only until it is collected."""
    import gc

    stream = model.stream(max_new_tokens=4)
    stream.feed(speech(2.0))
    assert len(model.engine.kept) == 1
    del stream
    gc.collect()
    model.transcribe(speech(1.0), sample_rate=16000, max_new_tokens=2)
    assert not model.engine.kept and not model.engine.regions.taken


def test_options_are_one_object_with_known_fields():
    """Keywords build the options once, at the entry; a misspelt one fails like any wrong keyword."""
    from qasr.runtime.options import TranscribeOptions

    options = TranscribeOptions(context="names").with_fields(language="English", max_new_tokens=8)
    assert (options.language, options.context, options.max_new_tokens) == ("English", "names", 8)
    assert TranscribeOptions().with_fields() == TranscribeOptions()
    with pytest.raises(TypeError):
        TranscribeOptions().with_fields(langauge="English")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_encoder_is_released_once_the_last_recording_is_encoded(bundle, recordings, batch_size):
    """What `qasr transcribe` asks for (it exits after): the encoder and projector sessions leave once
    the last recording is encoded, not before, nothing else keeps them alive, and the ids are those
    of a model that keeps them; a later call loads them again."""
    import gc
    import weakref

    model = Transcriber.load(bundle("tiny-untied"), backend="onnxruntime")
    kept = [r.token_ids for _, r in model.transcribe_many(recordings[:4], max_new_tokens=12)]
    sessions = model.backend.sessions
    encoder = weakref.ref(sessions["encoder"])
    encoded, released_after = [], []  # recordings encoded; how many had been when the encoder left
    request, release = model.request, model.backend.release
    model.request = lambda recording, index: (encoded.append(recording.audio), request(recording, index))[1]
    model.backend.release = lambda graphs: (released_after.append(len(encoded)), release(graphs))

    results = [r.token_ids for _, r in model.transcribe_many(recordings[:4], batch_size=batch_size,
                                                              max_new_tokens=12, release_encoder=True)]
    gc.collect()
    assert results == kept
    assert released_after == [4]
    assert "encoder" not in sessions.ready and "projector" not in sessions.ready and encoder() is None
    assert model.transcribe(recordings[0], max_new_tokens=12).token_ids == kept[0]
    assert "encoder" in sessions.ready


def test_one_transcription_can_release_the_encoder(bundle, recordings):
    model = Transcriber.load(bundle("tiny-untied"), backend="onnxruntime")
    kept = model.transcribe(recordings[1], max_new_tokens=12).token_ids
    assert model.transcribe(recordings[1], max_new_tokens=12, release_encoder=True).token_ids == kept
    assert "encoder" not in model.backend.sessions.ready


@pytest.mark.parametrize("kind", ["traced", "fused int4"])
def test_a_deferred_decoder_loads_once_the_encoder_has_left(bundle, fused, recordings, kind):
    """`background_load=False`, what `qasr transcribe` of one recording asks for: nothing loads the
    decoder before its first call, which comes once the encoder and projector are released, so their
    weights and the decoder's are never resident together; the ids are a background load's."""
    path = bundle("tiny-untied") if kind == "traced" else fused("int4")
    kept = Transcriber.load(path, backend="onnxruntime").transcribe(recordings[1], max_new_tokens=12).token_ids
    model = Transcriber.load(path, backend="onnxruntime", background_load=False)
    sessions = model.backend.sessions
    assert set(sessions.ready) == {"encoder", "projector"} and not sessions.pending
    beside = []  # the sessions held when the decoder's was made
    load = sessions.load
    sessions.load = lambda name: (name == "decoder" and beside.append(sorted(sessions.ready)), load(name))[1]
    assert model.transcribe(recordings[1], max_new_tokens=12, release_encoder=True).token_ids == kept
    assert beside == [[]]
