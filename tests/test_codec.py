"""Tensor wire codec: round trips with error bounds, chunking, and rejection of malformed frames."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from splitwave.protos import codec
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import Assembler, CodecError, decode, encode

log = logging.getLogger(__name__)

RNG_SEED = 1234
INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")


def _random_shape(rng: np.random.Generator) -> tuple[int, ...]:
    ndim = int(rng.integers(0, 5))
    dims = [int(rng.choice([0, 1, 2, 3, 7, 16, 33])) for _ in range(ndim)]
    return tuple(dims)


def _random_array(rng, shape, dtype: str) -> np.ndarray:
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype in INT_DTYPES:
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 3).astype(dtype)


def _roundtrip(arr, codec_name="raw", max_frame_bytes=codec.MAX_FRAME_BYTES, **kw):
    frames = encode("t", arr, codec_name, max_frame_bytes, **kw)
    assert all(f.ByteSize() <= max_frame_bytes for f in frames)
    assert [f.frame_index for f in frames] == list(range(len(frames)))
    out = decode(frames)["t"]
    assert out.shape == np.shape(arr)
    return frames, out


# --------------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(codec.DTYPES))
def test_raw_is_lossless_for_every_dtype(dtype):
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(25):
        arr = _random_array(rng, _random_shape(rng), dtype)
        for mfb in (codec.MAX_FRAME_BYTES, 96):
            _, out = _roundtrip(arr, "raw", mfb)
            assert out.dtype == arr.dtype
            np.testing.assert_array_equal(out, arr)


def test_raw_keeps_nonfinite_when_allowed_and_big_endian_input():
    arr = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32)
    out = decode(encode("x", arr), allow_nonfinite=True)["x"]
    np.testing.assert_array_equal(out, arr)
    be = np.arange(6, dtype=">i4").reshape(2, 3)
    out = decode(encode("x", be))["x"]
    np.testing.assert_array_equal(out, be)
    assert out.dtype == np.int32


def _check_lossy(codec_name, x, out, **kw):
    x64, o64 = x.astype(np.float64), out.astype(np.float64)
    err = np.abs(o64 - x64)
    if codec_name == "fp16":
        assert np.all(err <= 1e-3 * np.abs(x64) + 3e-8)  # 3e-8: fp16 subnormal spacing
    elif codec_name == "bf16":
        # round-to-nearest-even: within half an ulp, i.e. 2**-8 relative (spec bound: 8e-3)
        assert np.all(err <= 2.0**-8 * np.abs(x64) + 1e-38)
    elif codec_name == "int8":
        rows, cols = codec._rows_cols(x.shape)
        if x.size:
            absmax = np.abs(x64.reshape(rows, cols)).max(axis=1, keepdims=True)
            bound = absmax / 127 / 2 * (1 + 1e-5) + 1e-30
            if x.dtype == np.float16:  # the decoded value is rounded to float16 once more
                bound = bound + 2.0**-11 * np.abs(o64.reshape(rows, cols))
            assert np.all(err.reshape(rows, cols) <= bound)
    elif codec_name == "topk":
        flat_x, flat_o = x.reshape(-1), out.reshape(-1)
        kept = flat_o != 0
        np.testing.assert_array_equal(flat_o[kept], flat_x[kept])  # exact on kept entries
        if kept.any() and (~kept).any():
            assert np.abs(flat_x[kept]).min() >= np.abs(flat_x[~kept]).max()


@pytest.mark.parametrize("codec_name", ["fp16", "bf16", "int8", "topk"])
def test_lossy_roundtrip_bounds_over_random_shapes(codec_name):
    rng = np.random.default_rng(RNG_SEED)
    for trial in range(40):
        shape = _random_shape(rng)
        dtype = ("float32", "float64", "float16")[trial % 3] if codec_name != "fp16" else "float32"
        x = _random_array(rng, shape, dtype)
        kw = {"topk_fraction": float(rng.choice([0.05, 0.1, 0.5, 1.0]))} if codec_name == "topk" else {}
        for mfb in (codec.MAX_FRAME_BYTES, 80):
            frames, out = _roundtrip(x, codec_name, mfb, **kw)
            assert out.dtype == x.dtype
            _check_lossy(codec_name, x, out)
            if codec_name == "topk":
                n = x.size
                assert frames[0].topk_k == min(n, math.ceil(kw["topk_fraction"] * n - 1e-9))


def test_topk_with_absolute_k_and_codecspec():
    x = np.array([[0.1, -5.0, 2.0], [3.0, 0.0, -0.2]], dtype=np.float32)
    out = decode(encode("x", x, "topk", topk_k=2))["x"]
    np.testing.assert_array_equal(out, [[0, -5.0, 0], [3.0, 0, 0]])
    spec = pb.CodecSpec(codec="topk", topk_fraction=0.5)
    frames = encode("x", x, spec)
    assert frames[0].topk_k == 3
    assert frames[0].codec == "topk"
    np.testing.assert_array_equal(decode(frames)["x"], [[0, -5.0, 2.0], [3.0, 0, 0]])
    assert encode("x", x, pb.CodecSpec())[0].codec == "raw"
    with pytest.raises(CodecError):
        encode("x", x, "topk")  # neither k nor fraction


def test_bf16_round_to_nearest_even_and_specials():
    one = np.float32(1.0)
    ulp = np.float32(2.0**-7)
    x = np.array(
        [1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20, -(1 + 2.0**-8), np.inf, -np.inf, 0.0, -0.0, 3.3e38],
        dtype=np.float32,
    )
    frames = encode("x", x, "bf16")
    assert frames[0].codec == "bf16"
    out = decode(frames, allow_nonfinite=True)["x"]
    expected = [one, one + 2 * ulp, one + ulp, -one, np.inf, -np.inf, 0.0, -0.0]
    np.testing.assert_array_equal(out[:8], expected)
    assert abs(out[8] - 3.3e38) / 3.3e38 < 2.0**-8
    assert np.signbit(out[7])
    # 3.4e38 is above bf16's largest finite value + half an ulp: RNE gives inf, so the tensor travels raw
    big = np.array([1.0, 3.4e38], np.float32)
    frames = encode("x", big, "bf16")
    assert frames[0].codec == "raw"
    np.testing.assert_array_equal(decode(frames)["x"], big)
    nan = decode(encode("x", np.array([np.nan, -np.nan], np.float32), "bf16"), allow_nonfinite=True)["x"]
    assert np.isnan(nan).all()


def test_bf16_matches_torch_when_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(RNG_SEED)
    x = (rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
    ours = decode(encode("x", x, "bf16"))["x"]
    ref = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_large_tensor_is_split_into_frames_under_one_mib():
    rng = np.random.default_rng(RNG_SEED)
    x = rng.standard_normal((3, 1000, 300)).astype(np.float32)  # 3.6 MB
    for codec_name in ("raw", "fp16", "int8"):
        frames, out = _roundtrip(x, codec_name)
        expected_frames = math.ceil(codec.encoded_size("float32", x.shape, codec_name) / (1 << 20))
        assert len(frames) in (expected_frames, expected_frames + 1)
        assert all(f.ByteSize() <= 1 << 20 for f in frames)
        if codec_name == "raw":
            np.testing.assert_array_equal(out, x)


def test_assembler_streams_several_tensors_and_returns_each_when_complete():
    rng = np.random.default_rng(RNG_SEED)
    tensors = {
        "h": rng.standard_normal((2, 5, 8)).astype(np.float32),
        "attention_mask": np.ones((2, 5), dtype=np.int64),
        "labels": np.arange(8, dtype=np.int64),
    }
    asm = Assembler()
    completed = []
    for name, arr in tensors.items():
        frames = encode(name, arr, max_frame_bytes=64)
        assert len(frames) > 1
        for f in frames[:-1]:
            assert asm.add(f) is None
            assert asm.in_progress == name
        got_name, got = asm.add(frames[-1])
        completed.append(got_name)
        np.testing.assert_array_equal(got, arr)
    assert completed == list(tensors)
    out = asm.finish()
    assert list(out) == list(tensors)
    assert asm.finish() == {}


# --------------------------------------------------------------------------------------------------
# wire efficiency (the numbers the channel model relies on)
# --------------------------------------------------------------------------------------------------


def test_wire_bytes_over_raw_bytes_for_minilm_activation(record_property):
    x = np.random.default_rng(RNG_SEED).standard_normal((16, 64, 384)).astype(np.float32)
    ratios = {}
    codecs = (("raw", {}), ("fp16", {}), ("bf16", {}), ("int8", {}), ("int4", {}), ("topk", {"topk_fraction": 0.1}))
    for name, kw in codecs:
        ratios[name] = codec.wire_size(encode("h", x, name, **kw)) / x.nbytes
        record_property(f"wire_ratio_{name}", round(ratios[name], 5))
    log.info("wire/raw ratios for 16x64x384 fp32: %s", ratios)
    assert 1.0 <= ratios["raw"] <= 1.02
    assert 0.49 <= ratios["fp16"] <= 0.51 and 0.49 <= ratios["bf16"] <= 0.51
    assert 0.25 <= ratios["int8"] <= 0.27  # + one float32 scale per row of 384
    assert 0.14 <= ratios["int4"] <= 0.15  # half a byte per value + one float32 scale per 64 values
    assert 0.19 <= ratios["topk"] <= 0.21  # 10% kept x (4 B value + 4 B index)


# --------------------------------------------------------------------------------------------------
# validation of untrusted frames
# --------------------------------------------------------------------------------------------------


def _frames(arr=None, codec_name="raw", mfb=64, **kw):
    arr = np.arange(40, dtype=np.float32).reshape(4, 10) if arr is None else arr
    return encode("h", arr, codec_name, mfb, **kw)


def _expect(frames, match, code="invalid", **kw):
    asm = Assembler(**kw)
    with pytest.raises(CodecError, match=match) as info:
        for f in frames:
            asm.add(f)
        asm.finish()
    assert info.value.code == code
    return info.value


def _edit(frame, **changes):
    f = pb.TensorFrame()
    f.CopyFrom(frame)
    for k, v in changes.items():
        if k == "shape":
            del f.shape[:]
            f.shape.extend(v)
        else:
            setattr(f, k, v)
    return f


def test_rejects_unknown_dtype_and_codec():
    f = _frames()
    _expect([_edit(f[0], dtype="complex64")] + f[1:], "unknown dtype")
    _expect([_edit(f[0], codec="zstd")] + f[1:], "unknown codec")
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode("x", np.zeros(3, dtype=np.complex64))
    with pytest.raises(CodecError, match="unknown codec"):
        encode("x", np.zeros(3, dtype=np.float32), "gzip")


def test_rejects_lossy_codec_on_integer_tensors():
    with pytest.raises(CodecError, match="floating tensors only"):
        encode("labels", np.zeros(3, dtype=np.int64), "fp16")
    f = encode("labels", np.zeros(4, dtype=np.int16))  # 8 bytes, same size as fp16 of 4 values
    _expect([_edit(f[0], codec="fp16")], "not allowed for dtype")


def test_rejects_shape_that_does_not_match_payload():
    f = _frames()
    _expect([_edit(x, shape=[4, 9]) for x in f], "more payload bytes")
    _expect([_edit(x, shape=[4, 11]) for x in f], "truncated")
    single = _frames(mfb=1 << 20)
    _expect([_edit(single[0], shape=[5, 10])], "truncated")


def test_rejects_negative_and_huge_dims_before_allocating():
    f = _frames()
    _expect([_edit(f[0], shape=[-4, -10])], "negative")
    # 2**40 x 2**40 float32 would be 4 ZiB: must fail on the size check, not in bytearray()
    err = _expect([_edit(f[0], shape=[1 << 40, 1 << 40])], "exceeds the limit", code="too_large")
    assert "too_large" == err.code
    _expect([_edit(f[0], shape=[1] * 40)], "dims")
    # configurable limit
    _expect(_frames(), "exceeds the limit", code="too_large", max_tensor_bytes=100)
    # limit on everything held by one assembler
    two = encode("a", np.zeros(10, np.float32)) + encode("b", np.zeros(10, np.float32))
    _expect(two, "total limit", code="too_large", max_total_bytes=60)
    assert decode(two, max_total_bytes=80).keys() == {"a", "b"}


def test_int4_frames_with_wrong_sections_or_huge_shapes_are_refused_before_allocating():
    q = encode("q", np.arange(-5, 125, dtype=np.float32).reshape(2, 65), "int4")[0]  # 4 scales, 65 bytes
    assert len(q.scales) == 16 and len(q.payload) == 65
    _expect([_edit(q, scales=q.scales[:12])], "payload received before all scales")  # a scale short
    _expect([_edit(q, scales=q.scales + q.scales[:4])], "more scales bytes")  # a scale too many
    _expect([_edit(q, shape=[2, 64])], "more scales bytes")  # the shape implies 2 groups, 64 bytes
    _expect([_edit(q, shape=[1 << 40, 1 << 40])], "exceeds the limit", code="too_large")
    empty = _edit(q, shape=[0, 1 << 40], scales=b"", payload=b"")  # no element, no group: nothing to allocate
    assert decode([empty])["q"].shape == (0, 1 << 40)
    for c in ("int4", "raw"):  # no element either, but numpy cannot even describe that shape
        _expect([_edit(q, codec=c, shape=[1 << 62, 0], scales=b"", payload=b"")], "too large for any array")


def test_rejects_out_of_order_missing_and_extra_frames():
    f = _frames()
    assert len(f) >= 4
    _expect([f[1]], "before frame 0")
    _expect([f[0], f[2]], "expected frame 1")
    _expect([f[0], f[1], f[1]], "expected frame 2")
    _expect(f[:-1], "incomplete")
    _expect([_edit(x, frame_count=len(f) + 1) for x in f], "carries no data|incomplete")
    _expect([_edit(f[0], frame_count=10**6)], "frame_count")
    _expect([f[0], _edit(f[1], frame_count=len(f) + 1)], "changed between frames")


def test_rejects_truncated_payload():
    f = _frames()
    _expect(f[:-1] + [_edit(f[-1], payload=f[-1].payload[:-1])], "truncated")
    _expect(f[:-1] + [_edit(f[-1], payload=f[-1].payload + b"\0")], "more payload bytes")
    empty = _edit(f[1], payload=b"")
    _expect([f[0], empty] + f[2:], "no data")


def test_rejects_name_change_mid_tensor_and_duplicates():
    f = _frames()
    _expect([f[0], _edit(f[1], name="other")] + f[2:], "while tensor 'h' is incomplete")
    _expect(f + f, "received twice")
    _expect([_edit(f[0], name="")], "without a name")


def test_rejects_nonfinite_unless_allowed():
    x = np.array([1.0, np.nan, 2.0], dtype=np.float32)
    for codec_name in ("raw", "fp16", "bf16"):
        frames = encode("x", x, codec_name)
        _expect(frames, "NaN or Inf")
        assert np.isnan(decode(frames, allow_nonfinite=True)["x"][1])
    with pytest.raises(CodecError, match="finite"):
        encode("x", x, "int8")
    with pytest.raises(CodecError, match="finite"):
        encode("x", x, "topk", topk_k=1)
    inf_scale = encode("x", np.ones((2, 3), np.float32), "int8")
    bad = np.frombuffer(inf_scale[0].scales, "<f4").copy()
    bad[0] = np.inf
    _expect([_edit(inf_scale[0], scales=bad.tobytes())], "scales")


def test_rejects_malformed_codec_side_data():
    x = np.arange(1, 21, dtype=np.float32)
    f = encode("x", x, "topk", topk_k=5)[0]
    idx = np.frombuffer(f.indices, "<u4").copy()
    _expect([_edit(f, indices=idx[::-1].astype("<u4").tobytes())], "strictly increasing")
    idx2 = idx.copy()
    idx2[-1] = 20
    _expect([_edit(f, indices=idx2.astype("<u4").tobytes())], "strictly increasing and < 20")
    _expect([_edit(f, topk_k=21)], "topk_k=21 invalid")
    raw = encode("x", x)[0]
    _expect([_edit(raw, topk_k=3)], "topk_k set")
    _expect([_edit(raw, scales=b"\0\0\0\0")], "not used by codec")
    q = encode("y", np.ones((2, 2), np.float32), "int8")[0]
    _expect([_edit(q, payload=b"\x80\x01\x01\x01")], "-128")
    b = encode("m", np.array([True, False]))[0]
    _expect([_edit(b, payload=b"\x02\x00")], "0 or 1")
    # side data must precede values
    two = encode("z", np.ones((4, 30), np.float32), "int8", 64)
    _expect([_edit(two[0], scales=b"", payload=two[0].scales)] + two[1:], "payload received before")


def test_rejects_frame_budget_too_small_for_header():
    with pytest.raises(ValueError, match="no room"):
        encode("a" * 100, np.zeros(3, np.float32), max_frame_bytes=50)
