"""Pauses in speech by frame energy: where a stream may close a segment, and where a live turn ends.

Both rules measure the same thing, the energy of short frames in dB, and both call a run of quiet
frames long enough a pause. They differ in what "quiet" means:
- a stream's segment (qasr.runtime.stream) is cut at the middle of the first pause past its target
  length; quiet is relative to the segment's own noise floor, so a noisy line still has pauses;
- a realtime turn (the server's `server_vad`) ends after `silence_duration_ms` of quiet following
  speech; quiet is below an absolute level set by OpenAI's `threshold`, as its clients expect.
Neither is a learned voice-activity detector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FLOOR_DB = 6.0     # segment pauses: quiet is within max(6 dB, 30 % of the segment's range) of its floor
FLOOR_RANGE = 0.3


def frame_energy_db(samples: np.ndarray, frame: int) -> np.ndarray:
    """Mean-square energy in dB of each whole `frame` of `samples` (a partial frame at the end is left out)."""
    whole = len(samples) // frame * frame
    power = np.mean(np.square(samples[:whole].reshape(-1, frame), dtype=np.float64), axis=1)
    return (10 * np.log10(power + 1e-10)).astype(np.float32)


def first_pause(energy: np.ndarray, need: int, begin: int) -> int | None:
    """The middle frame of the first run of `need` quiet frames that starts at or past frame
    `begin`, quiet relative to the floor of `energy` (its 10th percentile); None if none yet."""
    if len(energy) == 0:
        return None
    low, high = np.percentile(energy, 10), float(energy.max())
    quiet = energy <= low + max(FLOOR_DB, FLOOR_RANGE * (high - low))
    run = 0
    for i in range(max(0, begin - need), len(quiet)):
        run = run + 1 if quiet[i] else 0
        if run >= need and i - need + 1 >= begin:
            return i - need // 2
    return None


@dataclass
class TurnDetector:
    """Speech and pauses in 20 ms frames: speech above a level set by `threshold` (0-1, as OpenAI's:
    -60 dBFS at 0 to -20 dBFS at 1), a turn over after `silence_ms` of quiet."""

    rate: int
    threshold: float = 0.5
    silence_ms: int = 500
    speaking: bool = False
    quiet_ms: int = 0
    heard_ms: int = 0
    pending: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    def push(self, samples: np.ndarray) -> list[str]:
        """'start' / 'stop' for each change in these samples."""
        frame = self.rate // 50
        self.pending = np.concatenate([self.pending, samples])
        energy = frame_energy_db(self.pending, frame)
        self.pending = self.pending[len(energy) * frame:]
        level = -60 + 40 * self.threshold
        changes = []
        for loud in energy > level:
            self.heard_ms += 20
            if loud and not self.speaking:
                self.speaking, self.quiet_ms = True, 0
                changes.append("start")
            elif self.speaking:
                self.quiet_ms = 0 if loud else self.quiet_ms + 20
                if self.quiet_ms >= self.silence_ms:
                    self.speaking = False
                    changes.append("stop")
        return changes
