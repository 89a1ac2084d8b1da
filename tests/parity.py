"""Numeric checks shared by the GPU tests, with numpy alone: they must run where the official
package is not installed (a GPU machine), so nothing here imports the oracle or torch."""

from __future__ import annotations

import numpy as np

from qasr.kernels.fbank import log_mel
from qasr.runtime.decode import greedy_decode
from qasr.runtime.onnxruntime_backend import OnnxRuntimeBackend
from qasr.runtime.windows import join_windows, split_windows

EOS = (151645, 151643)
AUDIO = 151676
PROMPT_HEAD = [151644, 8948, 198, 151645, 198, 151644, 872, 198, 151669]
PROMPT_TAIL = [151670, 151645, 198, 151644, 77091, 198]


def relative_error(actual, expected) -> float:
    """max |a - e| / max |e|: the parity measure of the tiers (README, Parity). Takes numpy arrays
    or torch tensors (as arrays)."""
    actual, expected = _array(actual), _array(expected)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _array(x) -> np.ndarray:
    return np.asarray(x.detach().float() if hasattr(x, "detach") else x, dtype=np.float32)


def check_parity(candidate, reference: OnnxRuntimeBackend, speech, free_running: bool, tolerance: float) -> None:
    """Engine (or ORT on CUDA) against the fp32 graphs on the CPU, on real speech."""
    windows, frames, conv = split_windows(log_mel(speech(7.0)), 800)
    hidden = reference.encode(windows, frames, conv)
    assert relative_error(join_windows(candidate.encode(windows, frames, conv), frames),
                          join_windows(hidden, frames)) < tolerance
    embeds = reference.project(join_windows(hidden, frames))
    assert relative_error(candidate.project(join_windows(hidden, frames)), embeds) < tolerance
    prompt = PROMPT_HEAD + [AUDIO] * len(embeds) + PROMPT_TAIL
    expected = greedy_decode(reference, prompt, embeds, AUDIO, 24, (), keep_logits=True)
    logits = greedy_decode(candidate, prompt, embeds, AUDIO, 24, (), keep_logits=True,
                           forced=expected.tokens).logits  # teacher-forced along the reference's ids
    cosines = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(logits, expected.logits)]
    agree = np.mean([int(a.argmax()) == int(b.argmax()) for a, b in zip(logits, expected.logits)])
    assert min(cosines) >= 0.99 and agree >= 0.99, (min(cosines), agree)
    if free_running:
        got = greedy_decode(candidate, prompt, embeds, AUDIO, 24, EOS, prefill_chunk=64)
        assert got.tokens == greedy_decode(reference, prompt, embeds, AUDIO, 24, EOS, prefill_chunk=64).tokens


def check_batch(candidate, reference: OnnxRuntimeBackend, speech) -> None:
    """Five requests of different lengths, at most three per step (rows join and leave; TensorRT runs
    the buckets of 1, 2 and 4 rows), against each request alone on the fp32 graphs on the CPU."""
    from qasr.runtime.batch import BatchDecoder
    from qasr.runtime.decode import Sequence

    def sequences(backend) -> list[Sequence]:
        made = []
        for i, seconds in enumerate((7.0, 2.5, 11.0, 4.0, 1.2)):
            windows, frames, conv = split_windows(log_mel(speech(seconds, start=i)), 800)
            embeds = backend.project(join_windows(backend.encode(windows, frames, conv), frames))
            made.append(Sequence(PROMPT_HEAD + [AUDIO] * len(embeds) + PROMPT_TAIL, embeds, AUDIO, 8 + 4 * i, EOS))
        return made

    engine = BatchDecoder(candidate, max_batch=3, prefill_chunk=64)
    batched = sequences(reference)
    for sequence in batched:
        engine.add(sequence)
    engine.run()
    expected = [greedy_decode(reference, s.prompt, s.audio_embeds, AUDIO, s.budget, EOS, prefill_chunk=64).tokens
                for s in sequences(reference)]
    assert [s.result.tokens for s in batched] == expected
