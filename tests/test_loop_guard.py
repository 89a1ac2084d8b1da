"""The loop guard: a repetition loop ends after the official fix's 20 repeats, its ids continued to
the budget, the same ids and text as decoding them when the loop holds, for fewer decoder steps."""

from __future__ import annotations


import numpy as np

from qasr.runtime.decode import LOOP_REPEATS, LoopGuard, Sequence
from qasr.runtime.prompt import fix_repetitions
from qasr.runtime.transcribe import Transcriber
from support import DATA



def periods(ids: list[int]) -> list[int | None]:
    guard, seen = LoopGuard(), []
    return [guard.period(seen := seen + [token]) for token in ids]


def test_a_loop_is_found_at_the_fix_s_threshold():
    found = periods([5, 6, 7] + [9] * LOOP_REPEATS)
    assert found[-1] == 1 and not any(found[:-1])
    found = periods([1, 2, 3] + [4, 8] * LOOP_REPEATS)
    assert found[-1] == 2 and not any(found[:-1])
    assert not any(periods([3] * (LOOP_REPEATS - 1) + [4] + [3] * (LOOP_REPEATS - 1)))  # broken: counted afresh
    assert not any(periods(list(range(21)) * 2))  # 21 ids repeated: longer than the longest period watched


class Looping:
    """A backend whose model falls into a loop: after `lead` ids it repeats `loop` for ever."""

    def __init__(self, backend, lead: list[int], loop: list[int]):
        self.backend, self.lead, self.loop, self.steps, self.fed = backend, lead, loop, 0, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _next(self) -> int:
        index, self.fed = self.fed, self.fed + 1
        return self.lead[index] if index < len(self.lead) else self.loop[(index - len(self.lead)) % len(self.loop)]

    def prefill(self, ids, audio, start, position):
        self.backend.prefill(ids, audio, start, position)
        return self._next()

    def step(self, ids, starts, positions):
        self.steps += 1
        self.backend.step(ids, starts, positions)
        return np.array([self._next()])


def test_same_ids_and_text_for_fewer_steps(bundle):
    """The real decoder runs every step; its choices are replaced by a model that loops."""
    model = Transcriber.load(bundle("tiny"), backend="onnxruntime")
    plain = model.backend
    runs = {}
    for guard in (False, True):
        model.backend = Looping(plain, lead=[300, 301, 302], loop=[400, 401, 402])
        try:
            result = model.transcribe(str(DATA / "en_16k_s16.wav"), max_new_tokens=200, language="English",
                                      loop_guard=guard)
        finally:
            steps, model.backend = model.backend.steps, plain
        runs[guard] = result, steps
    (full, full_steps), (guarded, guarded_steps) = runs[False], runs[True]
    assert guarded.token_ids == full.token_ids and len(full.token_ids) == 200
    assert guarded.text == full.text == fix_repetitions(full.text)
    assert guarded_steps == 3 + 3 * LOOP_REPEATS - 1 < full_steps == 199  # found after 20 full repeats


def test_teacher_forcing_never_stops_early():
    sequence = Sequence([1, 2], np.zeros((1, 4), np.float32), 9, budget=0, eos_ids=(0,), forced=[7] * 50,
                        loop_guard=True)
    assert sequence.guard is None
