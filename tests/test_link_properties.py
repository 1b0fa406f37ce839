"""Property-based tests (hypothesis) of every link model and of the virtual clock: for any t >= 0 and any
size, `done` answers in bounded time, is >= t, is monotone in size and in t, and transfers stay FIFO."""

from __future__ import annotations

import contextlib
import itertools
import math
import signal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import splitwave.channel as cs

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMIT_S = 20  # generous: a hang, not a slow machine, is what this catches
TOL = 1e-9  # relative slack for float sums across coherence blocks


@contextlib.contextmanager
def bounded(seconds: int = LIMIT_S):
    """Fail (instead of hanging the suite) if the body runs longer than `seconds`."""

    def _alarm(*_):
        raise TimeoutError(f"link model did not answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def le(a: float, b: float) -> bool:
    return a <= b + TOL * max(1.0, abs(b))


times = st.floats(min_value=0.0, max_value=1e5, allow_nan=False, allow_infinity=False)
sizes = st.integers(min_value=0, max_value=50_000_000)


@st.composite
def static_links(draw, deterministic=True):
    rate = draw(st.floats(min_value=1e3, max_value=1e10))
    latency = draw(st.floats(min_value=0.0, max_value=1.0))
    loss = draw(st.sampled_from([0.0, 1e-4, 0.01, 0.3]))
    model = "goodput" if deterministic else draw(st.sampled_from(["goodput", "stall"]))
    jitter = cs.Jitter() if deterministic else cs.Jitter("uniform", low_s=0.0, high_s=0.05)
    return lambda: cs.StaticLink(rate, latency, jitter, loss, seed=1, loss_model=model)


@st.composite
def trace_links(draw):
    gaps = draw(st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=40))
    ts, acc = [], draw(st.integers(min_value=0, max_value=5))
    for g in gaps:
        acc += g
        ts.append(acc)
    assume(ts[-1] > 0)
    trace = cs.trace_from_timestamps(ts)
    offset = draw(st.floats(min_value=0.0, max_value=float(ts[-1]), exclude_max=True))
    strict = draw(st.booleans())
    mtu = draw(st.sampled_from([1, 1448, 1500, 9000]))
    latency = draw(st.floats(min_value=0.0, max_value=0.1))
    return lambda: cs.TraceLink(trace, latency, offset, strict=strict, mtu=mtu)


@st.composite
def wireless_links(draw):
    d = draw(st.floats(min_value=10.0, max_value=800.0))
    direction = draw(st.sampled_from(["up", "down"]))
    pathloss = draw(st.sampled_from(["macro", "uma", "umi"]))
    los = draw(st.booleans())
    fading = draw(st.sampled_from(["rayleigh", "rician", "none"]))
    coherence = draw(st.sampled_from([0.0005, 0.001, 0.01, 0.0435]))
    period = draw(st.sampled_from([None, 0.01, 0.05, 1.0]))
    seed = draw(st.integers(min_value=0, max_value=1000))
    n_active = draw(st.integers(min_value=1, max_value=8))
    radio = cs.RadioParams(
        direction=direction,
        p_tx_dbm=23.0 if direction == "up" else 46.0,
        nf_db=5.0 if direction == "up" else 9.0,
        pathloss=pathloss,
        los=los,
        h_bs_m=10.0 if pathloss == "umi" else 25.0,
        se_cap=draw(st.sampled_from([None, 7.4])),
    )
    return lambda: cs.WirelessLink(
        d,
        radio,
        cs.Cell(20e6, n_active=n_active),
        fading=fading,
        rician_k=3.0,
        coherence_s=coherence,
        shadowing_period_s=period,
        seed=seed,
    )


deterministic_links = st.one_of(static_links(), trace_links(), wireless_links())


@SETTINGS
@given(
    make=deterministic_links, n1=sizes, n2=sizes, t1=times, t2=times, warm=st.lists(st.tuples(sizes, times), max_size=3)
)
def test_done_bounded_at_least_t_and_monotone(make, n1, n2, t1, t2, warm):
    n1, n2 = sorted((n1, n2))
    t1, t2 = sorted((t1, t2))
    link = make()
    with bounded():
        for n, t in warm:  # any earlier queue state
            link.done(n, t)
        d11 = link.predict(n1, t1)
        d21 = link.predict(n2, t1)
        d12 = link.predict(n1, t2)
        assert d11 >= t1 and d12 >= t2
        assert d11 >= t1 + link.latency_s - TOL * max(1.0, t1)
        assert all(map(math.isfinite, (d11, d21, d12)))
        assert le(d11, d21), "monotone in size"
        assert le(d11, d12), "monotone in t"


@SETTINGS
@given(
    make=st.one_of(deterministic_links, static_links(deterministic=False)),
    msgs=st.lists(st.tuples(sizes, times), min_size=1, max_size=8),
)
def test_fifo_deliveries_never_reorder(make, msgs):
    link = make()
    msgs = sorted(msgs, key=lambda m: m[1])  # offered in time order, as a sender does
    with bounded():
        out = [link.done(n, t) for n, t in msgs]
    assert all(d >= t for d, (_, t) in zip(out, msgs))
    assert all(a <= b for a, b in zip(out, out[1:])), "a later transfer arrived before an earlier one"


