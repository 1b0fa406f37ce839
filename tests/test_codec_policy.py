"""The channel-aware codec policy (splitwave.common.codec_policy): the choice is a ladder member, monotone in the
rate, the finest that fits (else the coarsest), with one rule each for rate NaN / 0 / inf; its byte estimate
bounds the real wire bytes; the config and proto forms; the edge's rate estimator."""

from __future__ import annotations

import math
import secrets

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from splitwave.common.codec_policy import (
    FRAME_MARGIN_BYTES,
    PROBE_FRAME_BYTES,
    CodecPolicy,
    RateEstimator,
    check_ladder,
    choose_codec,
    transfer_s,
    wire_bytes,
)
from splitwave.common.config import ConfigError, parse_config
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import CODECS, MAX_FRAME_BYTES, encode, encoded_size

# every codec a ladder may hold on this branch (int4 joins by itself once protos.codec has it)
LADDER_CODECS = [c for c in CODECS if c != "topk"]
HAS_INT4 = "int4" in CODECS

ladders = st.lists(st.sampled_from(LADDER_CODECS), min_size=1, max_size=len(LADDER_CODECS), unique=True)
shapes = st.lists(st.integers(0, 64), min_size=0, max_size=3).map(tuple)
rates = st.floats(min_value=0.0, max_value=1e12, allow_nan=False) | st.just(math.inf)
budgets = st.floats(min_value=1e-6, max_value=1e4, allow_nan=False) | st.just(math.inf)
latencies = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


def _time(codec, shape, rate, latency, extra=0):
    return transfer_s(wire_bytes("float32", shape, codec) + extra, rate, latency)


# ----------------------------------------------------------------------------------------------- the choice
@settings(max_examples=300, deadline=None)
@given(ladders, budgets, shapes, rates, latencies, st.integers(0, 10_000))
def test_choice_is_the_finest_that_fits_else_the_coarsest(ladder, budget, shape, rate, latency, extra):
    got = choose_codec(ladder, budget, "float32", shape, rate, latency, extra)
    assert got in ladder
    i = ladder.index(got)
    # every finer codec misses the budget
    assert all(_time(c, shape, rate, latency, extra) > budget for c in ladder[:i])
    # the chosen one fits, unless nothing fits and it is the coarsest
    fits = _time(got, shape, rate, latency, extra) <= budget
    assert fits or (got == ladder[-1] and not any(_time(c, shape, rate, latency, extra) <= budget for c in ladder))
    assert choose_codec(list(ladder), budget, "float32", list(shape), rate, latency, extra) == got  # deterministic


@settings(max_examples=300, deadline=None)
@given(ladders, budgets, shapes, rates, rates, latencies)
def test_a_higher_rate_never_picks_a_coarser_codec(ladder, budget, shape, r1, r2, latency):
    lo, hi = sorted((r1, r2))
    a = choose_codec(ladder, budget, "float32", shape, lo, latency)
    b = choose_codec(ladder, budget, "float32", shape, hi, latency)
    assert ladder.index(b) <= ladder.index(a)


@given(ladders, budgets, shapes, latencies)
def test_special_rates(ladder, budget, shape, latency):
    # NaN: no estimate yet -> the finest
    assert choose_codec(ladder, budget, "float32", shape, math.nan, latency) == ladder[0]
    # 0: nothing crosses -> the coarsest (every codec here has bytes: the framing margin at least), unless
    # the budget is unbounded (then everything fits)
    assert choose_codec(ladder, budget, "float32", shape, 0.0, latency) == ladder[-1 if budget < math.inf else 0]
    # inf: every codec takes the latency -> the finest if the latency fits, else the coarsest
    want = ladder[0] if latency <= budget else ladder[-1]
    assert choose_codec(ladder, budget, "float32", shape, math.inf, latency) == want


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(rate_Bps=-1.0), "rate must be >= 0"),
        (dict(budget_s=0.0), "budget_s must be > 0"),
        (dict(budget_s=math.nan), "budget_s must be > 0"),
        (dict(latency_s=-0.1), "latency_s must be >= 0"),
        (dict(latency_s=math.nan), "latency_s must be >= 0"),
        (dict(ladder=[]), "ladder is empty"),
        (dict(extra_bytes=-1), "extra_bytes"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, words):
    args = dict(ladder=["raw", "fp16"], budget_s=1.0, dtype="float32", shape=(4, 4), rate_Bps=1e6) | kwargs
    with pytest.raises(ValueError, match=words):
        choose_codec(**args)


