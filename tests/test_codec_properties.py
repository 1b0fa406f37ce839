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
    assert _would_overflow(codec_name, x) == (used == "raw") or codec_name == "int8"
    if used == "raw":
        assert codec_name in ("fp16", "bf16", "int8")  # top-k never needs it
        np.testing.assert_array_equal(out, x)
        assert frames[0].topk_k == 0 and not any(f.scales or f.indices for f in frames)
        if codec_name == "int8":  # only values at the edge of float32's range (float64 input) need it
            assert np.abs(x.astype(np.float64)).max() >= F32_MAX * (1 - 2.0**-20)
    else:
        assert used == codec_name
        _check_within_bound(codec_name, x, out, frames)


@settings(max_examples=100, deadline=None)
@given(x=tensors("float32"))
def test_int8_falls_back_for_float32_only_at_the_top_of_its_range(x):
    """Only a row whose 127 * scale would overflow float32 (|x| within 2**-22 of float32's max) goes raw."""
    x = np.clip(x, -F32_MAX / 2, F32_MAX / 2)
    assert encode("t", x, "int8")[0].codec == "int8"


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
