"""Fixed-rate link: rate, latency, jitter, and loss modelled as TCP goodput (loss costs time, not data)."""
from __future__ import annotations

import math

from .link import Jitter, Link

MSS_BYTES = 1460
MATHIS_C = math.sqrt(1.5)


def mathis_goodput(rate_bps: float, loss: float, rtt_s: float, mss_bytes: int = MSS_BYTES) -> float:
    """R_eff = min(R(1-p), MSS*C/(RTT*sqrt p)) (Mathis et al., CCR 1997); R when p = 0."""
    if not 0.0 <= loss < 1.0:
        raise ValueError("loss probability must be in [0, 1)")
    if loss == 0.0:
        return float(rate_bps)
    lossy = rate_bps * (1.0 - loss)
    if rtt_s <= 0.0:
        return lossy
    return min(lossy, 8.0 * mss_bytes * MATHIS_C / (rtt_s * math.sqrt(loss)))


class StaticLink(Link):
    """done(N, t) = t + L + J + 8N / R_eff, with FIFO queueing."""

    def __init__(
        self,
        rate_bps: float,
        latency_s: float = 0.0,
        jitter: Jitter | None = None,
        loss: float = 0.0,
        seed: int | None = None,
        mss_bytes: int = MSS_BYTES,
    ):
        super().__init__(latency_s, jitter, seed)
        if rate_bps <= 0:
            raise ValueError("rate must be > 0")
        self.rate_bps = float(rate_bps)
        self.loss = float(loss)
        self.effective_rate_bps = mathis_goodput(self.rate_bps, self.loss, 2.0 * self.latency_s, mss_bytes)

    def _serialize(self, nbytes: int, start: float) -> float:
        return start + 8.0 * nbytes / self.effective_rate_bps

    def rate_at(self, t: float) -> float:
        return self.effective_rate_bps

    def __repr__(self) -> str:
        return (f"StaticLink(rate={self.rate_bps / 1e6:g} Mbit/s, eff={self.effective_rate_bps / 1e6:.3f} Mbit/s,"
                f" latency={self.latency_s * 1e3:g} ms, jitter={self.jitter.dist}, loss={self.loss:g})")
