"""Every expected value of specs/channel.md section 6, one test case per table row (and per number).

Tolerances are the spec's: 1e-6 relative unless the table says otherwise (2 decimals for the analytic
link budget, +-0.01 for the fading statistics); trace times are exact milliseconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import splitwave.channel as cs
from splitwave.channel.wireless import breakpoint_uma, d3d, los_probability

REL = 1e-6


def dec2(x: float) -> float:
    """A value given in the spec with 2 decimals: compare at +-0.005 (one rounding step)."""
    return pytest.approx(x, abs=0.005 + 1e-9)


# ------------------------------------------------------------------------------------------- static
def test_static_1mb_10mbps_20ms():
    link = cs.StaticLink(10e6, latency_s=0.020)
    assert link.done(10**6, 0.0) == pytest.approx(0.820, rel=REL)


def test_static_fifo_second_transfer_starts_when_the_first_leaves():
    link = cs.StaticLink(10e6, latency_s=0.020)
    link.done(10**6, 0.0)
    assert link.busy_until == pytest.approx(0.8, rel=REL)  # the second one starts at 0.8
    assert link.done(5 * 10**5, 0.1) == pytest.approx(1.220, rel=REL)


def test_static_goodput_loss_1e_2():
    link = cs.StaticLink(10e6, latency_s=0.020, loss=0.01)
    assert link.loss_model == "goodput"  # the default
    assert link.effective_rate_bps == pytest.approx(3_576_255, abs=0.5)
    assert min(9.9e6, 8 * 1460 * math.sqrt(1.5) / (0.04 * 0.1)) == pytest.approx(link.effective_rate_bps, rel=REL)
    assert link.done(10**6, 0.0) == pytest.approx(2.2570, abs=5e-5)


def test_static_goodput_loss_1e_4_is_rate_bound():
    link = cs.StaticLink(10e6, latency_s=0.020, loss=1e-4)
    assert cs.mathis_goodput(10e6, 1e-4, 0.04) == pytest.approx(9.999e6, rel=REL)
    assert 8 * 1460 * math.sqrt(1.5) / (0.04 * 0.01) == pytest.approx(35.763e6, rel=1e-4)  # the Mathis bound
    assert link.effective_rate_bps == pytest.approx(9.999e6, rel=REL)


def test_static_loss_model_is_selectable_by_config():
    up = cs.make_link({"kind": "static", "rate_mbps": 10, "latency_ms": 20, "loss": 0.01, "loss_model": "goodput"})
    assert up.effective_rate_bps == pytest.approx(3_576_255, abs=0.5)
    with pytest.raises(ValueError, match="loss_model"):
        cs.make_link({"kind": "static", "rate_mbps": 10, "loss": 0.01, "loss_model": "bogus"})


# ------------------------------------------------------------------------------------------- analytic
def _macro(d=200.0, direction="up", n_active=None, **kw):
    p_tx, nf = (23.0, 5.0) if direction == "up" else (46.0, 9.0)
    radio = cs.RadioParams(
        direction=direction, p_tx_dbm=p_tx, nf_db=nf, pathloss="macro", se_cap=kw.pop("se_cap", None), **kw
    )
    return cs.WirelessLink(d, radio, cs.Cell(20e6, n_active=n_active), shadowing_db=0.0, fading="none")


def test_macro_path_loss_200m():
    assert cs.pl_macro(200) == dec2(101.82)


def test_macro_uplink_20mhz_budget():
    link = _macro()
    assert cs.noise_dbm(20e6, 5.0) == dec2(-95.99)
    assert 23.0 - link.path_loss_db == dec2(-78.82)
    assert link.snr_db(20e6) == dec2(17.17)
    assert link.rate_at(0.0) / 1e6 == dec2(114.63)


def test_macro_uplink_snr_gap_3db():
    assert _macro(snr_gap_db=3.0).rate_at(0.0) / 1e6 == dec2(95.23)


def test_macro_uplink_four_clients_equal_share():
    link = _macro(n_active=4)
    assert link.bandwidth_hz == 5e6
    assert link.snr_db(link.bandwidth_hz) == dec2(23.19)
    assert link.rate_at(0.0) / 1e6 == dec2(38.55)


def test_macro_downlink_20mhz_and_cap():
    link = _macro(direction="down")
    assert link.snr_db(20e6) == dec2(36.17)
    assert link.rate_at(0.0) / 1e6 == dec2(240.32)
    assert _macro(direction="down", se_cap=7.4).rate_at(0.0) / 1e6 == dec2(148.00)


def test_macro_500m():
    link = _macro(d=500.0)
    assert link.path_loss_db == dec2(116.78)
    assert link.snr_db(20e6) == dec2(2.21)
    assert link.rate_at(0.0) / 1e6 == dec2(28.26)


def test_uma_200m():
    assert d3d(200, 25, 1.5) == dec2(201.38)
    assert breakpoint_uma(3.5, 25, 1.5) == pytest.approx(560.0, rel=REL)
    assert cs.pl_uma_los(200, 3.5, 25, 1.5) == dec2(89.57)
    assert cs.pl_uma_nlos(200, 3.5, 25, 1.5) == dec2(114.46)
    assert los_probability("uma", 200) == pytest.approx(0.1280, abs=5e-5)
    assert cs.path_loss_db("uma", 200, 3.5, los=False) == dec2(114.46)


def test_uma_1000m_beyond_breakpoint():
    assert cs.pl_uma_los(1000, 3.5, 25, 1.5) == dec2(109.41)
    assert cs.pl_uma_nlos(1000, 3.5, 25, 1.5) == dec2(141.67)


@pytest.mark.parametrize("d,los,nlos", [(100, 85.31, 104.64), (300, 98.24, 121.44)])
def test_umi_street_canyon(d, los, nlos):
    assert breakpoint_uma(3.5, 10, 1.5) == pytest.approx(210.0, rel=REL)
    assert cs.pl_umi_los(d, 3.5, 10, 1.5) == dec2(los)
    assert cs.pl_umi_nlos(d, 3.5, 10, 1.5) == dec2(nlos)
    assert cs.path_loss_db("umi", d, 3.5, los=True, h_bs=10) == dec2(los)


def test_rayleigh_ergodic_spectral_efficiency_at_10db():
    link = cs.WirelessLink(200, fading="rayleigh", seed=11)
    g = link._gains(np.arange(10**6))
    se = float(np.mean(np.log2(1.0 + 10.0 * g)))
    assert se == pytest.approx(2.9065, abs=0.01)
    assert math.log2(1 + 10.0) == pytest.approx(3.4594, abs=5e-5)  # AWGN
    # closed form e^{1/snr} E1(1/snr) / ln 2, E1 by its series
    x = 0.1
    e1 = -0.5772156649015329 - math.log(x) - sum((-x) ** k / (k * math.factorial(k)) for k in range(1, 30))
    assert math.exp(x) * e1 / math.log(2) == pytest.approx(2.9065, abs=5e-5)


def test_rician_k3_mean_gain():
    link = cs.WirelessLink(200, fading="rician", rician_k=3.0, seed=12)
    assert float(np.mean(link._gains(np.arange(10**6)))) == pytest.approx(1.0, abs=0.01)


# ------------------------------------------------------------------------------------------- traces
T113 = [1, 1, 3]


def _trace(ts, strict=False, **kw):
    return cs.TraceLink(cs.trace_from_timestamps(ts), strict=strict, **kw)


@pytest.mark.parametrize(
    "n,t_ms,expect,expect_strict",
    [
        (4500, 0, 3, 3),
        (6000, 0, 4, 4),
        (4500, 2, 4, 4),
        (1, 5, 6, 6),
        (1, 3, 3, 4),
        (3000, 3, 4, 4),
        (1, 6, 6, 7),
        (10500, 0, 7, 7),
    ],
)
def test_trace_113_single_transfers(n, t_ms, expect, expect_strict):
    assert _trace(T113).done(n, t_ms / 1e3) == pytest.approx(expect / 1e3, rel=REL)
    assert _trace(T113, strict=True).done(n, t_ms / 1e3) == pytest.approx(expect_strict / 1e3, rel=REL)


def test_trace_strict_is_mm_link_one_ms_later_at_integer_times():
    for n in (1, 1500, 1501, 4500, 10500):
        for t in range(0, 12):
            strict = _trace(T113, strict=True).done(n, t / 1e3)
            assert strict == pytest.approx(_trace(T113).done(n, (t + 1) / 1e3), rel=REL)


def test_trace_113_fifo_shares_one_opportunity():
    link = _trace(T113)
    assert link.done(2000, 0.0) == pytest.approx(0.001, rel=REL)  # A: opportunities 1 and 1 (500 B left)
    assert link.done(1000, 0.0) == pytest.approx(0.001, rel=REL)  # B: the rest of the 2nd one at 1 ms
    assert link.done(2000, 0.002) == pytest.approx(0.004, rel=REL)  # C: 3 and 4


@pytest.mark.parametrize("k,expect", [(1, 0), (2, 2), (3, 2), (4, 4), (5, 4)])
def test_trace_02_wrap(k, expect):
    assert _trace([0, 2]).done(1500 * k, 0.0) == pytest.approx(expect / 1e3, abs=1e-12)


@pytest.mark.usefixtures("shared_traces")
@pytest.mark.parametrize(
    "n,t_ms,expect", [(10**6, 0, 884), (10**6, 70_000, 72_669), (10**7, 130_000, 140_875), (1_572_864, 0, 1_473)]
)
def test_trace_verizon_up(n, t_ms, expect):
    link = cs.TraceLink(cs.load_trace("Verizon-LTE-short.up"))
    assert link.done(n, t_ms / 1e3) == pytest.approx(expect / 1e3, rel=REL)


@pytest.mark.usefixtures("shared_traces")
def test_trace_verizon_up_mean_rate_would_mislead():
    tr = cs.load_trace("Verizon-LTE-short.up")
    assert tr.mean_bps / 1e6 == pytest.approx(5.95, abs=0.005)  # the traces README's mean, 2 decimals
    assert 8 * 1_572_864 / 5.95e6 * 1e3 == pytest.approx(2115, abs=0.5)  # what that mean rate would predict
    assert cs.TraceLink(tr).done(1_572_864, 0.0) * 1e3 < 0.75 * 2115  # the trace's early burst is faster


@pytest.mark.usefixtures("shared_traces")
@pytest.mark.parametrize("n,t_ms,expect,expect_strict", [(10**6, 0, 1_778, 1_779), (10**6, 115_000, 120_195, None)])
def test_trace_att_up(n, t_ms, expect, expect_strict):
    tr = cs.load_trace("ATT-LTE-driving-2016.up")
    assert tr.period_ms == 120_002
    assert cs.TraceLink(tr).done(n, t_ms / 1e3) == pytest.approx(expect / 1e3, rel=REL)
    if expect_strict is not None:
        assert cs.TraceLink(tr, strict=True).done(n, t_ms / 1e3) == pytest.approx(expect_strict / 1e3, rel=REL)


def test_trace_strict_and_mtu_selectable_by_config():
    link = cs.make_link({"kind": "trace", "timestamps_ms": T113, "strict": True, "mtu": 1448})
    assert link.strict and link.mtu == 1448
    assert link.done(1, 0.003) == pytest.approx(0.004, rel=REL)
    assert cs.make_link({"kind": "trace", "timestamps_ms": T113, "mtu": 1448}).done(2 * 1448, 0.0) == pytest.approx(
        0.001, rel=REL
    )


def test_conventions_in_the_config_schema():
    from splitwave.common.config import ConfigError, ExperimentConfig, parse_config

    cfg = ExperimentConfig.model_validate(
        {
            "channel": {
                "mode": "virtual",
                "uplink": {"kind": "trace", "timestamps_ms": T113, "strict": True, "mtu": 1448},
                "downlink": {"kind": "static", "rate_mbps": 10, "loss": 0.01, "loss_model": "stall", "latency_ms": 20},
            }
        }
    )
    assert cfg.channel.uplink["strict"] is True
    for bad, msg in [
        ({"kind": "trace", "timestamps_ms": T113, "strict": "yes"}, "strict"),
        ({"kind": "trace", "timestamps_ms": T113, "mtu": 0}, "mtu"),
        ({"kind": "static", "rate_mbps": 1, "loss_model": "mathis"}, "loss_model"),
        ({"kind": "static", "rate_mbps": 1, "stict": True}, "stict"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_config({"channel": {"uplink": bad}})