def test_choice_on_a_minilm_step():
    """A MiniLM step's h (16 x 48 x 384 float32: 1.18 MB raw) with a 0.5 s budget and 10 ms latency: 40 Mbit/s
    sends it raw, 15 Mbit/s fp16, 5 Mbit/s int8, 1 Mbit/s nothing fits: the coarsest."""
    ladder, shape = ["raw", "fp16", "int8"], (16, 48, 384)

    def pick(mbps):
        return choose_codec(ladder, 0.5, "float32", shape, mbps * 1e6 / 8, 0.01)

    assert [pick(m) for m in (40, 15, 5, 1)] == ["raw", "fp16", "int8", "int8"]


@pytest.mark.skipif(not HAS_INT4, reason="protos.codec has no int4 codec on this branch")
def test_int4_is_the_coarsest_rung_when_present():
    shape = (16, 48, 384)
    assert encoded_size("float32", shape, "int4") < encoded_size("float32", shape, "int8")
    assert choose_codec(["raw", "fp16", "int8", "int4"], 0.5, "float32", shape, 1e6 / 8, 0.01) == "int4"


# ----------------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("codec", LADDER_CODECS)
@pytest.mark.parametrize("shape", [(), (3,), (8, 16, 64), (2, 48, 384), (5, 700, 384)])  # the last: 3 frames raw
def test_wire_bytes_bound_the_step_messages_within_the_margin(codec, shape):
    """What a Train step's h really costs on the wire (frames inside TrainRequests with a real session header)
    is at most wire_bytes and at least wire_bytes minus the margin per frame."""
    h = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    header = pb.Header(session_token=secrets.token_urlsafe(32), run_id="0123456789ab", round=4_000_000, step=70_000)
    frames = encode("h", h, codec)
    real = sum(pb.TrainRequest(header=header, frame=f).ByteSize() for f in frames)
    est = wire_bytes("float32", shape, codec)
    n_frames = max(1, -(-encoded_size("float32", shape, codec) // (MAX_FRAME_BYTES - FRAME_MARGIN_BYTES)))
    assert len(frames) <= n_frames
    assert est - n_frames * FRAME_MARGIN_BYTES <= real <= est


@pytest.mark.parametrize("codec", LADDER_CODECS)
def test_wire_bytes_bound_grad_h_in_probe_frames(codec):
    """grad_h in the 64 KiB frames of a run whose policy steers the downlink, inside TrainReplies."""
    g = np.random.default_rng(1).standard_normal((16, 48, 384)).astype(np.float32)
    header = pb.Header(run_id="0123456789ab", round=4_000_000, step=70_000)
    frames = encode("grad_h", g, codec, PROBE_FRAME_BYTES)
    real = sum(pb.TrainReply(header=header, frame=f).ByteSize() for f in frames)
    est = wire_bytes("float32", g.shape, codec, max_frame_bytes=PROBE_FRAME_BYTES)
    assert len(frames) > 1 and est - len(frames) * FRAME_MARGIN_BYTES <= real <= est
    assert CodecPolicy("channel_aware", ("fp16",), 1.0, frozenset({"down"})).grad_frame_bytes == PROBE_FRAME_BYTES
    assert CodecPolicy("channel_aware", ("fp16",), 1.0, frozenset({"up"})).grad_frame_bytes == MAX_FRAME_BYTES


# ----------------------------------------------------------------------------------------------- ladder, config, proto
@pytest.mark.parametrize(
    "ladder, words",
    [
        ([], "empty"),
        (["raw", "zip"], "unknown codecs ['zip']"),
        (["raw", "topk"], "'topk' cannot be in a ladder"),
        (["fp16", "int8", "fp16"], "['fp16'] appear more than once"),
    ],
)
def test_bad_ladders_are_refused_by_name(ladder, words):
    with pytest.raises(ValueError, match=None) as e:
        check_ladder(ladder)
    assert words in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"training": {"codec_policy": {"kind": "channel_aware", "ladder": ladder}}})
    assert "training.codec_policy.ladder" in str(e.value) and words in str(e.value)


@pytest.mark.parametrize(
    "policy, field",
    [
        ({"budget_s": 0}, "budget_s"),
        ({"budget_s": float("inf")}, "budget_s"),
        ({"directions": []}, "directions"),
        ({"directions": ["up", "up"]}, "directions"),
        ({"directions": ["sideways"]}, "directions"),
        ({"kind": "smart"}, "kind"),
        ({"ladders": ["raw"]}, "ladders"),
    ],
)
def test_bad_policy_config_names_the_field(policy, field):
    with pytest.raises(ConfigError) as e:
        parse_config({"training": {"codec_policy": policy}})
    assert f"training.codec_policy.{field}" in str(e.value)


