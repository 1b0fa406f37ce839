"""Link models against every expected number in specs/channel.md sections 1-3, plus FIFO behaviour."""

import math

import numpy as np
import pytest

import splitwave.channel as cs
from splitwave.channel.wireless import breakpoint_uma, d3d


# ------------------------------------------------------------------------------------ 1. static link
def test_static_spec_check_1mb_10mbps_20ms():
    link = cs.StaticLink(10e6, latency_s=0.020)
    assert link.done(10**6, 0.0) == pytest.approx(0.82, abs=1e-12)


def test_static_fifo_back_to_back_and_idle_gap():
    link = cs.StaticLink(8e6, latency_s=0.01)  # 1 byte = 1 us
    assert link.done(1000, 0.0) == pytest.approx(0.011)
    # queued behind the first transfer (transmitter busy until 1 ms)
    assert link.done(1000, 0.0005) == pytest.approx(0.012)
    # link idle again at 5 ms
    assert link.done(1000, 0.005) == pytest.approx(0.016)
    assert link.busy_until == pytest.approx(0.006)


def test_static_split_transfers_equal_one_transfer():
    a, b = cs.StaticLink(5e6, 0.003), cs.StaticLink(5e6, 0.003)
    for _ in range(100):
        a.transmit(1500, 0.0)
    assert a.done(0, 0.0) == pytest.approx(b.done(150000, 0.0))


def test_predict_does_not_change_state():
    link = cs.StaticLink(10e6, 0.02, cs.Jitter("normal", sigma_s=0.005), seed=3)
    p = link.predict(10**6, 0.0)
    assert link.busy_until == 0.0
    assert link.done(10**6, 0.0) == p


def test_mathis_goodput():
    # p = 0: full rate
    assert cs.mathis_goodput(10e6, 0.0, 0.04) == 10e6
    # p = 1e-4, RTT 40 ms: MSS*8*1.2247/(0.04*0.01) = 35.77 Mbit/s > R(1-p), so R(1-p)
    assert cs.mathis_goodput(10e6, 1e-4, 0.04) == pytest.approx(10e6 * (1 - 1e-4))
    # p = 1e-2, RTT 100 ms: 1460*8*sqrt(1.5)/(0.1*0.1) = 1.4305 Mbit/s
    r = cs.mathis_goodput(100e6, 1e-2, 0.1)
    assert r == pytest.approx(1460 * 8 * math.sqrt(1.5) / (0.1 * 0.1))
    assert r / 1e6 == pytest.approx(1.4305, abs=1e-3)
    link = cs.StaticLink(100e6, latency_s=0.05, loss=1e-2)
    assert link.done(10**6, 0.0) == pytest.approx(0.05 + 8e6 / r)


def test_jitter_distributions():
    rng = np.random.default_rng(0)
    j = cs.Jitter("normal", sigma_s=0.01)
    x = np.array([j.sample(rng) for _ in range(20000)])
    assert x.min() >= 0.0
    assert x.mean() == pytest.approx(0.01 * math.sqrt(2 / math.pi), rel=0.03)  # half-normal
    assert j.mean == pytest.approx(0.01 * math.sqrt(2 / math.pi))
    u = cs.Jitter("uniform", low_s=0.002, high_s=0.006)
    y = np.array([u.sample(rng) for _ in range(5000)])
    assert y.min() >= 0.002 and y.max() <= 0.006 and y.mean() == pytest.approx(0.004, rel=0.03)
    with pytest.raises(ValueError):
        cs.Jitter("cauchy")


def test_jitter_never_reorders_deliveries():
    link = cs.StaticLink(100e6, 0.01, cs.Jitter("uniform", low_s=0.0, high_s=0.05), seed=1)
    arrivals = [link.done(100, 0.0001 * i) for i in range(200)]
    assert all(b >= a for a, b in zip(arrivals, arrivals[1:]))


def test_seeded_jitter_reproducible_and_reset():
    mk = lambda: cs.StaticLink(10e6, 0.01, cs.Jitter("normal", sigma_s=0.003), seed=42)  # noqa: E731
    a, b = mk(), mk()
    xs = [a.done(1000, i * 0.1) for i in range(10)]
    assert xs == [b.done(1000, i * 0.1) for i in range(10)]
    a.reset()
    assert xs == [a.done(1000, i * 0.1) for i in range(10)]


