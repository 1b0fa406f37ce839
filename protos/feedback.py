"""Error feedback (EF) for lossy codecs: what a codec failed to deliver is added to the next tensor.

A sender with EF encodes ``x + e`` instead of ``x`` and keeps ``e = (x + e) - decoded`` (per tensor name),
so the receiver's running sum of decoded tensors follows the sum of the inputs with an error that stays
at one codec error (``-e``) instead of growing with the number of tensors sent. That is what matters for
SGD: activations and gradients of many steps, or adapters of many rounds, add up. The wire format does not
change; a receiver cannot tell (see "Error feedback" in splitwave.proto).

Rules, all per name:
- a tensor whose shape or dtype differs from the residual's drops the residual (activations of different
  batches share a residual only when their shapes agree: a shorter last batch, another sequence length);
- raw (a raw fallback too) delivers ``x + e`` exactly, so the residual becomes zero;
- the codec may change from one tensor to the next (a per-step codec choice): the residual carries over;
- non-floating tensors (masks, labels) pass through untouched;
- a non-finite ``x + e`` drops the residual and ``x`` is sent as :func:`encode` would.

One instance per sender and peer (an edge holds one; the server one per client session): residuals never
cross clients, and a new session (a rejoin) starts from zero. Not thread-safe: one stream at a time.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import FLOAT_DTYPES, MAX_FRAME_BYTES, decode, encode

__all__ = ["ErrorFeedback"]

_NO_LIMIT = 1 << 62  # decoding our own frames: the receiver's size limits are not ours to apply


class ErrorFeedback:
    """Per-name residuals of a lossy codec; :meth:`encode` has :func:`splitwave.protos.codec.encode`'s
    signature, so a caller swaps ``ef.encode`` in for ``encode``."""

    def __init__(self) -> None:
        self._residuals: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._residuals)

    def residual(self, name: str) -> np.ndarray | None:
        """What has not been delivered of tensor `name` so far (None: nothing held)."""
        return self._residuals.get(name)

    def reset(self) -> None:
        """Forget every residual (a new session, a round redone from its start)."""
        self._residuals.clear()

    def encode(
        self,
        name: str,
        array: ArrayLike,
        codec: str | pb.CodecSpec = "raw",
        max_frame_bytes: int = MAX_FRAME_BYTES,
        *,
        topk_k: int | None = None,
        topk_fraction: float | None = None,
    ) -> list[pb.TensorFrame]:
        """The frames of ``array + residual(name)`` (see the module rules); updates the residual."""
        x = np.asarray(array)
        if x.dtype.name not in FLOAT_DTYPES:
            return encode(name, x, codec, max_frame_bytes, topk_k=topk_k, topk_fraction=topk_fraction)
        e = self._residuals.pop(name, None)
        if e is not None and (e.shape != x.shape or e.dtype != x.dtype):
            e = None  # another shape (batch, sequence length, rank): that residual belongs to no such tensor
        target = x if e is None else x + e
        if not np.isfinite(target).all():
            return encode(name, x, codec, max_frame_bytes, topk_k=topk_k, topk_fraction=topk_fraction)
        frames = encode(name, target, codec, max_frame_bytes, topk_k=topk_k, topk_fraction=topk_fraction)
        if frames[0].codec != "raw":
            decoded = decode(frames, max_tensor_bytes=_NO_LIMIT)[name]
            residual = target - decoded
            if np.any(residual):
                self._residuals[name] = residual
        return frames
