"""Capped exponential backoff, shared by the camera reconnect loop and the folder watcher."""

from __future__ import annotations

import random


class Backoff:
    """Delays `initial, initial*factor, ...` capped at `maximum`, with a little jitter.

    The jitter (± `jitter` of the delay) keeps a fleet of stations that lost the same camera
    server or Redis from retrying in lockstep. `reset()` after a success.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0, jitter: float = 0.1) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("need 0 < initial <= maximum, factor >= 1 and 0 <= jitter < 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt; counts the attempt."""
        # The exponent is capped so that a source that stays down for days cannot overflow a float.
        base = min(self.maximum, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return min(self.maximum, base)

    def reset(self) -> None:
        self.attempts = 0