# ------------------------------------------------------------------------------------ 2. wireless
def test_path_loss_checks():
    assert cs.pl_macro(200) == pytest.approx(101.82, abs=0.005)
    assert d3d(200, 25, 1.5) == pytest.approx(201.38, abs=0.005)
    assert breakpoint_uma(3.5) == pytest.approx(560, abs=1)
    assert cs.pl_uma_los(200, 3.5) == pytest.approx(89.57, abs=0.005)
    assert cs.pl_uma_nlos(200, 3.5) == pytest.approx(114.46, abs=0.005)
    # beyond the breakpoint the 40 log10 branch applies and stays continuous at d_BP
    dbp = breakpoint_uma(3.5)
    assert cs.pl_uma_los(dbp + 1e-6, 3.5) == pytest.approx(cs.pl_uma_los(dbp - 1e-6, 3.5), abs=0.01)
    assert cs.pl_uma_los(1000, 3.5) > cs.pl_uma_los(600, 3.5)
    # UMi street canyon
    d = d3d(100, 10, 1.5)
    assert cs.pl_umi_los(100, 3.5, 10) == pytest.approx(32.4 + 21 * math.log10(d) + 20 * math.log10(3.5))
    assert cs.pl_umi_nlos(100, 3.5, 10) >= cs.pl_umi_los(100, 3.5, 10)


def _clean(direction="up", n_active=None, se_cap=None, **kw):
    p_tx, nf = (23.0, 5.0) if direction == "up" else (46.0, 9.0)
    cell = cs.Cell(20e6, n_active=n_active)
    radio = cs.RadioParams(direction=direction, p_tx_dbm=p_tx, nf_db=nf, se_cap=se_cap, **kw)
    return cs.WirelessLink(200, radio, cell, shadowing_db=0.0, fading="none")


def test_uplink_budget_check():
    link = _clean("up")
    assert cs.noise_dbm(20e6, 5) == pytest.approx(-95.99, abs=0.005)
    assert 23 - link.path_loss_db == pytest.approx(-78.82, abs=0.005)
    assert link.snr_db(20e6) == pytest.approx(17.17, abs=0.005)
    assert link.rate_at(0.0) / 1e6 == pytest.approx(114.63, abs=0.005)


def test_uplink_four_clients_equal_share():
    link = _clean("up", n_active=4)
    assert link.bandwidth_hz == 5e6
    assert link.snr_db(5e6) == pytest.approx(23.19, abs=0.005)
    assert link.rate_at(0.0) / 1e6 == pytest.approx(38.55, abs=0.005)
    # same via four links attached to one cell
    cell = cs.Cell(20e6)
    links = [cs.WirelessLink(200, cs.RadioParams(se_cap=None), cell, shadowing_db=0, fading="none") for _ in range(4)]
    assert links[0].rate_at(0.0) / 1e6 == pytest.approx(38.55, abs=0.005)


def test_downlink_budget_check_and_cap():
    link = _clean("down")
    assert link.snr_db(20e6) == pytest.approx(36.17, abs=0.005)
    assert link.rate_at(0.0) / 1e6 == pytest.approx(240.32, abs=0.005)
    assert _clean("down", se_cap=7.4).rate_at(0.0) / 1e6 == pytest.approx(148.0, abs=1e-9)


def test_snr_gap_lowers_rate():
    assert _clean("up", snr_gap_db=3.0).rate_at(0) < _clean("up").rate_at(0)
    assert cs.shannon_rate(1e6, 10 * math.log10(3)) == pytest.approx(2e6)  # log2(1+3) = 2


def test_transfer_sums_bits_block_by_block():
    link = cs.WirelessLink(
        200, cs.RadioParams(), cs.Cell(20e6), shadowing_db=0, fading="rayleigh", coherence_s=0.01, seed=5
    )
    n = 2_000_000
    t_end = link.done(n, 0.003)
    # independent integration: bits carried per block at each block's rate
    bits, t, b = 8 * n, 0.003, 0  # 0.003 lies in block 0; integer block index, no float floor
    for _ in range(10_000):
        r = link.rate_at(b * 0.01 + 0.005)  # mid-block: unambiguous
        cap = r * ((b + 1) * 0.01 - t)
        if cap >= bits:
            expect = t + bits / r
            break
        bits -= cap
        b += 1
        t = b * 0.01
    assert t_end == pytest.approx(expect, rel=1e-12)
    assert t_end - 0.003 > 0.02  # spans several blocks


