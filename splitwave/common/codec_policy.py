"""Channel-aware codec choice: per step and per direction, the finest codec whose transfer fits a time budget.

On a wireless link the bytes set the round time, and clients' links differ by orders of magnitude, so one
fixed codec for a run is either too coarse for the good links or too slow for the bad ones. Given a ladder of
codecs ordered finest -> coarsest (e.g. raw, fp16, int8, int4), the tensor's dtype and shape, a rate estimate
(bytes/s) and the link's latency, `choose_codec` picks the first codec of the ladder whose transfer time

    latency_s + wire_bytes(codec) / rate

is within `budget_s`; when none fits, the coarsest (the last). Pure and deterministic (floats in, a ladder
member out); monotone in the rate: a higher rate never picks a coarser codec (the transfer time of every codec
falls with the rate, so the set of codecs that fit only grows).

Special rates, one rule each:
    rate NaN      no estimate yet (an edge before its first measured transfer): the finest codec; nothing says
                  the link is slow, and the first measurement corrects it
    rate 0        nothing crosses: no codec fits a finite budget, the coarsest
    rate inf      every codec takes `latency_s`: the finest if the latency is within the budget, else the
                  coarsest (the same rule as for any rate)
    rate < 0      ValueError (a bug upstream, not a link)

Sizes: `wire_bytes` is the codec's exact encoded size (`protos.codec.encoded_size`: values plus side bytes
such as int8 scales) plus a framing margin of FRAME_MARGIN_BYTES per frame (the frame's header and the
enclosing request message's header: measured 70-120 bytes for a step's "h", so the estimate is an upper bound
within 0.03 % for a 1 MiB frame). Codec-independent bytes that travel with the tensor (a step's mask, labels
and end-of-step) go in `extra_bytes`. Works with whatever codecs `protos.codec.CODECS` provides (int4 once it
is there), except "topk", whose size needs its k: it is refused in a ladder.

`RateEstimator` is the edge's running estimate of a direction's rate from its own transfers (real time);
the simulation engine reads the link model's rate instead (`Link.rate_at`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import CODECS, MAX_FRAME_BYTES, encoded_size
from splitwave.protos.steps import packable_lengths

__all__ = [
    "DIRECTIONS",
    "FRAME_MARGIN_BYTES",
    "PROBE_FRAME_BYTES",
    "KINDS",
    "CodecPolicy",
    "RateEstimator",
    "check_ladder",
    "choose_codec",
    "step_shapes",
    "transfer_s",
    "wire_bytes",
]

FRAME_MARGIN_BYTES = 256  # per frame: TensorFrame header + request header (session token, run id, round, step)
# grad_h's frame size when a policy steers the downlink: the edge times the frames' arrivals to estimate its
# downlink rate (one 1 MiB frame would arrive all at once); 256 of 64 KiB is 0.4 % more bytes at most
PROBE_FRAME_BYTES = 64 << 10
KINDS = ("fixed", "channel_aware")
DIRECTIONS = ("up", "down")
_NEEDS_PARAMETER = ("topk",)  # a codec whose size depends on a parameter the ladder does not carry


def check_ladder(ladder: Sequence[str], known: Iterable[str] = CODECS) -> tuple[str, ...]:
    """The ladder as a tuple; ValueError naming the problem when it is empty, repeats a codec, names a codec
    `known` lacks, or holds one whose size needs a parameter (topk)."""
    ladder = tuple(ladder)
    known = tuple(known)
    if not ladder:
        raise ValueError("the codec ladder is empty; give codecs from finest to coarsest, e.g. [raw, fp16, int8]")
    unknown = [c for c in ladder if c not in known]
    if unknown:
        raise ValueError(f"unknown codecs {unknown} in the ladder; a ladder takes codecs of {_usable(known)}")
    param = [c for c in ladder if c in _NEEDS_PARAMETER]
    if param:
        raise ValueError(f"codec {param[0]!r} cannot be in a ladder (its size depends on its k); use {_usable(known)}")
    dup = sorted({c for c in ladder if ladder.count(c) > 1})
    if dup:
        raise ValueError(f"codecs {dup} appear more than once in the ladder")
    return ladder


def _usable(known: Iterable[str]) -> list[str]:
    return [c for c in known if c not in _NEEDS_PARAMETER]


def wire_bytes(
    dtype: str,
    shape: Iterable[int],
    codec: str,
    frame_margin: int = FRAME_MARGIN_BYTES,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> int:
    """Bytes one tensor puts on the wire with `codec` in frames of at most `max_frame_bytes`: exact encoded size
    plus `frame_margin` per frame (an upper bound of the frame and request headers; the frame count is an upper
    bound of `encode`'s too)."""
    n = encoded_size(dtype, shape, codec)
    frames = max(1, -(-n // (max_frame_bytes - frame_margin)))
    return n + frames * frame_margin


def step_shapes(h: np.ndarray, mask: np.ndarray, labels: np.ndarray, packed: bool) -> tuple[tuple[int, ...], int]:
    """(shape "h" travels in, wire bytes of the step's other tensors) of a Train step as `protos.steps.build_step`
    frames it: packed ([tokens, hidden] and "row_lengths") when asked and lossless, else padded ("h" as is and
    "attention_mask"); "grad_h" comes back in the same shape."""
    lengths = packable_lengths(mask, labels) if packed else None
    other = wire_bytes(labels.dtype.name, labels.shape, "raw")
    if lengths is None:
        return tuple(h.shape), other + wire_bytes(mask.dtype.name, mask.shape, "raw")
    shape = (int(np.sum(lengths)), *h.shape[2:])
    return shape, other + wire_bytes(lengths.dtype.name, lengths.shape, "raw")


def transfer_s(nbytes: int, rate_Bps: float, latency_s: float = 0.0) -> float:
    """Seconds for `nbytes` at `rate_Bps` bytes/s after `latency_s` (rate 0: inf; rate inf: the latency)."""
    if rate_Bps == 0:
        return math.inf if nbytes > 0 else latency_s
    return latency_s + nbytes / rate_Bps


def choose_codec(
    ladder: Sequence[str],
    budget_s: float,
    dtype: str,
    shape: Iterable[int],
    rate_Bps: float,
    latency_s: float = 0.0,
    extra_bytes: int = 0,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> str:
    """The first codec of `ladder` (finest -> coarsest) whose transfer of a `dtype`/`shape` tensor (in frames of
    `max_frame_bytes`), plus `extra_bytes`, at `rate_Bps` bytes/s after `latency_s` takes at most `budget_s`;
    the last codec when none does. rate NaN (no estimate): the first; see the module docstring for 0 and inf."""
    if not ladder:
        raise ValueError("the codec ladder is empty")
    if not budget_s > 0:  # also refuses NaN
        raise ValueError(f"budget_s must be > 0, got {budget_s!r}")
    if not latency_s >= 0:
        raise ValueError(f"latency_s must be >= 0, got {latency_s!r}")
    if extra_bytes < 0:
        raise ValueError(f"extra_bytes must be >= 0, got {extra_bytes!r}")
    if math.isnan(rate_Bps):
        return ladder[0]
    if rate_Bps < 0:
        raise ValueError(f"rate must be >= 0 bytes/s (or NaN for unknown), got {rate_Bps!r}")
    shape = tuple(int(d) for d in shape)
    for codec in ladder:
        nbytes = wire_bytes(dtype, shape, codec, max_frame_bytes=max_frame_bytes) + int(extra_bytes)
        if transfer_s(nbytes, rate_Bps, latency_s) <= budget_s:
            return codec
    return ladder[-1]


@dataclass(frozen=True)
class CodecPolicy:
    """A run's codec policy (config `training.codec_policy`, sent to edges as `RunConfig.codec_policy`).

    kind "fixed": the run's codec_up/codec_down, as before. "channel_aware": each step's codec in the listed
    `directions` comes from `choose_codec` over `ladder` with `budget_s` per transfer (h up, grad_h down)."""

    kind: str = "fixed"
    ladder: tuple[str, ...] = ()
    budget_s: float = 1.0
    directions: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown codec policy kind {self.kind!r}; expected one of {list(KINDS)}")
        bad = sorted(set(self.directions) - set(DIRECTIONS))
        if bad:
            raise ValueError(f"unknown directions {bad}; expected some of {list(DIRECTIONS)}")
        if self.kind == "channel_aware":
            check_ladder(self.ladder)
            if not (self.budget_s > 0 and math.isfinite(self.budget_s)):
                raise ValueError(f"budget_s must be a finite number > 0, got {self.budget_s!r}")

    def steers(self, direction: str) -> bool:
        """Whether this policy picks the codec of `direction` ("up" or "down") per step."""
        return self.kind == "channel_aware" and direction in self.directions

    def choose(
        self,
        direction: str,
        dtype: str,
        shape: Iterable[int],
        rate_Bps: float,
        latency_s: float = 0.0,
        extra_bytes: int = 0,
    ) -> str | None:
        """This step's codec for `direction`, or None when the policy does not steer it (the fixed codec)."""
        if not self.steers(direction):
            return None
        frame = PROBE_FRAME_BYTES if direction == "down" else MAX_FRAME_BYTES
        return choose_codec(self.ladder, self.budget_s, dtype, shape, rate_Bps, latency_s, extra_bytes, frame)

    @property
    def grad_frame_bytes(self) -> int:
        """Frame size of grad_h: PROBE_FRAME_BYTES when the policy steers the downlink (the edge times them)."""
        return PROBE_FRAME_BYTES if self.steers("down") else MAX_FRAME_BYTES

    def allowed_down(self, default: str) -> tuple[str, ...]:
        """The grad_h codecs an edge may ask for (StepEnd.codec_down): the run's codec_down, and the ladder
        when the policy steers the downlink."""
        return (default, *(c for c in self.ladder if c != default)) if self.steers("down") else (default,)

    @classmethod
    def from_config(cls, c) -> CodecPolicy:
        """From `training.codec_policy` (splitwave.common.config.CodecPolicyConfig)."""
        return cls(c.kind, tuple(c.ladder), float(c.budget_s), frozenset(c.directions))

    def to_proto(self) -> pb.CodecPolicy | None:
        """`RunConfig.codec_policy`; None (unset) for "fixed", so a fixed run's messages are as before."""
        if self.kind == "fixed":
            return None
        return pb.CodecPolicy(
            kind=self.kind, ladder=list(self.ladder), budget_s=self.budget_s, directions=sorted(self.directions)
        )

    @classmethod
    def from_proto(cls, msg: pb.CodecPolicy, known: Iterable[str] = CODECS) -> CodecPolicy:
        """The policy a server sent; unset = fixed. Ladder codecs this side does not know are dropped (an older
        edge follows the policy with the codecs it has); nothing left, or an unknown kind: fixed."""
        known = set(known)
        ladder = tuple(c for c in msg.ladder if c in known and c not in _NEEDS_PARAMETER)
        if msg.kind != "channel_aware" or not ladder or not (msg.budget_s > 0 and math.isfinite(msg.budget_s)):
            return cls()
        return cls("channel_aware", ladder, float(msg.budget_s), frozenset(msg.directions) & set(DIRECTIONS))


class RateEstimator:
    """A running estimate of a direction's rate (bytes/s) from observed transfers (bytes, seconds).

    An exponentially weighted ratio: bytes and seconds are averaged separately (weight `alpha` for the newest
    transfer) and the estimate is their ratio. A transfer that looked instantaneous (its bytes sat in buffers)
    then adds its bytes and almost no time instead of an infinite rate, so one outlier cannot blow the
    estimate up. Transfers under `min_bytes` are ignored (they measure buffers and latency, not the rate).
    `rate` is NaN until the first counted transfer (`choose_codec` then picks the finest codec).
    """

    def __init__(self, alpha: float = 0.3, min_bytes: int = 4096):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha, self.min_bytes = float(alpha), int(min_bytes)
        self._bytes = 0.0
        self._seconds = 0.0
        self.samples = 0

    def observe(self, nbytes: int, seconds: float) -> None:
        """One transfer of `nbytes` that took `seconds` (non-finite or negative times are ignored)."""
        if nbytes < self.min_bytes or not (math.isfinite(seconds) and seconds >= 0):
            return
        a = self.alpha if self.samples else 1.0
        self._bytes = a * nbytes + (1 - a) * self._bytes
        self._seconds = a * seconds + (1 - a) * self._seconds
        self.samples += 1

    @property
    def rate(self) -> float:
        """Bytes/s; NaN before the first transfer, inf when every counted transfer took no measurable time."""
        if not self.samples:
            return math.nan
        return self._bytes / self._seconds if self._seconds > 0 else math.inf
