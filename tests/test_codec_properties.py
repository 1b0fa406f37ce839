"""Property tests of the wire codec: for ANY finite tensor, every codec encodes and decodes without raising,
and the result is either within the codec's documented error bound or an exact "raw" fallback that was
needed (the lossy form would not have been finite). The bounds and rules are the ones splitwave.proto states.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitwave.protos import codec
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import decode, encode

F32_MAX = float(np.finfo(np.float32).max)
BF16_OVERFLOW = (2 - 2.0**-8) * 2.0**127  # bf16's largest finite value + half an ulp: RNE rounds up to inf
BF16_OVERFLOW_IN_F16 = 65408.0  # midpoint of bf16 65280 and 65536; 65536 is inf in float16
FLOAT_DTYPES = ("float16", "float32", "float64")
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)


def _finite(dtype: str, magnitudes=None):
    """Finite values of `dtype` (hypothesis favours 0, -0, subnormals, the largest values and repeats)."""
    width = np.dtype(dtype).itemsize * 8
    values = st.floats(allow_nan=False, allow_infinity=False, width=width)
    if magnitudes is not None:  # an extra family: one scale for a whole tensor (tiny, ordinary or huge)
        values = values | st.sampled_from(magnitudes)
    return values


@st.composite
def tensors(draw, dtype=None):
    dtype = dtype or draw(st.sampled_from(FLOAT_DTYPES))
    info = np.finfo(dtype)
    specials = [0.0, -0.0, float(info.tiny), float(info.smallest_subnormal), float(info.max), -float(info.max), 1.0]
    kind = draw(st.sampled_from(["any", "zeros", "scaled"]))
    shape = draw(SHAPES)
    if kind == "zeros":
        return np.zeros(shape, dtype)
    arr = draw(hnp.arrays(dtype, shape, elements=_finite(dtype, specials)))
    if kind == "scaled":  # ordinary values times one common factor: whole tensors of huge or tiny values
        exp = draw(st.integers(int(np.log2(info.smallest_subnormal)), int(np.log2(info.max)) - 1))
        with np.errstate(over="ignore", under="ignore"):
            arr = np.clip(np.ldexp(arr.astype(np.float64), exp), -float(info.max), float(info.max)).astype(dtype)
    return arr


def _would_overflow(codec_name: str, x: np.ndarray) -> bool:
    """Independent oracle: does the lossy form of finite `x` contain +-inf (so "raw" is required)?"""
    if x.size == 0:
        return False
    with np.errstate(over="ignore"):
        if codec_name == "fp16":
            return x.dtype != np.float16 and bool(np.isinf(x.astype(np.float16)).any())
        if codec_name == "bf16":
            if x.dtype == np.float16:
                return bool((np.abs(x.astype(np.float64)) >= BF16_OVERFLOW_IN_F16).any())
            return bool((np.abs(x.astype(np.float32).astype(np.float64)) >= BF16_OVERFLOW).any())
    return False


def _check_within_bound(codec_name: str, x: np.ndarray, out: np.ndarray, frames) -> None:
    x64, o64 = x.astype(np.float64), out.astype(np.float64)
    err = np.abs(o64 - x64)
    f16 = x.dtype == np.float16
    if codec_name == "fp16":
        if f16:
            np.testing.assert_array_equal(out, x)
        else:  # round to nearest: half an ulp, 2**-11 relative, 2**-25 absolute in the subnormal range
            assert np.all(err <= (2.0**-11 + 2.0**-23) * np.abs(x64) + 2.0**-25)
    elif codec_name == "bf16":
        bound = (2.0**-8 + 2.0**-23) * np.abs(x64) + 2.0**-133
        if f16:  # decoded bf16 is rounded to float16 once more
            bound = bound + 2.0**-11 * np.abs(o64) + 2.0**-25
        assert np.all(err <= bound)
    elif codec_name == "int8":
        rows, cols = codec._rows_cols(x.shape)
        scales = np.frombuffer(b"".join(f.scales for f in frames), "<f4").astype(np.float64)
        assert scales.shape == (rows,)
        if x.size:
            absmax = np.abs(x64.reshape(rows, cols)).max(axis=1)
            # absmax/127 rounded UP to a float32: never below it, never more than one float32 ulp above
            assert np.all(scales * 127 >= absmax * (1 - 1e-15))
            assert np.all(scales <= absmax / 127 * (1 + 2.0**-23) + 2.0**-149)
            assert np.all((scales == 0) == (absmax == 0))  # all-zero rows (only they) get scale 0
            bound = scales[:, None] / 2 + 2.0**-24 * np.abs(o64.reshape(rows, cols))  # + float32 product rounding
            if f16:
                bound = bound + 2.0**-11 * np.abs(o64.reshape(rows, cols)) + 2.0**-25
            assert np.all(err.reshape(rows, cols) <= bound)
    elif codec_name == "int4":
        rows, cols, groups = codec._int4_groups(x.shape)
        scales = np.frombuffer(b"".join(f.scales for f in frames), "<f4").astype(np.float64)
        assert scales.shape == (rows * groups,)
        if x.size:
            per = np.repeat(scales.reshape(rows, groups), codec.INT4_GROUP, axis=1)[:, :cols]
            xa = np.abs(x64.reshape(rows, cols))
            pad = groups * codec.INT4_GROUP - cols
            absmax = np.pad(xa, ((0, 0), (0, pad))).reshape(rows, groups, -1).max(axis=2).reshape(-1)
            assert np.all(scales * 7 >= absmax * (1 - 1e-15))  # |q| <= 7
            assert np.all(scales <= absmax / 7 * (1 + 2.0**-23) + 2.0**-149)  # rounded up by one ulp at most
            assert np.all((scales == 0) == (absmax == 0))  # all-zero groups (only they) get scale 0
            bound = per / 2 + 2.0**-24 * np.abs(o64.reshape(rows, cols))  # + float32 product rounding
            if f16:
                bound = bound + 2.0**-11 * np.abs(o64.reshape(rows, cols)) + 2.0**-25
            assert np.all(err.reshape(rows, cols) <= bound)
    elif codec_name == "topk":
        flat, k = x.reshape(-1), frames[0].topk_k
        # the k largest |x|; of equal |x| the lower flat index: a stable sort by descending |x|
        keep = np.sort(np.argsort(-np.abs(flat.astype(np.float64)), kind="stable")[:k])
        expected = np.zeros_like(flat)
        expected[keep] = flat[keep]
        np.testing.assert_array_equal(out.reshape(-1), expected)
        idx = np.frombuffer(b"".join(f.indices for f in frames), "<u4")
        np.testing.assert_array_equal(idx, keep)


@pytest.mark.parametrize("codec_name", codec.CODECS)
@settings(max_examples=150, deadline=None)
@given(x=tensors(), small_frames=st.booleans(), fraction=st.sampled_from([0.01, 0.1, 0.5, 1.0]))
def test_every_finite_tensor_round_trips_within_bound_or_falls_back_exactly(codec_name, x, small_frames, fraction):
    kw = {"topk_fraction": fraction} if codec_name == "topk" else {}
    frames = encode("t", x, codec_name, 96 if small_frames else codec.MAX_FRAME_BYTES, **kw)
    out = decode(frames)["t"]  # rejects NaN/Inf: the decoded tensor is finite
    assert out.dtype == x.dtype and out.shape == x.shape
    used = frames[0].codec
    assert all(f.codec == used for f in frames)
    if codec_name == "raw":  # lossless, bit for bit (signed zeros too)
        assert used == "raw" and out.tobytes() == x.tobytes()
        return
    side, values = codec._section_sizes(x.dtype.name, x.shape, used, frames[0].topk_k)
    assert sum(len(f.scales) + len(f.indices) for f in frames) == side  # sizes derived exactly, before decoding
    assert sum(len(f.payload) for f in frames) == values
    assert codec.encoded_size(x.dtype.name, x.shape, used, frames[0].topk_k) == side + values
    assert _would_overflow(codec_name, x) == (used == "raw") or codec_name in ("int8", "int4")
    if used == "raw":
        assert codec_name in ("fp16", "bf16", "int8", "int4")  # top-k never needs it
        np.testing.assert_array_equal(out, x)
        assert frames[0].topk_k == 0 and not any(f.scales or f.indices for f in frames)
        if codec_name in ("int8", "int4"):  # only values at the edge of float32's range (float64 input) need it
            assert np.abs(x.astype(np.float64)).max() >= F32_MAX * (1 - 2.0**-20)
    else:
        assert used == codec_name
        _check_within_bound(codec_name, x, out, frames)


@pytest.mark.parametrize("codec_name", ["int8", "int4"])
@settings(max_examples=100, deadline=None)
@given(x=tensors("float32"))
def test_int8_int4_fall_back_for_float32_only_at_the_top_of_its_range(codec_name, x):
    """Only a row (group) whose 127 (7) * scale would overflow float32 (|x| within ~2**-21 of float32's max)
    goes raw."""
    x = np.clip(x, -F32_MAX / 2, F32_MAX / 2)
    assert encode("t", x, codec_name)[0].codec == codec_name


def test_int4_falls_back_to_raw_when_a_scale_would_overflow():
    """7 * scale beyond float32 only happens for float64 input beyond float32's range (F32_MAX / 7 rounded up,
    times 7, still rounds to F32_MAX); that tensor goes raw."""
    top = np.array([[1.0, -F32_MAX], [0.0, 2.0]], np.float32)
    assert encode("t", top, "int4")[0].codec == "int4"
    huge = np.array([[3.5e38, 1.0], [0.0, 2.0]])
    frames = encode("t", huge, "int4")
    assert frames[0].codec == "raw" and not frames[0].scales
    np.testing.assert_array_equal(decode(frames)["t"], huge)


def test_int4_layout_groups_of_64_low_nibble_first():
    """Byte layout as splitwave.proto states it: scales per group of 64 along the last dim, row-major; q as
    4-bit two's complement, element 2i in the low nibble of byte i, a 0 padding nibble for odd counts."""
    x = np.zeros((2, 65), np.float32)
    x[0, 0], x[0, 1], x[0, 64] = 7.0, -7.0, 3.0  # row 0: group 0 absmax 7 -> scale 1; group 1 (one element)
    x[1, 2] = -14.0  # row 1: group 0 scale 2, q = -7; group 1 all zero -> scale 0
    f = encode("t", x, "int4")[0]
    scales = np.frombuffer(f.scales, "<f4")
    assert scales.size == 4 and (scales[0], scales[2], scales[3]) == (1.0, 2.0, 0.0)
    s1 = scales[1]  # absmax 3 / 7 rounded UP: the smallest float32 s with 7 * s >= 3
    assert 7 * float(s1) >= 3 > 7 * float(np.nextafter(s1, np.float32(0)))
    payload = np.frombuffer(f.payload, np.uint8)
    assert payload.size == (130 + 1) // 2 == 65
    assert payload[0] == (0x7 | (0x9 << 4))  # +7 low, -7 (0b1001) high
    assert payload[32] == 0x7  # element 64 (row 0, group 1): 3 / scale(3/7) = 7
    assert payload[33] == (0x9 << 4)  # row 1 element 2 = flat 67: high nibble of byte 33
    odd = encode("t", np.array([1.0, 2.0, 3.0], np.float32), "int4")[0]
    assert len(odd.payload) == 2 and odd.payload[1] >> 4 == 0
    np.testing.assert_array_equal(decode([f])["t"], x)