def test_fading_statistics():
    cell = cs.Cell(20e6)
    ray = cs.WirelessLink(200, cs.RadioParams(), cell, shadowing_db=0, fading="rayleigh", seed=1)
    g = np.array([ray.fading_gain(b) for b in range(20000)])
    assert g.mean() == pytest.approx(1.0, rel=0.03)
    assert np.mean(g < 0.1) == pytest.approx(1 - math.exp(-0.1), abs=0.01)  # Exp(1)
    ric = cs.WirelessLink(200, cs.RadioParams(), cell, shadowing_db=0, fading="rician", rician_k=10, seed=1)
    h = np.array([ric.fading_gain(b) for b in range(20000)])
    assert h.mean() == pytest.approx(1.0, rel=0.03)
    assert h.var() < g.var() / 3  # strong LOS component: much less fading


def test_shadowing_redrawn_per_round_and_per_period():
    cell = cs.Cell(20e6)
    link = cs.WirelessLink(200, cs.RadioParams(pathloss="uma"), cell, fading="none", seed=9)
    assert link.shadowing_db == 4.0  # UMa LOS default
    x0 = link.shadowing_at(0.0)
    assert link.shadowing_at(100.0) == x0  # per round: constant in time
    xs = []
    for r in range(400):
        link.set_round(r)
        xs.append(link.shadowing_at(0.0))
    assert np.std(xs) == pytest.approx(4.0, rel=0.15)
    per = cs.WirelessLink(200, cs.RadioParams(), cs.Cell(), fading="none", shadowing_period_s=1.0, seed=2)
    assert per.shadowing_at(0.2) == per.shadowing_at(0.9) != per.shadowing_at(1.1)


def test_allocations():
    cell = cs.Cell(20e6, allocation="latency_balancing")
    near = cs.WirelessLink(100, cs.RadioParams(se_cap=None), cell, shadowing_db=0, fading="none")
    far = cs.WirelessLink(450, cs.RadioParams(se_cap=None), cell, shadowing_db=0, fading="none")
    assert near.bandwidth_hz + far.bandwidth_hz == pytest.approx(20e6)
    assert far.bandwidth_hz > near.bandwidth_hz
    assert near.rate_at(0) == pytest.approx(far.rate_at(0), rel=1e-4)
    pf = cs.Cell(20e6, allocation="proportional_fair")
    a = cs.WirelessLink(100, cs.RadioParams(se_cap=None), pf, shadowing_db=0, fading="none")
    b = cs.WirelessLink(450, cs.RadioParams(se_cap=None), pf, shadowing_db=0, fading="none")
    assert a.bandwidth_hz + b.bandwidth_hz == pytest.approx(20e6)

    # PF optimum: no small bandwidth move raises sum log rate
    def util(ba):
        return math.log(a.mean_rate_for_bandwidth(ba)) + math.log(b.mean_rate_for_bandwidth(20e6 - ba))

    u0 = util(a.bandwidth_hz)
    assert u0 >= util(a.bandwidth_hz + 2e5) - 1e-9 and u0 >= util(a.bandwidth_hz - 2e5) - 1e-9
    # downlink (power follows bandwidth) PF = equal shares
    pfd = cs.Cell(20e6, allocation="proportional_fair")
    rd = cs.RadioParams(direction="down", p_tx_dbm=46, nf_db=9, se_cap=None)
    c = cs.WirelessLink(100, rd, pfd, shadowing_db=0, fading="none")
    cs.WirelessLink(450, rd, pfd, shadowing_db=0, fading="none")
    assert c.bandwidth_hz == pytest.approx(10e6, rel=1e-3)


def test_place_clients_uniform_in_annulus():
    d = cs.place_clients(20000, 500, 35, seed=0)
    assert d.min() >= 35 and d.max() <= 500
    # uniform in area: P(d <= r) = (r^2 - dmin^2)/(R^2 - dmin^2)
    assert np.mean(d <= 250) == pytest.approx((250**2 - 35**2) / (500**2 - 35**2), abs=0.01)
    assert np.array_equal(d, cs.place_clients(20000, 500, 35, seed=0))


# ------------------------------------------------------------------------------------ 3. traces
@pytest.mark.parametrize("n,t0,expect_ms", [(4500, 0, 3), (6000, 0, 4), (4500, 0.002, 4), (1, 0.005, 6), (1, 0.003, 3)])
def test_trace_spec_checks_113(n, t0, expect_ms):
    link = cs.TraceLink(cs.trace_from_timestamps([1, 1, 3]))
    assert link.done(n, t0) == pytest.approx(expect_ms / 1e3, abs=1e-12)


