"""A step's tensors on the wire, padded or packed: the ONE framing of Train/Evaluate steps.

The edge client and the simulation engine build a step's frames here and read its "grad_h" back here; the
server packs its "grad_h" here; so the bytes the engine meters are exactly what an edge sends. Layout (the
public contract is `TrainRequest` in splitwave.proto):

* padded: "h" [batch, seq, hidden], "attention_mask" [batch, seq], "labels"; "grad_h" comes back like "h".
* packed (`RunConfig.packed_steps`): only real-token positions travel. "h" [tokens, hidden] = the rows of h
  where the mask is 1, row-major; "row_lengths" int32 [batch] replaces "attention_mask"; "labels" as
  padded, with seq = max(row_lengths). "grad_h" comes back [tokens, hidden] in the same order. SST-2 batches
  are ~37 % real tokens, so "h" and "grad_h" shrink ~2.7x, and losslessly: the server rebuilds the padded
  layout (zeros at padding), where nothing reaches a real position or a taken loss.

A step is packed only when that is lossless for a right-padded batch trimmed to its longest row (what
`TokenDataset.batch` gives): every mask row is ones then zeros, the longest row fills the width, and
per-token labels are IGNORE_INDEX at every padded position. Any other step goes padded (logged once).

Torch-free, numpy only. `encode` (default `codec.encode`) encodes "h", so a stateful encoder (e.g. error
feedback) can be put in its place; integer tensors always go `codec.encode` "raw".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from splitwave.protos import codec as _codec
from splitwave.protos import splitwave_pb2 as pb

log = logging.getLogger(__name__)

__all__ = [
    "ROW_LENGTHS",
    "IGNORE_INDEX",
    "Encode",
    "Step",
    "build_step",
    "grad_frames",
    "pack_rows",
    "packable_lengths",
    "prefix_lengths",
    "unpack_rows",
]

ROW_LENGTHS = "row_lengths"  # present in a step <=> the step is packed (self-describing, step by step)
# transformers' ignore index (= splitwave.common.tokens.IGNORE_INDEX; protos may not import common)
IGNORE_INDEX = -100

Encode = Callable[..., list[pb.TensorFrame]]  # encode(name, array, codec) -> frames, as codec.encode

_said_padded = False  # "this step goes padded" is logged once per process


def prefix_lengths(mask: ArrayLike) -> np.ndarray | None:
    """Row lengths (int32 [batch]) when every row of the 2-D 0/1 `mask` is ones then zeros with at least one
    one, and the longest row fills the width; None otherwise (left padding, holes, an all-padding column)."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        return None
    lengths = np.count_nonzero(m, axis=1)
    prefix = np.arange(m.shape[1])[None, :] < lengths[:, None]
    if lengths.min() < 1 or lengths.max() != m.shape[1] or not np.array_equal(m, prefix.astype(m.dtype)):
        return None
    return lengths.astype(np.int32)


def packable_lengths(mask: ArrayLike, labels: ArrayLike) -> np.ndarray | None:
    """`prefix_lengths(mask)` when packing this step is lossless, else None: per-token labels (same shape as
    the mask) must also be IGNORE_INDEX at every padded position, or the server's loss would see the zeros
    the packed form puts there."""
    lengths = prefix_lengths(mask)
    lab = np.asarray(labels)
    if lengths is None or lab.ndim != 2:
        return lengths
    if lab.shape != np.shape(mask) or not (lab[~_real(lengths, lab.shape[1])] == IGNORE_INDEX).all():
        return None
    return lengths


def _real(lengths: np.ndarray, seq: int) -> np.ndarray:
    """bool [batch, seq]: True at real-token positions (position < row length)."""
    return np.arange(seq)[None, :] < np.asarray(lengths)[:, None]


def pack_rows(x: ArrayLike, lengths: ArrayLike) -> np.ndarray:
    """[batch, seq, ...] -> [sum(lengths), ...]: the first lengths[i] positions of each row, row-major."""
    a = np.asarray(x)
    n = np.asarray(lengths)
    if a.ndim < 2 or n.shape != (a.shape[0],) or (n.size and (n.min() < 0 or n.max() > a.shape[1])):
        raise ValueError(f"row lengths {n.tolist()} do not fit a tensor of shape {list(a.shape)}")
    return a[_real(n, a.shape[1])]


