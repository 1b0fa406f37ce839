"""Virtual time: hand-computed queueing examples, the round-latency model, and agreement with the real-time
proxy on the same scripted transfer sequence (within 5%, at least 5x faster in wall time)."""

import copy
import time

import pytest

import splitwave.channel as cs
from splitwave.channel.probe import proxy_exchange, virtual_exchange

MB = 1 << 20


def test_virtual_clock_advances_by_compute_and_links():
    c = cs.VirtualClock()
    link = cs.StaticLink(10e6, 0.02)
    assert c.compute(0.5) == 0.5
    assert c.send(link, 10**6) == pytest.approx(1.32)
    assert c.wait_until(1.0) == pytest.approx(1.32)
    with pytest.raises(ValueError):
        c.compute(-1)


def test_server_queue_fifo_by_hand():
    q = cs.ServerQueue()
    assert q.serve(0.0, 1.0) == 1.0
    assert q.serve(0.5, 1.0) == 2.0  # waits for the first job
    assert q.serve(3.0, 1.0) == 4.0  # server idle 2..3
    assert q.serve_detail(3.5, 0.2) == (4.0, pytest.approx(4.2))
    # a job reported late (out of simulated order) takes an idle gap that fits, delaying nobody
    assert q.serve(2.2, 0.5) == pytest.approx(2.7)
    assert q.serve(2.0, 1.5) == pytest.approx(5.7)  # no gap of 1.5 s before 4.2
    assert q.busy_time == pytest.approx(5.2)


def test_simulate_round_two_clients_by_hand():
    def plan():
        link = lambda: cs.StaticLink(8e6, 0.0)  # noqa: E731  1 byte = 1 us
        return cs.ClientRoundPlan(
            link(),
            link(),
            steps=1,
            t_edge_fwd=0.1,
            t_edge_bwd=0.1,
            t_server=0.2,
            act_bytes=100_000,
            grad_bytes=100_000,
            adapter_bytes=50_000,
        )

    res = cs.simulate_round([plan(), plan()], t_aggregate=0.05)
    r0, r1 = res.per_client
    # client 0 served 0.2-0.4, client 1 waits until 0.4 and is served 0.4-0.6
    assert r0.server_wait == pytest.approx(0.0) and r1.server_wait == pytest.approx(0.2)
    # adapters up at 0.65 / 0.85 -> aggregate 0.85-0.90 -> broadcast 0.05 s
    assert res.t_end == pytest.approx(0.95)
    assert r0.total == pytest.approx(0.95) and r1.total == pytest.approx(0.95)
    assert r1.uplink == pytest.approx(0.15) and r1.downlink == pytest.approx(0.15)
    assert r1.edge_compute == pytest.approx(0.2) and r1.aggregation == 0.05
    assert r0.bytes_up == 150_000 and r0.bytes_down == 150_000
    assert set(r0.to_dict()) >= {"edge_compute", "uplink", "server_compute", "downlink", "aggregation", "total"}
    # the closed form ignores queueing: 0.65 per client + 0.05 aggregation + 0.05 broadcast
    m = cs.round_latency_model([8e6, 8e6], [8e6, 8e6], 1, 0.1, 0.1, 0.2, 100_000, 100_000, 50_000, 0.05)
    assert m["T_k"] == [pytest.approx(0.65)] * 2 and m["T_round"] == pytest.approx(0.75)


def test_simulate_round_multi_step_matches_closed_form_when_no_contention():
    link = lambda r: cs.StaticLink(r, 0.0)  # noqa: E731
    p = cs.ClientRoundPlan(
        link(5e6),
        link(20e6),
        steps=3,
        t_edge_fwd=0.03,
        t_edge_bwd=0.05,
        t_server=0.01,
        act_bytes=400_000,
        grad_bytes=400_000,
        adapter_bytes=200_000,
    )
    res = cs.simulate_round([p], t_aggregate=0.1)
    m = cs.round_latency_model([5e6], [20e6], 3, 0.03, 0.05, 0.01, 400_000, 400_000, 200_000, 0.1)
    assert res.duration == pytest.approx(m["T_round"])


def test_activation_bytes_scale_check():
    s = cs.activation_bytes(16, 64, 384, 4)
    assert s == 1_572_864
    assert 8 * s / 5.95e6 == pytest.approx(2.11, abs=0.005)


# ----------------------------------------------------------------------- virtual vs real time
STEPS, SERVER_S, EDGE_S = 3, 0.05, 0.02


def test_virtual_time_matches_real_time_proxy_and_is_faster():
    up, down = cs.StaticLink(20e6, 0.01), cs.StaticLink(20e6, 0.01)
    w0 = time.monotonic()
    virtual = virtual_exchange(copy.deepcopy(up), copy.deepcopy(down), STEPS, MB, SERVER_S, EDGE_S)
    wall_virtual = time.monotonic() - w0
    real = proxy_exchange(up, down, STEPS, MB, SERVER_S, EDGE_S)
    expect = STEPS * (EDGE_S + SERVER_S + 2 * (0.01 + 8 * MB / 20e6))
    assert virtual == pytest.approx(expect, rel=0.03)
    assert virtual == pytest.approx(real, rel=0.05)
    assert real / wall_virtual >= 5