@settings(max_examples=150, deadline=None)
@given(
    x=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70), elements=_finite("float32")
    ),
    how=st.sampled_from(
        ["short_scales", "long_scales", "nan_scale", "neg_scale", "truncated", "long_values", "minus8", "padding"]
    ),
    where=st.integers(0, 1 << 30),
)
def test_hostile_int4_frames_are_refused_with_codec_error(x, how, where):
    """A peer cannot crash the decoder or make it allocate: every corruption of a valid int4 frame is a
    CodecError (never another exception, never a silently wrong tensor)."""
    x = np.clip(x, -1e30, 1e30)
    f = encode("t", x, "int4")[0]
    scales, payload = bytearray(f.scales), bytearray(f.payload)
    n = x.size
    if how == "short_scales":
        scales = scales[:-4]
    elif how == "long_scales":
        scales += b"\0\0\0\0"
    elif how in ("nan_scale", "neg_scale"):
        i = where % (len(scales) // 4)
        scales[4 * i : 4 * i + 4] = np.array([np.nan if how == "nan_scale" else -1.0], "<f4").tobytes()
    elif how == "truncated":
        payload = payload[: where % len(payload)]
    elif how == "long_values":
        payload += b"\0"
    elif how == "minus8":
        i = where % n
        payload[i // 2] = (payload[i // 2] & 0xF0) | 0x8 if i % 2 == 0 else (payload[i // 2] & 0x0F) | 0x80
    elif how == "padding":
        if n % 2 == 0:
            return  # no padding nibble to corrupt
        payload[-1] |= 0x10
    bad = pb.TensorFrame()
    bad.CopyFrom(f)
    bad.scales, bad.payload = bytes(scales), bytes(payload)
    with pytest.raises(codec.CodecError):
        decode([bad])


@settings(max_examples=150, deadline=None)
@given(
    values=hnp.arrays(np.float32, st.integers(1, 40), elements=st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 0.5])),
    k=st.integers(1, 40),
)
def test_topk_ties_go_to_the_lower_index(values, k):
    k = min(k, values.size)
    frames = encode("t", values, "topk", topk_k=k)
    idx = np.frombuffer(b"".join(f.indices for f in frames), "<u4")
    a = np.abs(values)
    assert idx.size == k and np.all(np.diff(idx.astype(np.int64)) > 0)
    if 0 < k < values.size:
        t = a[idx].min()
        assert np.all(a[np.setdiff1d(np.arange(values.size), idx)] <= t)
        # every element equal to the threshold that was dropped comes after every one that was kept
        kept_ties = idx[a[idx] == t]
        dropped_ties = np.setdiff1d(np.flatnonzero(a == t), idx)
        assert dropped_ties.size == 0 or kept_ties.max() < dropped_ties.min()


def test_all_zero_tensor_with_every_codec_decodes_to_zero():
    x = np.zeros((2, 3, 4), np.float32)
    for name in codec.CODECS:
        frames = encode("t", x, name, topk_fraction=0.1)
        assert frames[0].codec == name
        np.testing.assert_array_equal(decode(frames)["t"], x)
    scales = np.frombuffer(encode("t", x, "int8")[0].scales, "<f4")
    np.testing.assert_array_equal(scales, np.zeros(6, np.float32))


def test_fp16_overflow_falls_back_to_raw_for_that_tensor_only():
    """The layer-norm gradient of an all-zero h is ~1e6: fp16 would be inf, so it travels raw."""
    big, small = np.full((2, 3), 1e6, np.float32), np.full((2, 3), 1e3, np.float32)
    assert encode("g", big, "fp16")[0].codec == "raw"
    np.testing.assert_array_equal(decode(encode("g", big, "fp16"))["g"], big)
    assert encode("g", small, "fp16")[0].codec == "fp16"