@SETTINGS
@given(
    make=deterministic_links,
    parts=st.lists(st.integers(min_value=1, max_value=5_000_000), min_size=2, max_size=5),
    t=times,
)
def test_fifo_back_to_back_equals_one_transfer(make, parts, t):
    """FIFO byte stream: messages queued together leave when one message of their total size would."""
    a, b = make(), make()
    with bounded():
        for n in parts:
            a.transmit(n, t)
        whole = b.transmit(sum(parts), t)
    assert a.busy_until == pytest.approx(whole, rel=1e-9, abs=1e-12)


@SETTINGS
@given(make=deterministic_links, n=sizes, t=times)
def test_predict_leaves_state_alone(make, n, t):
    link = make()
    with bounded():
        p = link.predict(n, t)
        assert link.busy_until == 0.0
        assert link.done(n, t) == p


# ------------------------------------------------------------------------------------ the virtual clock
durations = st.floats(min_value=0.0, max_value=1e3)


@SETTINGS
@given(make=deterministic_links, steps=st.lists(st.tuples(durations, sizes), min_size=1, max_size=6))
def test_virtual_clock_moves_forward_by_compute_and_links(make, steps):
    link, clock = make(), cs.VirtualClock()
    with bounded():
        for compute_s, n in steps:
            before = clock.t
            assert clock.compute(compute_s) == pytest.approx(before + compute_s)
            t = clock.t
            assert clock.send(link, n) >= t
    assert math.isfinite(clock.t)


@SETTINGS
@given(jobs=st.lists(st.tuples(times, durations), min_size=1, max_size=12), in_order=st.booleans())
def test_server_queue_fifo_and_never_overlaps(jobs, in_order):
    q = cs.ServerQueue()
    if in_order:
        jobs = sorted(jobs)
    with bounded():
        out = [q.serve_detail(a, c) for a, c in jobs]
    for (a, c), (s, f) in zip(jobs, out):
        assert s >= a and f == pytest.approx(s + c)
    spans = sorted((s, f) for s, f in out if f > s)
    assert all(f1 <= s2 + 1e-9 for (_, f1), (s2, _) in zip(spans, spans[1:])), "two jobs served at once"
    if in_order:  # called in arrival order it is exactly FIFO
        assert all(f1 <= f2 for (_, f1), (_, f2) in zip(out, out[1:]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_virtual_clock_and_server_reject_bad_durations(bad):
    with pytest.raises(ValueError):
        cs.VirtualClock().compute(bad)
    with pytest.raises(ValueError):
        cs.ServerQueue().serve(0.0, bad)
    with pytest.raises(ValueError):
        cs.ServerQueue().serve(bad, 1.0)


@settings(SETTINGS, max_examples=200)  # ~4% of boundaries hit the trap: a hang is found almost surely
@given(
    k=st.integers(min_value=0, max_value=10**8),
    tc=st.sampled_from([0.0005, 0.001, 0.003, 0.01, 0.0435]),
    period=st.sampled_from([None, 0.01, 0.07]),
    n=sizes,
    fading=st.sampled_from(["rayleigh", "none"]),
)
def test_wireless_answers_on_block_boundaries(k, tc, period, n, fading):
    """Times on (float) block boundaries k*T_c, where t/T_c rounds below k: the case that hung."""
    t = k * tc
    link = cs.WirelessLink(
        200, cs.RadioParams(), cs.Cell(20e6), fading=fading, coherence_s=tc, shadowing_period_s=period, seed=k % 97
    )
    with bounded():
        d = link.done(n, t)
    assert d >= t and math.isfinite(d)
    assert link.block_of(t) * tc <= t < (link.block_of(t) + 1) * tc


def _brute_force_done_ms(ts: list[int], n: int, t_ms: float, strict: bool, mtu: int) -> float:
    """Enumerate opportunities tau_i + m*T in order and take them from t on (channel.md section 3)."""
    T, need = ts[-1], -(-n // mtu)
    m = max(0, int(t_ms // T) - 2)  # every opportunity before period m is long before t
    while True:
        for tau in ts:
            at = tau + m * T
            if at > t_ms if strict else at >= t_ms - 1e-9:
                need -= 1
                if need == 0:
                    return at
        m += 1


@SETTINGS
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=8),
    n=st.integers(min_value=1, max_value=60_000),
    k=st.integers(min_value=0, max_value=10**6),
    frac=st.sampled_from([0.0, 0.25, 0.999]),
    strict=st.booleans(),
    mtu=st.sampled_from([1000, 1448, 1500]),
)
def test_trace_matches_brute_force_on_and_off_period_boundaries(gaps, n, k, frac, strict, mtu):
    ts = list(itertools.accumulate(gaps))
    assume(ts[-1] > 0)
    t_ms = (k + frac) * ts[-1] if k < 1000 else k * ts[-1] / 7  # whole periods (float boundaries) and others
    t = t_ms / 1000.0
    with bounded():
        got = cs.TraceLink(cs.trace_from_timestamps(ts), strict=strict, mtu=mtu).done(n, t)
    want = _brute_force_done_ms(ts, n, t * 1000.0, strict, mtu)
    assert got * 1000.0 == pytest.approx(want, rel=1e-9, abs=1e-6)
