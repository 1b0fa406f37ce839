"""Regressions of link models that failed to answer (issue 11)."""

from __future__ import annotations

import math

import pytest

import splitwave.channel as cs
from splitwave.channel.wireless import _index_of


def test_block_boundary_equal_to_t_in_floating_point_terminates():
    """t = 256.58, T_c = 0.01: t / T_c = 25657.999..., but 25658 * 0.01 == 256.58 in floating point, so the
    old walk computed the block end as t itself and never advanced (`splitwave simulate` hung after training)."""
    t, tc = 256.58, 0.01
    assert math.floor(t / tc + 1e-12) == 25657 and (25657 + 1) * tc == t  # the trap is real
    assert _index_of(t, tc) == 25658
    for fading in ("rayleigh", "none"):
        for period in (None, 0.01, 0.05):
            link = cs.WirelessLink(
                200, cs.RadioParams(), cs.Cell(20e6), fading=fading, coherence_s=tc, shadowing_period_s=period, seed=3
            )
            d = link.predict(1_000_000, t)
            assert t < d < t + 10.0
            assert link.block_of(t) == 25658
            # the rate at t is that of the block that starts at t
            assert link.rate_at(t) == link.rate_at(t + tc / 2)


def test_bad_times_and_sizes_are_clear_errors():
    link = cs.StaticLink(1e6)
    for bad_t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite time"):
            link.done(10, bad_t)
    for bad_n in (-1, 1.5):
        with pytest.raises(ValueError, match="integer >= 0"):
            link.done(bad_n, 0.0)
    assert link.busy_until == 0.0  # nothing changed
    with pytest.raises(ValueError, match="coherence"):
        cs.WirelessLink(200, coherence_s=0.0)


def test_trace_rejects_non_finite_timestamps():
    for bad in ([1, float("nan"), 3], [1, 2, float("inf")]):
        with pytest.raises(ValueError, match="finite"):
            cs.trace_from_timestamps(bad)


def test_trace_queued_transfer_uses_every_opportunity_after_the_last_used_one():
    """Two opportunities at one time (tau_n and tau_1 + T): a transfer queued behind one that used the first
    may use the second, strict (mm-link) mode included, as one transfer of their total size would."""
    tr = cs.trace_from_timestamps([0, 1, 3, 5])  # T = 5: opportunities at 5 (tau_4) and 5 (tau_1 + T)
    for strict in (False, True):
        a = cs.TraceLink(tr, offset_ms=3.5, strict=strict, mtu=1)
        a.transmit(1, 0.0)
        assert a.transmit(1, 0.0) == cs.TraceLink(tr, offset_ms=3.5, strict=strict, mtu=1).transmit(2, 0.0)


def test_trace_zero_byte_transfer_does_not_let_a_later_one_go_back_in_time():
    link = cs.TraceLink(cs.trace_from_timestamps([1, 1, 3]))
    link.transmit(1000, 0.0)  # opportunity at 1 ms, 500 B left in it
    link.transmit(0, 0.010)  # nothing to send, but the link's queue is at 10 ms now
    assert link.transmit(1, 0.005) >= 0.010  # queued behind it: not the leftover at 1 ms
