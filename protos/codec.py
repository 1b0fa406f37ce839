"""The one tensor wire format: numpy arrays <-> chunked, optionally compressed ``TensorFrame`` messages.

Every tensor that crosses the wire (activations, gradients, labels, masks, LoRA factors, base-weight
deltas) goes through :func:`encode` and :class:`Assembler`, so compression, chunking under gRPC's message
limit and validation of untrusted input live in exactly one place. The byte layout is documented on
``TensorFrame`` in ``splitwave.proto`` (the public contract); this module implements it.

The receiver derives the exact encoded size from (dtype, shape, codec, topk_k) and checks it against its
limits before allocating, so a hostile or buggy peer cannot make it allocate more than it allows.

Encoding a finite tensor never fails on its values: a lossy codec that cannot represent them (fp16/bf16
overflow, an int8/int4 scale beyond float32) sends that tensor "raw" and says so in its frames, as the proto
promises; tests/test_codec_properties.py checks every codec's error bound and fallback with hypothesis.
Error feedback (a sender-side residual that makes a lossy codec's errors cancel over time) is a wrapper
around :func:`encode`: splitwave.protos.feedback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from splitwave.protos import splitwave_pb2 as pb

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CODECS",
    "CODECS",
    "FACTOR_CODECS",
    "DTYPES",
    "MAX_FRAME_BYTES",
    "DEFAULT_MAX_TENSOR_BYTES",
    "CodecError",
    "Assembler",
    "encode",
    "decode",
    "encoded_size",
    "adapter_codec_up",
    "factor_codec",
    "factor_codecs_accepted",
    "wire_size",
]

CODECS = ("raw", "fp16", "bf16", "int8", "topk", "int4")
LOSSY_CODECS = frozenset(CODECS) - {"raw"}
# What uploaded LoRA factors use by default (no `codec_adapter_up`): `codec_up` when it is one of these, else raw
FACTOR_CODECS = ("raw", "fp16", "bf16")
# What a run may choose for LoRA factors (`codec_adapter_up` / `codec_adapter_down`); never top-k, whose zeros
# would wipe most of an adapter
ADAPTER_CODECS = ("raw", "fp16", "bf16", "int8", "int4")
INT4_GROUP = 64  # int4: elements per float32 scale, consecutive along the last dimension
# Wire element types (always little-endian) of the dtypes the protocol allows.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
FLOAT_DTYPES = frozenset({"float32", "float64", "float16"})
MAX_FRAME_BYTES = 1 << 20
DEFAULT_MAX_TENSOR_BYTES = 1 << 29  # 512 MiB per tensor: far above any activation we send, bounds abuse
MAX_NDIM = 32
_U32_MAX = (1 << 32) - 1
_SIDE_FIELD = {"int8": "scales", "int4": "scales", "topk": "indices"}

_Body = tuple[bytes, bytes, int]  # (side bytes, value bytes, topk_k) of an encoded tensor


class CodecError(ValueError):
    """A tensor cannot be encoded or a received frame sequence is invalid.

    ``code`` is ``"invalid"`` (malformed input; the server answers INVALID_ARGUMENT) or ``"too_large"``
    (over a configured size limit; RESOURCE_EXHAUSTED).
    """

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------------
# layout shared by encoder and decoder
# --------------------------------------------------------------------------------------------------


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """int8/int4 rows/cols: rows = product of all but the last dim (a 0-d tensor is one row of one)."""
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _int4_groups(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, cols, groups per row) of int4: groups of INT4_GROUP along a row, the last one maybe shorter."""
    rows, cols = _rows_cols(shape)
    return rows, cols, -(-cols // INT4_GROUP)


def _section_sizes(dtype: str, shape: tuple[int, ...], codec: str, k: int) -> tuple[int, int]:
    """(side bytes, value bytes) of the encoded stream; the single source of the layout's sizes."""
    n = math.prod(shape)
    item = DTYPES[dtype].itemsize
    if codec == "raw":
        return 0, n * item
    if codec in ("fp16", "bf16"):
        return 0, n * 2
    if codec == "int8":
        return _rows_cols(shape)[0] * 4, n
    if codec == "int4":
        rows, _, groups = _int4_groups(shape)
        return rows * groups * 4, (n + 1) // 2
    if codec == "topk":
        return k * 4, k * item
    raise CodecError(f"unknown codec {codec!r}; expected one of {CODECS}")


def factor_codec(codec_up: str) -> str:
    """The default codec for uploaded LoRA factors under a run's `codec_up`: itself if it is lossless enough
    for factors (raw/fp16/bf16), else raw. A run's `codec_adapter_up` overrides it."""
    return codec_up if codec_up in FACTOR_CODECS else "raw"


def factor_codecs_accepted(codec_adapter_up: str) -> tuple[str, ...]:
    """The codecs a server accepts on uploaded factors when its run's adapter codec is `codec_adapter_up`:
    raw/fp16/bf16 always (older clients send those), int8 when the run allows int8 or int4, int4 only when it
    allows int4. Never top-k."""
    extra = {"int8": ("int8",), "int4": ("int8", "int4")}.get(codec_adapter_up, ())
    return FACTOR_CODECS + extra


def adapter_codec_up(config: pb.RunConfig) -> pb.CodecSpec:
    """The codec an edge uses for its PushAdapter frames: `RunConfig.codec_adapter_up` when the server set it,
    else (a server from before that field) `factor_codec(codec_up)`."""
    if config.HasField("codec_adapter_up"):
        return config.codec_adapter_up
    return pb.CodecSpec(codec=factor_codec(config.codec_up.codec))


def encoded_size(dtype: str, shape: Iterable[int], codec: str = "raw", topk_k: int = 0) -> int:
    """Bytes of tensor content (without framing) for this dtype/shape/codec."""
    side, values = _section_sizes(dtype, tuple(int(d) for d in shape), codec, int(topk_k))
    return side + values


def wire_size(frames: Iterable[pb.TensorFrame]) -> int:
    """Serialized bytes of a list of frames (what the transport carries, without enclosing headers)."""
    return sum(f.ByteSize() for f in frames)


# --------------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------------


def _dtype_name(arr: np.ndarray) -> str:
    name = arr.dtype.name
    if name not in DTYPES:
        raise CodecError(f"unsupported dtype {arr.dtype}; expected one of {sorted(DTYPES)}")
    return name


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), round-to-nearest-even; NaN stays a (quiet) NaN."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    b = f.view(np.uint32)
    # uint32 wrap-around only happens for NaN patterns, which are overwritten below.
    rounded = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        rounded[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _resolve_k(n: int, topk_k: int | None, topk_fraction: float | None) -> int:
    if topk_k is not None and topk_k > 0:
        return min(int(topk_k), n)
    if topk_fraction is None or topk_fraction == 0:
        raise CodecError("codec 'topk' needs topk_k > 0 or topk_fraction in (0, 1]")
    if not 0 < topk_fraction <= 1:
        raise CodecError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    return min(n, math.ceil(topk_fraction * n - 1e-9))


def _fp16(arr: np.ndarray, dtype: str) -> _Body | None:
    with np.errstate(over="ignore"):
        h = np.ascontiguousarray(arr, dtype="<f2")
    if dtype != "float16" and np.count_nonzero(np.isinf(h)) != np.count_nonzero(np.isinf(arr)):
        return None  # a finite value is beyond float16's range (|x| >= 65520 rounds to inf)
    return b"", h.tobytes(), 0


def _bf16(arr: np.ndarray, dtype: str) -> _Body | None:
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf on the way
        bits = _to_bf16_bits(arr).astype("<u2", copy=False)
    if dtype == "float16":  # bf16 is coarser than float16 near its top: 65504 rounds to 65536, inf in float16
        with np.errstate(over="ignore"):
            inf = np.isinf(_from_bf16_bits(bits).astype(np.float16))
    else:
        inf = (bits & np.uint16(0x7FFF)) == np.uint16(0x7F80)
    if np.count_nonzero(inf) != np.count_nonzero(np.isinf(arr)):
        return None  # a finite value would decode to +-inf
    return b"", bits.tobytes(), 0


def int8_scales(x: np.ndarray, qmax: int = 127) -> np.ndarray | None:
    """Float32 scales along the last axis of a float64 array (int8: [rows, cols] -> per row; int4 with
    qmax=7: [rows, groups, 64] -> per group): absmax/qmax rounded UP to a float32, so |x / scale| <= qmax and
    a non-zero row never gets scale 0; 0 for an all-zero row. None when some qmax * scale is not a finite
    float32 (only values at the top of float32's range, or float64 beyond it)."""
    absmax = np.abs(x).max(axis=-1) if x.shape[-1] > 0 else np.zeros(x.shape[:-1])
    with np.errstate(over="ignore", under="ignore"):
        scale = np.asarray((absmax / qmax).astype(np.float32))
        low = scale.astype(np.float64) * qmax < absmax  # exact in float64 (24 + 7 significant bits)
        scale[low] = np.nextafter(scale[low], np.float32(np.inf))
        top = np.float32(qmax) * scale
    return scale if np.isfinite(top).all() else None


def _int8(arr: np.ndarray) -> _Body | None:
    rows, cols = _rows_cols(arr.shape)
    x = arr.astype(np.float64).reshape(rows, cols)
    scale = int8_scales(x)
    if scale is None:
        return None
    s64 = scale.astype(np.float64)[:, None]
    q = np.divide(x, s64, out=np.zeros_like(x), where=s64 > 0)
    q = np.clip(np.rint(q), -127, 127).astype(np.int8)
    return scale.astype("<f4").tobytes(), q.tobytes(), 0


def _int4(arr: np.ndarray) -> _Body | None:
    rows, cols, groups = _int4_groups(arr.shape)
    x = arr.astype(np.float64).reshape(rows, cols)
    pad = groups * INT4_GROUP - cols
    xg = (np.pad(x, ((0, 0), (0, pad))) if pad else x).reshape(rows, groups, INT4_GROUP)
    scale = int8_scales(xg, 7)
    if scale is None:
        return None
    s64 = scale.astype(np.float64)[:, :, None]
    q = np.divide(xg, s64, out=np.zeros_like(xg), where=s64 > 0)
    q = np.clip(np.rint(q), -7, 7).astype(np.int8).reshape(rows, groups * INT4_GROUP)[:, :cols].reshape(-1)
    return scale.astype("<f4").tobytes(), pack_nibbles(q).tobytes(), 0


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit values (flat int8 in [-8, 7]) -> bytes, two per byte, low nibble first; an odd count
    leaves the last high nibble 0."""
    u = (q.astype(np.uint8) & np.uint8(0x0F)).reshape(-1)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return u[0::2] | (u[1::2] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """(the first n signed 4-bit values as int8, the padding nibble: 0 unless n is odd) of packed bytes."""
    b = np.asarray(packed, dtype=np.uint8)
    u = np.empty(b.size * 2, dtype=np.uint8)
    u[0::2], u[1::2] = b & np.uint8(0x0F), b >> np.uint8(4)
    pad = int(u[n]) if u.size > n else 0
    q = u[:n].astype(np.int8)
    q[q > 7] -= 16
    return q, pad


def topk_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` elements of largest |x|; of equal |x| the lower index wins, so the
    choice is deterministic (= the first k of a stable sort by descending |x|). O(n)."""
    n = flat.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    a = np.abs(flat)
    part = np.argpartition(a, n - k)
    kept = part[n - k :]
    t = a[part[n - k]]  # the k-th largest |x|
    if np.count_nonzero(a[kept] == t) == np.count_nonzero(a == t):
        return np.sort(kept)  # no element equal to the threshold was left out: nothing to break
    greater = np.flatnonzero(a > t)
    ties = np.flatnonzero(a == t)[: k - greater.size]
    return np.sort(np.concatenate([greater, ties]))


def _topk(arr: np.ndarray, wire: np.dtype, topk_k: int | None, topk_fraction: float | None) -> _Body:
    flat = np.ascontiguousarray(arr).reshape(-1)
    n = flat.size
    if n > _U32_MAX:
        raise CodecError("codec 'topk' supports tensors with at most 2**32-1 elements")
    k = _resolve_k(n, topk_k, topk_fraction)
    idx = topk_indices(flat, k)
    return idx.astype("<u4").tobytes(), flat[idx].astype(wire).tobytes(), k


def _encode_body(
    arr: np.ndarray, dtype: str, codec: str, topk_k: int | None, topk_fraction: float | None
) -> tuple[str, bytes, bytes, int]:
    """(codec used, side, values, topk_k). A lossy codec that cannot represent a finite tensor (fp16/bf16
    overflow, int8/int4 scale beyond float32) falls back to "raw" for this tensor; the frames say so."""
    wire = DTYPES[dtype]
    if codec in ("int8", "int4", "topk") and not np.isfinite(arr).all():
        raise CodecError(f"codec {codec!r} needs finite values; tensor has NaN/Inf")
    if codec == "fp16":
        body = _fp16(arr, dtype)
    elif codec == "bf16":
        body = _bf16(arr, dtype)
    elif codec == "int8":
        body = _int8(arr)
    elif codec == "int4":
        body = _int4(arr)
    elif codec == "topk":
        body = _topk(arr, wire, topk_k, topk_fraction)
    elif codec == "raw":
        body = None
    else:
        raise CodecError(f"unknown codec {codec!r}; expected one of {CODECS}")
    if body is None:
        if codec != "raw":
            log.debug("codec %s cannot represent this tensor (%s %s): sent raw", codec, dtype, list(arr.shape))
        return "raw", b"", np.ascontiguousarray(arr, dtype=wire).tobytes(), 0
    return (codec, *body)


def _varint_len(v: int) -> int:
    return max(1, (v.bit_length() + 6) // 7)


def encode(
    name: str,
    array: ArrayLike,
    codec: str | pb.CodecSpec = "raw",
    max_frame_bytes: int = MAX_FRAME_BYTES,
    *,
    topk_k: int | None = None,
    topk_fraction: float | None = None,
) -> list[pb.TensorFrame]:
    """Encode ``array`` as a list of ``TensorFrame`` messages, each serializing to <= ``max_frame_bytes``.

    ``codec`` is a codec name or a ``CodecSpec`` message (whose topk fields then apply). Lossy codecs
    apply to floating tensors only; send integer/bool tensors with "raw". A lossy codec that cannot
    represent this tensor's finite values sends it "raw" instead (the frames' ``codec`` says which), so
    encoding a finite tensor never fails on its values.
    """
    if isinstance(codec, pb.CodecSpec):
        topk_k = codec.topk_k or topk_k
        topk_fraction = codec.topk_fraction or topk_fraction
        codec = codec.codec or "raw"
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected one of {CODECS}")
    if not name:
        raise CodecError("tensor name must not be empty")
    arr = np.asarray(array)
    dtype = _dtype_name(arr)
    if codec in LOSSY_CODECS and dtype not in FLOAT_DTYPES:
        raise CodecError(f"codec {codec!r} applies to floating tensors only; send {dtype} tensor {name!r} raw")
    if arr.ndim > MAX_NDIM:
        raise CodecError(f"tensor {name!r} has {arr.ndim} dims; at most {MAX_NDIM} allowed")
    codec, side, values, k = _encode_body(arr, dtype, codec, topk_k, topk_fraction)

    shape = [int(d) for d in arr.shape]
    probe = pb.TensorFrame(
        name=name, dtype=dtype, shape=shape, codec=codec, topk_k=k, frame_index=_U32_MAX, frame_count=_U32_MAX
    )
    # Upper bound of everything but the chunk bytes: header plus tag and length of two bytes fields.
    overhead = probe.ByteSize() + 2 * (1 + _varint_len(max_frame_bytes))
    budget = max_frame_bytes - overhead
    if budget < 1:
        raise ValueError(f"max_frame_bytes={max_frame_bytes} leaves no room for data after {overhead} header bytes")
    total = len(side) + len(values)
    count = max(1, -(-total // budget))
    if count > _U32_MAX:
        raise CodecError(f"tensor {name!r} needs {count} frames; raise max_frame_bytes", "too_large")
    frames = []
    for i in range(count):
        lo, hi = i * budget, min(total, (i + 1) * budget)
        frame = pb.TensorFrame(
            name=name, dtype=dtype, shape=shape, codec=codec, topk_k=k, frame_index=i, frame_count=count
        )
        if lo < len(side):
            setattr(frame, _SIDE_FIELD[codec], side[lo : min(hi, len(side))])  # only int8/int4/topk have side bytes
        if hi > len(side):
            frame.payload = values[max(lo - len(side), 0) : hi - len(side)]
        frames.append(frame)
    return frames


# --------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------


_Meta = tuple[str, str, tuple[int, ...], str, int, int]  # (name, dtype, shape, codec, topk_k, frame_count)


@dataclass
class _Pending:
    """A tensor whose frames are arriving."""

    meta: _Meta  # must not change between frames
    side_len: int
    total: int
    decoded_bytes: int
    buf: bytearray
    next_index: int = 1
    filled: int = 0

    @property
    def name(self) -> str:
        return self.meta[0]


@dataclass
class Assembler:
    """Reassembles and decodes tensors from frames received in order, validating everything.

    ``add(frame)`` returns ``(name, array)`` when a tensor's last frame arrives, else None. Completed
    tensors are also kept until :meth:`finish` (call it at an end-of-step/end-of-stream marker: it fails
    when a tensor is incomplete and returns and forgets the completed ones). Any violation raises
    :class:`CodecError` and leaves the assembler unusable for the stream (call :meth:`reset`).
    """

    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_total_bytes: int | None = None  # bound on decoded bytes held until finish(); None = no bound
    allow_nonfinite: bool = False
    _pending: _Pending | None = field(default=None, init=False, repr=False)
    _done: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _held: int = field(default=0, init=False, repr=False)

    @property
    def in_progress(self) -> str | None:
        """Name of the tensor currently being assembled, if any."""
        return self._pending.name if self._pending else None

    def reset(self) -> None:
        self._pending, self._done, self._held = None, {}, 0

    def finish(self) -> dict[str, np.ndarray]:
        """Return (and forget) the tensors completed so far; fails if one is still missing frames."""
        if self._pending is not None:
            p = self._pending
            raise CodecError(
                f"tensor {p.name!r} incomplete: got {p.next_index} of {p.meta[5]} frames ({p.filled}/{p.total} bytes)"
            )
        done = self._done
        self._done, self._held = {}, 0
        return done

    def add(self, frame: pb.TensorFrame) -> tuple[str, np.ndarray] | None:
        meta: _Meta = (frame.name, frame.dtype, tuple(frame.shape), frame.codec, frame.topk_k, frame.frame_count)
        p = self._pending
        if p is None:
            if frame.frame_index != 0:
                raise CodecError(f"tensor {frame.name!r}: frame {frame.frame_index} received before frame 0")
            p = self._pending = self._start(meta)
        else:
            if frame.name != p.name:
                raise CodecError(f"frame of {frame.name!r} received while tensor {p.name!r} is incomplete")
            if frame.frame_index != p.next_index:
                raise CodecError(
                    f"tensor {p.name!r}: expected frame {p.next_index}, got {frame.frame_index} (missing or out of order)"
                )
            if meta != p.meta:
                raise CodecError(f"tensor {p.name!r}: dtype/shape/codec/topk_k/frame_count changed between frames")
            p.next_index += 1
        self._fill(p, frame)
        if frame.frame_index + 1 < p.meta[5]:
            return None
        if p.filled != p.total:
            raise CodecError(f"tensor {p.name!r} truncated: {p.filled} of {p.total} bytes in {p.meta[5]} frames")
        self._pending = None
        arr = self._decode(p)
        self._done[p.name] = arr
        return p.name, arr

    # -- internals ---------------------------------------------------------------------------------

    def _start(self, meta: _Meta) -> _Pending:
        name, dtype, shape, codec, k, count = meta
        if not name:
            raise CodecError("tensor frame without a name")
        if name in self._done:
            raise CodecError(f"tensor {name!r} received twice")
        if dtype not in DTYPES:
            raise CodecError(f"tensor {name!r}: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        if codec not in CODECS:
            raise CodecError(f"tensor {name!r}: unknown codec {codec!r}; expected one of {CODECS}")
        if codec in LOSSY_CODECS and dtype not in FLOAT_DTYPES:
            raise CodecError(f"tensor {name!r}: codec {codec!r} is not allowed for dtype {dtype}")
        if len(shape) > MAX_NDIM:
            raise CodecError(f"tensor {name!r}: {len(shape)} dims; at most {MAX_NDIM} allowed")
        if any(d < 0 for d in shape):
            raise CodecError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
        n = math.prod(shape)  # Python ints: no overflow, huge dims are caught by the size limit below
        decoded = n * DTYPES[dtype].itemsize
        if codec != "topk" and k != 0:
            raise CodecError(f"tensor {name!r}: topk_k set for codec {codec!r}")
        if codec == "topk" and (k > n or n > _U32_MAX):
            raise CodecError(f"tensor {name!r}: topk_k={k} invalid for {n} elements")
        side, values = _section_sizes(dtype, shape, codec, k)
        total = side + values
        limit = self.max_tensor_bytes
        if decoded > limit or total > limit:
            raise CodecError(
                f"tensor {name!r} of shape {list(shape)} {dtype} ({max(decoded, total)} bytes) exceeds the "
                f"limit of {limit} bytes",
                "too_large",
            )
        if self.max_total_bytes is not None and self._held + decoded > self.max_total_bytes:
            raise CodecError(
                f"tensor {name!r} ({decoded} bytes) would exceed the total limit of {self.max_total_bytes} bytes "
                f"({self._held} already held)",
                "too_large",
            )
        if math.prod(max(d, 1) for d in shape) * DTYPES[dtype].itemsize >= 1 << 63:  # empty, yet beyond numpy
            raise CodecError(f"tensor {name!r}: shape {list(shape)[:8]} has dimensions too large for any array")
        if count < 1 or count > max(1, total):
            raise CodecError(f"tensor {name!r}: frame_count={count} invalid for {total} encoded bytes")
        return _Pending(meta=meta, side_len=side, total=total, decoded_bytes=decoded, buf=bytearray(total))

    def _fill(self, p: _Pending, frame: pb.TensorFrame) -> None:
        codec = p.meta[3]
        side_field = _SIDE_FIELD.get(codec)
        for other in ("scales", "indices"):
            if other != side_field and getattr(frame, other):
                raise CodecError(f"tensor {p.name!r}: field {other!r} is not used by codec {codec!r}")
        side = getattr(frame, side_field) if side_field else b""
        payload = frame.payload
        if not side and not payload and p.total > 0:
            raise CodecError(f"tensor {p.name!r}: frame {frame.frame_index} carries no data")
        if side:
            if p.filled + len(side) > p.side_len:
                raise CodecError(f"tensor {p.name!r}: more {side_field} bytes than the declared shape implies")
            p.buf[p.filled : p.filled + len(side)] = side
            p.filled += len(side)
        if payload:
            if p.filled < p.side_len:
                raise CodecError(f"tensor {p.name!r}: payload received before all {side_field} bytes")
            if p.filled + len(payload) > p.total:
                raise CodecError(f"tensor {p.name!r}: more payload bytes than the declared shape implies")
            p.buf[p.filled : p.filled + len(payload)] = payload
            p.filled += len(payload)

    def _decode(self, p: _Pending) -> np.ndarray:
        name, dtype, shape, codec, k, _ = p.meta
        wire = DTYPES[dtype]
        mv = memoryview(p.buf)
        side, values = mv[: p.side_len], mv[p.side_len :]
        if codec == "raw":
            if dtype == "bool" and np.frombuffer(values, np.uint8).max(initial=0) > 1:
                raise CodecError(f"tensor {name!r}: bool values must be 0 or 1")
            arr = np.frombuffer(values, wire).reshape(shape)
        elif codec == "fp16":
            arr = np.frombuffer(values, "<f2").astype(wire).reshape(shape)
        elif codec == "bf16":
            arr = _from_bf16_bits(np.frombuffer(values, "<u2")).astype(wire).reshape(shape)
        elif codec == "int8":
            rows, cols = _rows_cols(shape)
            scales = np.frombuffer(side, "<f4")
            if not (np.isfinite(scales).all() and (scales >= 0).all()):
                raise CodecError(f"tensor {name!r}: int8 scales must be finite and >= 0")
            q = np.frombuffer(values, np.int8).reshape(rows, cols)
            if q.size and q.min() < -127:
                raise CodecError(f"tensor {name!r}: int8 value -128 is outside [-127, 127]")
            arr = (q.astype(np.float32) * scales[:, None]).astype(wire).reshape(shape)
        elif codec == "int4":
            arr = self._decode_int4(name, shape, side, values).astype(wire)
        elif codec == "topk":
            idx = np.frombuffer(side, "<u4").astype(np.int64)
            n = math.prod(shape)
            if idx.size and (idx[-1] >= n or (idx.size > 1 and (np.diff(idx) <= 0).any())):
                raise CodecError(f"tensor {name!r}: top-k indices must be strictly increasing and < {n}")
            arr = np.zeros(n, dtype=wire)
            arr[idx] = np.frombuffer(values, wire)
            arr = arr.reshape(shape)
        else:  # unreachable: validated in _start
            raise CodecError(f"unknown codec {codec!r}")
        if not self.allow_nonfinite and dtype in FLOAT_DTYPES and not np.isfinite(arr).all():
            raise CodecError(f"tensor {name!r} contains NaN or Inf")
        self._held += p.decoded_bytes
        return arr

    @staticmethod
    def _decode_int4(name: str, shape: tuple[int, ...], side: memoryview, values: memoryview) -> np.ndarray:
        """float32 of an int4 stream whose section lengths were checked against `shape` already."""
        n = math.prod(shape)
        if n == 0:
            return np.zeros(shape, np.float32)
        rows, cols, groups = _int4_groups(shape)
        scales = np.frombuffer(side, "<f4")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError(f"tensor {name!r}: int4 scales must be finite and >= 0")
        q, pad = unpack_nibbles(np.frombuffer(values, np.uint8), n)
        if pad:
            raise CodecError(f"tensor {name!r}: the padding nibble after the last int4 value must be 0")
        if q.min() < -7:
            raise CodecError(f"tensor {name!r}: int4 value -8 is outside [-7, 7]")
        per_elem = np.repeat(scales.reshape(rows, groups), INT4_GROUP, axis=1)[:, :cols]
        return (q.astype(np.float32).reshape(rows, cols) * per_elem).reshape(shape)


def decode(frames: Iterable[pb.TensorFrame], **assembler_kwargs: Any) -> dict[str, np.ndarray]:
    """Decode a complete list of frames (one or more tensors) into ``{name: array}``."""
    asm = Assembler(**assembler_kwargs)
    for f in frames:
        asm.add(f)
    return asm.finish()
