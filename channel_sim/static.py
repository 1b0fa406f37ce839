"""Fixed-rate link: rate, latency, jitter, and loss modelled as TCP goodput (loss costs time, not data)."""

from __future__ import annotations

import math

from .link import Jitter, Link

MSS_BYTES = 1460
MATHIS_C = math.sqrt(1.5)
MIN_RTO_S = 0.200  # Linux minimum retransmission timeout
LOSS_MODELS = ("goodput", "stall")


def mathis_goodput(rate_bps: float, loss: float, rtt_s: float, mss_bytes: int = MSS_BYTES) -> float:
    """R_eff = min(R(1-p), MSS*C/(RTT*sqrt p)) (Mathis et al., CCR 1997); R when p = 0."""
    if not 0.0 <= loss < 1.0:
        raise ValueError("loss probability must be in [0, 1)")
    if loss == 0.0:
        return float(rate_bps)
    lossy = rate_bps * (1.0 - loss)
    denom = rtt_s * math.sqrt(loss)
    if not denom > 0.0:  # no RTT (or one that underflows): the Mathis bound does not apply
        return lossy
    return min(lossy, 8.0 * mss_bytes * MATHIS_C / denom)


class StaticLink(Link):
    """done(N, t) = t + L + J + 8N / R_eff, with FIFO queueing.

    Loss on a TCP stream costs time, never bytes (channel.md section 1), in one of two models:
    `goodput` (default): R_eff = Mathis goodput; `stall`: R_eff = R, and each of the ceil(N/MSS) segments
    is lost with probability p, a loss adding one RTT (fast retransmit) or, for the last segment, the
    minimum RTO: the tail latency `goodput` averages away.
    """

    def __init__(
        self,
        rate_bps: float,
        latency_s: float = 0.0,
        jitter: Jitter | None = None,
        loss: float = 0.0,
        seed: int | None = None,
        mss_bytes: int = MSS_BYTES,
        loss_model: str = "goodput",
    ):
        super().__init__(latency_s, jitter, seed)
        if not (math.isfinite(rate_bps) and rate_bps > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate_bps!r}")
        if loss_model not in LOSS_MODELS:
            raise ValueError(f"loss_model must be one of {LOSS_MODELS}, got {loss_model!r}")
        if mss_bytes <= 0:
            raise ValueError("mss_bytes must be > 0")
        self.rate_bps = float(rate_bps)
        self.loss = float(loss)
        self.loss_model = loss_model
        self.mss_bytes = int(mss_bytes)
        if loss_model == "goodput":
            self.effective_rate_bps = mathis_goodput(self.rate_bps, self.loss, 2.0 * self.latency_s, mss_bytes)
        else:
            mathis_goodput(self.rate_bps, self.loss, 0.0)  # same check of p
            self.effective_rate_bps = self.rate_bps

    def _serialize(self, nbytes: int, start: float, queued: bool = False) -> float:
        end = start + 8.0 * nbytes / self.effective_rate_bps
        if self.loss_model == "stall" and self.loss > 0.0 and nbytes > 0:
            segments = -(-nbytes // self.mss_bytes)
            rtt = 2.0 * self.latency_s
            end += int(self._rng.binomial(segments - 1, self.loss)) * rtt
            if self._rng.uniform() < self.loss:
                end += max(MIN_RTO_S, rtt)
        return end

    def rate_at(self, t: float) -> float:
        return self.effective_rate_bps

    def __repr__(self) -> str:
        return (
            f"StaticLink(rate={self.rate_bps / 1e6:g} Mbit/s, eff={self.effective_rate_bps / 1e6:.3f} Mbit/s,"
            f" latency={self.latency_s * 1e3:g} ms, jitter={self.jitter.dist},"
            f" loss={self.loss:g} {self.loss_model})"
        )
