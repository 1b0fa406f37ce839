"""The one question every channel model answers: a transfer of N bytes starting at t, when is its last
byte delivered?  `Link` holds the FIFO state shared by all models (when the transmitter frees up, the
last delivery time) so back-to-back transfers queue; subclasses only say how long serialization takes.

Times are seconds on the caller's clock (simulated, or seconds since the proxy started).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

MTU_BYTES = 1500
MAX_TIME_S = 1e9  # ~32 years: a larger t is a bug upstream, not a simulated time


def check_time(t: float, what: str = "t") -> float:
    """A time a link may be asked about: finite, >= 0 and below MAX_TIME_S (clear error otherwise)."""
    t = float(t)
    if not (0.0 <= t <= MAX_TIME_S):  # also false for NaN
        raise ValueError(f"{what} must be a finite time in [0, {MAX_TIME_S:g}] s, got {t!r}")
    return t


@dataclass(frozen=True)
class Jitter:
    """Extra one-way delay per transfer: none, normal(mean, sigma) truncated at 0, or uniform[low, high]."""

    dist: str = "none"
    sigma_s: float = 0.0
    mean_s: float = 0.0
    low_s: float = 0.0
    high_s: float = 0.0

    def __post_init__(self) -> None:
        if self.dist not in ("none", "normal", "uniform"):
            raise ValueError(f"unknown jitter distribution {self.dist!r}")
        if self.dist == "uniform" and not (0 <= self.low_s <= self.high_s):
            raise ValueError("uniform jitter needs 0 <= low <= high")
        if self.sigma_s < 0:
            raise ValueError("jitter sigma must be >= 0")

    def sample(self, rng: np.random.Generator) -> float:
        if self.dist == "none":
            return 0.0
        if self.dist == "uniform":
            return float(rng.uniform(self.low_s, self.high_s))
        if self.sigma_s == 0.0:
            return max(0.0, self.mean_s)
        # Truncated (not clipped) normal: redraw negatives; for mean 0 this is the half-normal.
        for _ in range(1000):
            x = rng.normal(self.mean_s, self.sigma_s)
            if x >= 0.0:
                return float(x)
        return 0.0

    @property
    def mean(self) -> float:
        if self.dist == "uniform":
            return 0.5 * (self.low_s + self.high_s)
        if self.dist == "normal":
            if self.sigma_s == 0.0:
                return max(0.0, self.mean_s)
            a = -self.mean_s / self.sigma_s
            phi = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
            return self.mean_s + self.sigma_s * phi / (1 - 0.5 * (1 + math.erf(a / math.sqrt(2))))
        return 0.0


class Link(ABC):
    """One direction of one client's link, with FIFO queueing of back-to-back transfers.

    `done(n, t)` = serialization (queued behind earlier transfers) + latency + jitter; deliveries never
    reorder (TCP is in-order).  `transmit` + `delay` are the two halves, used separately by the proxy.
    """

    def __init__(self, latency_s: float = 0.0, jitter: Jitter | None = None, seed: int | None = None):
        if latency_s < 0:
            raise ValueError("latency must be >= 0")
        self.latency_s = float(latency_s)
        self.jitter = jitter or Jitter()
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.busy_until = 0.0  # when the transmitter's queue frees up
        self.last_arrival = 0.0

    # ---- model-specific part -------------------------------------------------------------------
    @abstractmethod
    def _serialize(self, nbytes: int, start: float, queued: bool = False) -> float:
        """Time the last of `nbytes` has crossed, the transmitter being free from `start` on.
        `queued`: the transfer entered before `start` (behind an earlier one), not at it."""

    @abstractmethod
    def rate_at(self, t: float) -> float:
        """Capacity in bit/s at time t (what a single transfer would get)."""

    def _extra_state(self) -> tuple:
        return ()

    def _set_extra_state(self, state: tuple) -> None:
        pass

    # ---- shared FIFO machinery -------------------------------------------------------------------
    def transmit(self, nbytes: int, t: float) -> float:
        """Queue `nbytes` at t; return when its last byte has left the bottleneck (no latency)."""
        if isinstance(nbytes, bool) or int(nbytes) != nbytes or nbytes < 0:
            raise ValueError(f"nbytes must be an integer >= 0, got {nbytes!r}")
        t = check_time(t)
        start = max(t, self.busy_until)
        end = self._serialize(int(nbytes), start, t < start)
        self.busy_until = end
        return end

    def delay(self) -> float:
        """One propagation-delay sample: latency plus jitter."""
        return self.latency_s + self.jitter.sample(self._rng)

    def done(self, nbytes: int, t: float) -> float:
        """Arrival time of the last byte of a transfer of `nbytes` that starts at t."""
        end = self.transmit(nbytes, t)
        arrival = max(end + self.delay(), self.last_arrival)
        self.last_arrival = arrival
        return arrival

    def duration(self, nbytes: int, t: float = 0.0) -> float:
        """done(nbytes, t) - t without touching the link's state (for planning)."""
        return self.predict(nbytes, t) - t

    def predict(self, nbytes: int, t: float) -> float:
        """What done() would answer, leaving queue and random state untouched."""
        state = self.get_state()
        try:
            return self.done(nbytes, t)
        finally:
            self.set_state(state)

    def get_state(self) -> tuple:
        return (self.busy_until, self.last_arrival, self._rng.bit_generator.state, self._extra_state())

    def set_state(self, state: tuple) -> None:
        self.busy_until, self.last_arrival, rng_state, extra = state
        self._rng.bit_generator.state = rng_state
        self._set_extra_state(extra)

    def reset(self) -> None:
        """Empty queue, fresh random stream (same seed): a new experiment on the same link."""
        self.busy_until = 0.0
        self.last_arrival = 0.0
        self._rng = np.random.default_rng(self.seed)
        self._set_extra_state(self._initial_extra_state())

    def _initial_extra_state(self) -> tuple:
        return ()