def test_trace_latency_offset_and_many_periods():
    link = cs.TraceLink(cs.trace_from_timestamps([1, 1, 3]), latency_s=0.02)
    assert link.done(4500, 0.0) == pytest.approx(0.023)
    # 3 opportunities per 3 ms -> opportunity #300 (1-based) is the last of period 99: 99*3 + 3 = 300 ms
    link.reset()
    assert link.done(300 * 1500, 0.0) == pytest.approx(0.300 + 0.02)
    off = cs.TraceLink(cs.trace_from_timestamps([1, 1, 3]), offset_ms=1)
    # trace clock = t + 1 ms: opportunities at link times 0, 0, 2, 3, 3, 5, ...
    assert off.done(1, 0.0) == pytest.approx(0.0)
    assert off.done(4500, 0.0005) == pytest.approx(0.003)


def test_trace_fifo_shares_opportunities():
    link = cs.TraceLink(cs.trace_from_timestamps([1, 1, 3]))
    # 1000 B then 500 B queued at once: both fit in the first opportunity (1 ms)
    assert link.done(1000, 0.0) == pytest.approx(0.001)
    assert link.done(500, 0.0) == pytest.approx(0.001)
    # next 1 B: the first opportunity is full, the second is also at 1 ms
    assert link.done(1, 0.0) == pytest.approx(0.001)
    # 3000 B more: 1499 B left in opp #2, then opp #3 (3 ms) carries 1500, opp #4 (4 ms) the last byte
    assert link.done(3000, 0.0) == pytest.approx(0.004)
    # link idle again: from 5 ms the next opportunity is at 6 ms; a leftover at 4 ms is lost
    assert link.done(1, 0.005) == pytest.approx(0.006)


def test_trace_fifo_additive():
    a = cs.TraceLink(cs.trace_from_timestamps([1, 1, 3, 7, 7, 7, 12]), offset_ms=5)
    b = cs.TraceLink(cs.trace_from_timestamps([1, 1, 3, 7, 7, 7, 12]), offset_ms=5)
    for n in [700, 1500, 3, 4000, 1]:
        a.transmit(n, 0.0)
    assert a.busy_until == b.transmit(700 + 1500 + 3 + 4000 + 1, 0.0)


def test_random_offset_seeded():
    tr = cs.trace_from_timestamps(list(range(1, 1001)))
    a = cs.TraceLink(tr, offset_ms=None, seed=1)
    assert a.offset_ms == cs.TraceLink(tr, offset_ms=None, seed=1).offset_ms
    assert a.offset_ms != cs.TraceLink(tr, offset_ms=None, seed=2).offset_ms
    assert 0 <= a.offset_ms < 1000


README_STATS = {  # from shared/traces/README.md
    "ATT-LTE-driving-2016.down": (45604, 120.0, 4.56, 0.58, 3.74, 11.08, 0),
    "ATT-LTE-driving-2016.up": (19101, 120.0, 1.91, 0.03, 1.57, 4.79, 4),
    "TMobile-UMTS-driving.down": (156262, 928.4, 2.02, 0.02, 1.89, 5.35, 32),
    "TMobile-UMTS-driving.up": (73197, 931.2, 0.94, 0.07, 1.08, 1.44, 27),
    "Verizon-LTE-short.down": (58655, 140.0, 5.03, 1.07, 4.30, 10.83, 0),
    "Verizon-LTE-short.up": (69367, 140.0, 5.95, 1.17, 5.69, 11.38, 1),
}


@pytest.mark.usefixtures("shared_traces")
@pytest.mark.parametrize("name", sorted(README_STATS))
def test_trace_loader_stats_match_readme(name):
    s = cs.load_trace(name).stats()
    lines, dur, mean, p5, p50, p95, zero = README_STATS[name]
    assert s["packets"] == lines
    assert s["duration_s"] == pytest.approx(dur, abs=0.05)
    for key, v in [("mean_mbps", mean), ("p5_mbps", p5), ("p50_mbps", p50), ("p95_mbps", p95)]:
        assert s[key] == pytest.approx(v, abs=0.005 + 1e-9), key
    assert s["zero_seconds"] == zero


@pytest.mark.usefixtures("shared_traces")
def test_trace_rate_at_and_long_transfer_mean():
    link = cs.TraceLink(cs.load_trace("Verizon-LTE-short.up"))
    T = link.trace.period_ms / 1e3
    # averaged over a whole period (any window of length T), rate_at is the mean rate
    assert link.rate_at(0.0005, window_s=T) == pytest.approx(link.trace.mean_bps, rel=1e-9)
    # one full period of opportunities carries exactly n * 1500 bytes
    n = link.trace.n
    assert link.done(n * 1500, 0.0) == pytest.approx(T)