def test_default_is_fixed_and_sends_no_policy():
    cfg = parse_config({})
    p = CodecPolicy.from_config(cfg.training.codec_policy)
    assert p.kind == "fixed" and not p.steers("up") and not p.steers("down")
    assert p.to_proto() is None  # RunConfig unchanged for a fixed run
    assert p.choose("up", "float32", (2, 3), 1.0) is None
    assert p.allowed_down("fp16") == ("fp16",)
    assert CodecPolicy.from_proto(pb.RunConfig().codec_policy) == CodecPolicy()


def test_policy_travels_in_the_run_config():
    cfg = parse_config(
        {"training": {"codec_policy": {"kind": "channel_aware", "ladder": ["fp16", "int8"], "directions": ["down"]}}}
    )
    p = CodecPolicy.from_config(cfg.training.codec_policy)
    assert p.steers("down") and not p.steers("up")
    assert p.allowed_down("raw") == ("raw", "fp16", "int8")
    msg = pb.RunConfig(codec_policy=p.to_proto())
    assert CodecPolicy.from_proto(pb.RunConfig.FromString(msg.SerializeToString()).codec_policy) == p
    # an edge that lacks a codec of the ladder follows the policy with the rest; with none left, fixed
    assert CodecPolicy.from_proto(msg.codec_policy, known=["raw", "int8"]).ladder == ("int8",)
    assert CodecPolicy.from_proto(msg.codec_policy, known=["raw"]) == CodecPolicy()
    assert CodecPolicy.from_proto(pb.CodecPolicy(kind="future", ladder=["fp16"], budget_s=1)) == CodecPolicy()


# ----------------------------------------------------------------------------------------------- rate estimator
def test_rate_estimator_ewma_of_bytes_and_seconds():
    e = RateEstimator(alpha=0.5, min_bytes=100)
    assert math.isnan(e.rate)
    e.observe(50, 1.0)  # under min_bytes: buffers and latency, not the rate
    e.observe(1000, math.nan)
    e.observe(1000, -1.0)
    assert math.isnan(e.rate) and e.samples == 0
    e.observe(1000, 1.0)  # the first sample sets the estimate
    assert e.rate == pytest.approx(1000.0)
    e.observe(3000, 1.0)  # bytes 0.5*3000 + 0.5*1000 = 2000, seconds 1
    assert e.rate == pytest.approx(2000.0)
    e.observe(1000, 0.0)  # an "instant" transfer adds bytes, not an infinite rate: 1500 / 0.5
    assert e.rate == pytest.approx(3000.0)
    z = RateEstimator()
    z.observe(10_000, 0.0)
    assert z.rate == math.inf
    with pytest.raises(ValueError):
        RateEstimator(alpha=0.0)


@given(
    st.lists(st.tuples(st.integers(4096, 10**8), st.floats(1e-4, 100.0)), min_size=1, max_size=30),
    st.floats(0.01, 1.0),
)
def test_rate_estimate_lies_between_the_sample_rates(samples, alpha):
    e = RateEstimator(alpha=alpha)
    for b, s in samples:
        e.observe(b, s)
    rates = [b / s for b, s in samples]
    assume(all(math.isfinite(r) for r in rates))
    assert min(rates) * (1 - 1e-9) <= e.rate <= max(rates) * (1 + 1e-9)


def test_rate_estimator_follows_a_change():
    e = RateEstimator(alpha=0.5)
    for _ in range(5):
        e.observe(1_000_000, 0.1)  # 10 MB/s
    for _ in range(8):
        e.observe(1_000_000, 1.0)  # then 1 MB/s
    assert e.rate == pytest.approx(1e6, rel=0.05)


@pytest.mark.parametrize("packed", [False, True])
def test_step_shapes_are_what_build_step_sends(packed):
    """The shape "h" travels in and the bytes of the step's other tensors, padded or packed, as
    protos.steps.build_step frames the step (the policy sizes the step it will really send)."""
    from splitwave.common.codec_policy import step_shapes
    from splitwave.protos.steps import build_step

    rng = np.random.default_rng(0)
    lengths = np.array([5, 9, 3, 9])
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int64)
    labels = rng.integers(0, 2, 4).astype(np.int64)
    h = rng.standard_normal((4, 9, 16)).astype(np.float32)
    shape, extra = step_shapes(h, mask, labels, packed)
    step = build_step(h, mask, labels, "fp16", packed=packed)
    hs = [f for f in step.frames if f.name == "h"]
    assert tuple(hs[0].shape) == shape == ((26, 16) if packed else (4, 9, 16))
    others = sum(len(f.payload) for f in step.frames if f.name != "h")
    assert others <= extra <= others + 2 * FRAME_MARGIN_BYTES
