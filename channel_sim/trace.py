"""Mahimahi trace replay: each millisecond timestamp is a chance for one 1500-byte packet to cross.

The trace loops with period T = last timestamp.  Bytes are served FIFO; one opportunity carries up to
1500 bytes of whatever is queued (a partly used opportunity can still carry the next message's bytes
if that message is queued by then); opportunities finding the queue empty are lost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .link import MTU_BYTES, Jitter, Link
from .paths import traces_dir

_EPS_MS = 1e-6  # an opportunity exactly at t counts, despite float rounding of t*1000


@dataclass(frozen=True)
class Trace:
    name: str
    timestamps_ms: np.ndarray  # sorted float64, ms

    @property
    def period_ms(self) -> float:
        return float(self.timestamps_ms[-1])

    @property
    def n(self) -> int:
        return len(self.timestamps_ms)

    @property
    def mean_bps(self) -> float:
        return self.n * MTU_BYTES * 8 / (self.period_ms / 1000.0)

    def stats(self) -> dict:
        """Statistics over full 1-second windows, as in shared/traces/README.md."""
        ts = self.timestamps_ms.astype(np.int64)
        nw = int(self.period_ms // 1000)
        counts = np.bincount(ts // 1000, minlength=nw + 1)[:nw]
        mbps = counts * MTU_BYTES * 8 / 1e6
        p5, p50, p95 = np.percentile(mbps, [5, 50, 95]) if nw else (0.0, 0.0, 0.0)
        return {
            "name": self.name,
            "packets": self.n,
            "duration_s": self.period_ms / 1000.0,
            "mean_mbps": self.mean_bps / 1e6,
            "p5_mbps": float(p5),
            "p50_mbps": float(p50),
            "p95_mbps": float(p95),
            "zero_seconds": int((counts == 0).sum()),
        }


def resolve_trace_path(name: str | Path) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    q = traces_dir() / str(name)
    if q.is_file():
        return q
    raise FileNotFoundError(f"trace {name!r} not found (looked in {traces_dir()})")


@lru_cache(maxsize=32)
def _load(path: str) -> np.ndarray:
    ts = np.loadtxt(path, dtype=np.float64, ndmin=1)
    return ts


def load_trace(name: str | Path) -> Trace:
    """Load a Mahimahi trace by file name (looked up in shared/traces) or path."""
    path = resolve_trace_path(name)
    ts = _load(str(path.resolve()))
    return trace_from_timestamps(ts, name=path.name)


def trace_from_timestamps(timestamps_ms: Sequence[float] | np.ndarray, name: str = "inline") -> Trace:
    ts = np.asarray(timestamps_ms, dtype=np.float64).ravel()
    if not np.isfinite(ts).all():
        raise ValueError("trace timestamps must be finite numbers (ms)")
    if ts.size == 0 or ts[-1] <= 0:
        raise ValueError("trace needs at least one timestamp and a positive period")
    if np.any(np.diff(ts) < 0) or ts[0] < 0:
        raise ValueError("trace timestamps must be non-negative and non-decreasing")
    ts = ts.copy()
    ts.setflags(write=False)
    return Trace(name=name, timestamps_ms=ts)


class TraceLink(Link):
    """Replay of a Mahimahi trace, started `offset_ms` into the trace, plus latency (and jitter)."""

    def __init__(
        self,
        trace: Trace,
        latency_s: float = 0.0,
        offset_ms: float | None = 0.0,
        jitter: Jitter | None = None,
        seed: int | None = None,
        strict: bool = False,
        mtu: int = MTU_BYTES,
    ):
        super().__init__(latency_s, jitter, seed)
        if int(mtu) != mtu or mtu <= 0:
            raise ValueError(f"mtu must be a positive integer (bytes per opportunity), got {mtu!r}")
        self.strict = bool(strict)  # mm-link: an opportunity exactly at t is already gone
        self.mtu = int(mtu)
        self.trace = trace
        self._ts = trace.timestamps_ms
        self._n = trace.n
        self._T = trace.period_ms
        if offset_ms is None:  # random start, seeded (separate stream from jitter)
            offset_ms = float(np.random.default_rng([0 if seed is None else seed, 7]).uniform(0, self._T))
        self.offset_ms = float(offset_ms) % self._T
        self._opp = -1  # global index of the last (partly) used opportunity
        self._opp_left = 0  # bytes still free in it

    # global opportunity index g <-> time (ms, trace clock: link time + offset)
    def _opp_time_ms(self, g: int) -> float:
        q, i = divmod(g, self._n)
        return float(self._ts[i]) + q * self._T

    def _first_opp(self, t_ms: float) -> int:
        """Index of the first opportunity at or after t_ms (trace clock)."""
        t_ms -= _EPS_MS
        m = math.floor(t_ms / self._T) - 1  # start a period early: tau_n + (m-1)T can equal t
        r = t_ms - m * self._T  # in [T, 2T)
        i = int(np.searchsorted(self._ts, r, side="left"))
        if i < self._n:
            g = m * self._n + i
        else:
            g = (m + 1) * self._n + int(np.searchsorted(self._ts, r - self._T, side="left"))
        return max(g, 0)

    def _to_link_s(self, t_ms: float) -> float:
        return (t_ms - self.offset_ms) / 1000.0

    def _usable_from(self, t_ms: float) -> int:
        """First opportunity a transfer entering an idle link at t_ms (trace clock) may use: `>= t`, or
        `> t` in strict (mm-link) mode, which burns every opportunity `<= now` before enqueueing."""
        return self._first_opp(t_ms + 2 * _EPS_MS if self.strict else t_ms)

    def _serialize(self, nbytes: int, start: float, queued: bool = False) -> float:
        start_ms = start * 1000.0 + self.offset_ms
        if nbytes == 0:
            return start
        if self._opp >= 0 and self._opp_left > 0:
            # FIFO byte sharing: the rest of a partly used opportunity carries the next transfer's bytes if
            # that transfer was queued by then (it entered at or before its time; before it, if strict)
            opp_ms = self._opp_time_ms(self._opp)
            at_or_after = start_ms <= opp_ms + _EPS_MS
            if (queued or not self.strict) and at_or_after or self.strict and start_ms < opp_ms - _EPS_MS:
                take = min(self._opp_left, nbytes)
                self._opp_left -= take
                nbytes -= take
                if nbytes == 0:
                    return self._to_link_s(opp_ms)
        # queued: it entered before `start`, so even strict mode may use an opportunity exactly at `start`
        g = max(self._first_opp(start_ms) if queued else self._usable_from(start_ms), self._opp + 1)
        k = -(-nbytes // self.mtu)
        self._opp = g + k - 1
        self._opp_left = k * self.mtu - nbytes
        return self._to_link_s(self._opp_time_ms(self._opp))

    def rate_at(self, t: float, window_s: float = 1.0) -> float:
        """Mean capacity over [t, t + window): opportunities x 12 kbit / window."""
        a = self._first_opp(t * 1000.0 + self.offset_ms)
        b = self._first_opp((t + window_s) * 1000.0 + self.offset_ms)
        return (b - a) * self.mtu * 8 / window_s

    def opportunities(self, t0: float, t1: float) -> np.ndarray:
        """Opportunity times in [t0, t1) on the link clock (for plots and the proxy)."""
        a = self._first_opp(t0 * 1000.0 + self.offset_ms)
        b = self._first_opp(t1 * 1000.0 + self.offset_ms)
        g = np.arange(a, b)
        q, i = np.divmod(g, self._n)
        return (self._ts[i] + q * self._T - self.offset_ms) / 1000.0

    def _extra_state(self) -> tuple:
        return (self._opp, self._opp_left)

    def _set_extra_state(self, state: tuple) -> None:
        self._opp, self._opp_left = state

    def _initial_extra_state(self) -> tuple:
        return (-1, 0)

    def __repr__(self) -> str:
        return (
            f"TraceLink({self.trace.name}, mean={self.trace.mean_bps / 1e6:.2f} Mbit/s,"
            f" offset={self.offset_ms:.0f} ms, latency={self.latency_s * 1e3:g} ms"
            f"{', strict' if self.strict else ''}, mtu={self.mtu})"
        )