# ------------------------------------------------------------------------------------ factory
def test_make_link_static_and_pair():
    link = cs.make_link({"kind": "static", "rate_mbps": 10, "latency_ms": 20})
    assert isinstance(link, cs.StaticLink) and link.done(10**6, 0) == pytest.approx(0.82)
    j = cs.make_link({"kind": "static", "rate_mbps": 10, "jitter": "normal", "jitter_ms": 5, "seed": 1})
    assert j.jitter.sigma_s == 0.005
    with pytest.raises(ValueError):
        cs.make_link({"kind": "static", "rate_mbps": 10, "latncy_ms": 20})
    with pytest.raises(ValueError):
        cs.make_link({"kind": "carrier-pigeon"})
    pair = cs.make_link_pair(
        {
            "uplink": {"kind": "static", "rate_mbps": 5},
            "downlink": {"kind": "static", "rate_mbps": 50},
            "latency_ms": 10,
        }
    )
    assert pair.uplink.rate_bps == 5e6 and pair.downlink.rate_bps == 50e6 and pair.uplink.latency_s == 0.01


def test_make_link_trace_inline_and_file(shared_traces):
    link = cs.make_link({"kind": "trace", "timestamps_ms": [1, 1, 3], "latency_ms": 0})
    assert link.done(6000, 0) == pytest.approx(0.004)
    a = cs.make_link({"kind": "trace", "file": "Verizon-LTE-short.up", "latency_ms": 20, "offset": "random", "seed": 4})
    b = cs.make_link({"kind": "trace", "file": "Verizon-LTE-short.up", "latency_ms": 20, "offset": "random", "seed": 4})
    assert a.offset_ms == b.offset_ms and a.latency_s == 0.02


def test_make_link_wireless_and_pair_share_distance():
    up = cs.make_link({"kind": "wireless", "distance_m": 200, "shadowing_db": 0, "fading": "none", "se_cap": None})
    assert up.rate_at(0) / 1e6 == pytest.approx(114.63, abs=0.005)
    pair = cs.make_link_pair(
        {"kind": "wireless", "seed": 7, "pathloss": "uma", "los": "auto", "uplink": {}, "downlink": {}}
    )
    assert pair.uplink.radio.direction == "up" and pair.downlink.radio.direction == "down"
    assert pair.uplink.distance_m == pair.downlink.distance_m
    assert 35 <= pair.uplink.distance_m <= 500
    assert pair.downlink.radio.p_tx_dbm == 46 and pair.downlink.radio.nf_db == 9
    assert pair.downlink.seed != pair.uplink.seed
    # clients sharing a cell
    cell = cs.Cell(20e6)
    links = [
        cs.make_link(
            {"kind": "wireless", "distance_m": 200, "shadowing_db": 0, "fading": "none", "se_cap": None}, cell=cell
        )
        for _ in range(4)
    ]
    assert links[0].rate_at(0) / 1e6 == pytest.approx(38.55, abs=0.005)


def test_stall_loss_model_adds_retransmission_delays():
    """`stall`: R_eff = R; each lost segment adds one RTT, a lost last segment the minimum RTO (200 ms)."""
    base = cs.StaticLink(10e6, latency_s=0.02, loss=0.0, loss_model="stall").done(10**6, 0.0)
    assert base == pytest.approx(0.82)
    link = cs.StaticLink(10e6, latency_s=0.02, loss=0.01, loss_model="stall", seed=4)
    assert link.effective_rate_bps == 10e6  # loss costs time per segment, not rate
    runs = (
        np.array(
            [
                cs.StaticLink(10e6, latency_s=0.02, loss=0.01, loss_model="stall", seed=seed).done(10**6, 0.0)
                for seed in range(200)
            ]
        )
        - base
    )
    assert (runs >= -1e-12).all()
    # every extra delay is a whole number of RTTs (40 ms; the 200 ms RTO is 5 of them here)
    assert np.allclose(runs / 0.04, np.round(runs / 0.04), atol=1e-6)
    assert link.predict(10**6, 0.0) == link.predict(10**6, 0.0)  # seeded, and predict leaves the stream alone
    segs = -(-(10**6) // 1460)  # 685 segments, p = 0.01: about 6.8 losses on average
    assert runs.mean() / 0.04 == pytest.approx((segs - 1) * 0.01 + 0.01 * 0.2 / 0.04, rel=0.15)