def unpack_rows(packed: ArrayLike, lengths: ArrayLike, seq: int | None = None) -> np.ndarray:
    """[sum(lengths), ...] -> [batch, seq, ...], zeros at padded positions; seq defaults to max(lengths)."""
    p = np.asarray(packed)
    n = np.asarray(lengths, dtype=np.int64)
    seq = int(n.max(initial=0)) if seq is None else int(seq)
    if p.ndim < 1 or n.ndim != 1 or (n.size and (n.min() < 0 or n.max() > seq)) or p.shape[0] != int(n.sum()):
        raise ValueError(f"a packed tensor of shape {list(p.shape)} does not match row lengths {n.tolist()}")
    out = np.zeros((n.size, seq, *p.shape[1:]), dtype=p.dtype)
    out[_real(n, seq)] = p
    return out


@dataclass(frozen=True)
class Step:
    """The frames of one step as sent, and how to read its "grad_h" back into the edge's padded layout."""

    frames: list[pb.TensorFrame]
    batch: int
    seq: int  # of the edge's padded batch
    row_lengths: np.ndarray | None  # None: sent padded

    @property
    def packed(self) -> bool:
        return self.row_lengths is not None

    def messages(
        self,
        cls: Callable[..., Any],
        header: pb.Header,
        metrics: Mapping[str, float] | None = None,
        codec_down: str = "",
    ) -> list:
        """The step's request messages (`cls` = pb.TrainRequest or pb.EvalRequest): its frames, then end_step
        (`codec_down`: the grad_h codec a Train step asks for under a channel-aware policy; "": the run's)."""
        msgs = [cls(header=header, frame=f) for f in self.frames]
        end = pb.StepEnd(batch_size=self.batch, metrics=dict(metrics or {}), codec_down=codec_down)
        msgs.append(cls(header=header, end_step=end))
        return msgs

    def grad_h(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The reply's "grad_h" as [batch, seq, hidden] (a packed one unpacked, zeros at padding)."""
        g = tensors["grad_h"]
        if self.row_lengths is None:
            want: tuple[int, ...] = (self.batch, self.seq)
            if g.shape[:2] != want:
                raise ValueError(f"grad_h of shape {list(g.shape)} for a step of [batch, seq] = {list(want)}")
            return g
        if g.ndim != 2:
            raise ValueError(f"grad_h of shape {list(g.shape)} for a packed step: expected [tokens, hidden]")
        return unpack_rows(g, self.row_lengths, self.seq)


def build_step(
    h: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    codec: str | pb.CodecSpec = "raw",
    packed: bool = False,
    encode: Encode = _codec.encode,
) -> Step:
    """A step's frames: "h" with `codec` (through `encode`), then "attention_mask" (padded) or "row_lengths"
    (packed, when `packed` and `packable_lengths` allow it), then "labels"."""
    global _said_padded
    lengths = packable_lengths(mask, labels) if packed else None
    if packed and lengths is None and not _said_padded:
        _said_padded = True
        log.debug("a step's mask is not right-padded to its longest row (or labels at padding count): sent padded")
    b, s = int(mask.shape[0]), int(mask.shape[1])
    if lengths is None:
        frames = encode("h", h, codec)
        frames += _codec.encode("attention_mask", mask, "raw")
    else:
        frames = encode("h", pack_rows(h, lengths), codec)
        frames += _codec.encode(ROW_LENGTHS, lengths, "raw")
    frames += _codec.encode("labels", labels, "raw")
    return Step(frames, b, s, lengths)


def grad_frames(
    grad_h: np.ndarray,
    row_lengths: np.ndarray | None,
    codec: str | pb.CodecSpec = "raw",
    encode: Encode = _codec.encode,
) -> list[pb.TensorFrame]:
    """The server's "grad_h" frames for a step: packed to [tokens, hidden] when the step came packed
    (`row_lengths` = its "row_lengths"), else as computed ([batch, seq, hidden])."""
    return encode("grad_h", grad_h if row_lengths is None else pack_rows(grad_h, row_lengths), codec)
