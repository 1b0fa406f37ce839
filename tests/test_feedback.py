"""Error feedback (splitwave.protos.feedback): with it, the receiver's running sum of decoded tensors stays
within one codec error of the sum of the inputs however many tensors go by; without it the error grows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitwave.protos.codec import decode, encode
from splitwave.protos.feedback import ErrorFeedback

LOSSY = ("fp16", "bf16", "int8", "int4", "topk")


def _sums(codec_name: str, steps: int, ef: ErrorFeedback | None, seed: int = 0) -> list[float]:
    """max |sum of inputs - sum of decoded| after each step, for inputs with a bias a codec rounds away."""
    rng = np.random.default_rng(seed)
    enc = ef.encode if ef is not None else encode
    total_in = np.zeros((4, 96))
    total_out = np.zeros((4, 96))
    errs = []
    for _ in range(steps):
        x = (0.1 * rng.standard_normal((4, 96)) + 0.013).astype(np.float32)
        x[:, 0] = 1.0  # a fixed absmax per row and group: the 0.013 bias sits below half a step of int4/int8
        total_in += x
        total_out += decode(enc("g", x, codec_name, topk_fraction=0.1))["g"]
        errs.append(float(np.abs(total_in - total_out).max()))
    return errs


@pytest.mark.parametrize("codec_name", LOSSY)
def test_with_feedback_the_sum_error_stays_bounded_and_without_it_grows(codec_name):
    steps = 200
    with_ef = _sums(codec_name, steps, ErrorFeedback())
    without = _sums(codec_name, steps, None)
    # with EF the error is the last residual: below one codec error at every step, not growing
    assert max(with_ef[steps // 2 :]) <= 1.5 * max(with_ef[: steps // 2]) + 1e-6
    assert without[-1] > 4 * with_ef[-1]
    assert without[-1] > 2 * without[steps // 10 - 1]  # without EF: grows with the steps (sqrt at least)


@pytest.mark.parametrize("codec_name", ("int8", "int4"))
def test_feedback_error_is_at_most_the_last_residual(codec_name):
    ef = ErrorFeedback()
    rng = np.random.default_rng(3)
    total_in, total_out = np.zeros((3, 70)), np.zeros((3, 70))
    for _ in range(50):
        x = rng.standard_normal((3, 70)).astype(np.float32)
        total_in += x
        total_out += decode(ef.encode("h", x, codec_name))["h"]
        # sum of decoded = sum of inputs - residual, up to float32 rounding of the residual arithmetic
        np.testing.assert_allclose(total_in - total_out, ef.residual("h"), atol=1e-4)
        scale = 1 / 7 if codec_name == "int4" else 1 / 127
        assert np.abs(ef.residual("h")).max() <= scale * (np.abs(x).max() + 1) / 2 + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    codec_name=st.sampled_from(LOSSY),
    seeds=st.lists(st.integers(0, 1 << 30), min_size=1, max_size=8),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
)
def test_sum_of_decoded_plus_residual_is_sum_of_inputs(codec_name, seeds, scale):
    """The invariant behind EF, for any sequence: sum(decoded) + residual == sum(inputs)."""
    ef = ErrorFeedback()
    total_in = total_out = 0.0
    for s in seeds:
        x = (scale * np.random.default_rng(s).standard_normal((2, 5, 9))).astype(np.float32)
        total_in = total_in + x.astype(np.float64)
        total_out = total_out + decode(ef.encode("x", x, codec_name, topk_fraction=0.2))["x"].astype(np.float64)
    r = ef.residual("x")
    r = np.zeros((2, 5, 9)) if r is None else r.astype(np.float64)
    np.testing.assert_allclose(total_out + r, total_in, rtol=1e-5, atol=1e-5 * scale * len(seeds))


def test_a_new_shape_drops_the_residual_and_raw_flushes_it():
    ef = ErrorFeedback()
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    ef.encode("h", x, "int4")
    assert ef.residual("h") is not None and ef.residual("h").shape == (4, 8)
    y = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)  # a shorter last batch
    np.testing.assert_array_equal(decode(ef.encode("h", y, "int4"))["h"], decode(encode("h", y, "int4"))["h"])
    assert ef.residual("h").shape == (3, 8)
    r = ef.residual("h").copy()
    out = decode(ef.encode("h", y, "raw"))["h"]  # raw delivers x + residual exactly: nothing left over
    np.testing.assert_array_equal(out, y + r)
    assert ef.residual("h") is None


def test_residuals_are_per_name_and_integer_tensors_pass_through():
    ef = ErrorFeedback()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 70)).astype(np.float32), rng.standard_normal((5,)).astype(np.float32)
    ef.encode("a", a, "int8")
    ef.encode("b", b, "int4")
    assert ef.residual("a").shape == (2, 70) and ef.residual("b").shape == (5,) and len(ef) == 2
    mask = np.ones((2, 3), np.int64)
    assert ef.encode("mask", mask, "raw") == encode("mask", mask, "raw") and ef.residual("mask") is None
    ef.reset()
    assert len(ef) == 0
    # after a reset the first tensor is encoded as plain encode would
    assert ef.encode("a", a, "int8") == encode("a", a, "int8")


def test_nonfinite_input_is_encoded_as_without_feedback():
    ef = ErrorFeedback()
    ef.encode("g", np.ones((2, 3), np.float32) / 3, "fp16")
    bad = np.array([[np.inf, 1, 2], [0, 0, 0]], np.float32)
    assert ef.encode("g", bad, "fp16") == encode("g", bad, "fp16")  # raw fallback of the inf, as always
    assert ef.residual("g") is None
    with pytest.raises(ValueError, match="finite"):
        ef.encode("g", bad, "int8")
