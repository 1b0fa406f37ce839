"""Virtual time: nothing sleeps.  Each client has a simulated clock advanced by measured compute
durations and by `link.done(nbytes, t)` for each message's exact serialized size; the server is a shared
FIFO resource on the simulated clock.  Also the closed-form round-latency model of channel.md section 5
(what the `plan` command uses to predict per-round time of each cut).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .link import Link, check_time


class VirtualClock:
    """A client's simulated clock (seconds).  Advanced only by compute durations and link transfers."""

    def __init__(self, t: float = 0.0):
        self.t = float(t)

    def compute(self, seconds: float) -> float:
        self.t = check_time(self.t + check_time(seconds, "compute duration"), "clock time")
        return self.t

    def send(self, link: Link, nbytes: int) -> float:
        """A message of `nbytes` leaves now; the clock moves to its last byte's arrival."""
        self.t = link.done(nbytes, self.t)
        return self.t

    def wait_until(self, t: float) -> float:
        self.t = max(self.t, check_time(t))
        return self.t


class ServerQueue:
    """The server as one shared, non-preemptive resource on the simulated clock.

    `serve(arrival, compute)` returns the finish time.  Called in arrival order it is exactly FIFO.
    Calls may also come out of simulated order (processes report in wall-clock order); a job then goes
    into the earliest idle gap at or after its arrival that fits, so it never delays jobs already
    scheduled (their finish times were already handed out).
    """

    def __init__(self) -> None:
        self._starts: list[float] = []
        self._ends: list[float] = []
        self.busy_time = 0.0

    def serve(self, arrival_t: float, compute_s: float) -> float:
        return self.serve_detail(arrival_t, compute_s)[1]

    def serve_detail(self, arrival_t: float, compute_s: float) -> tuple[float, float]:
        """(start, finish); start - arrival is the queueing delay."""
        compute_s = check_time(compute_s, "compute duration")
        t = check_time(arrival_t, "arrival time")
        i = bisect.bisect_right(self._ends, t)  # first interval ending after t
        while i < len(self._starts):
            if self._starts[i] >= t + compute_s and self._starts[i] > t:
                break  # fits in the gap before interval i (a zero-length job must not jump a job starting at t)
            t = max(t, self._ends[i])
            i += 1
        self._starts.insert(i, t)
        self._ends.insert(i, t + compute_s)
        self.busy_time += compute_s
        return t, t + compute_s

    @property
    def free_at(self) -> float:
        return self._ends[-1] if self._ends else 0.0

    def reset(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self.busy_time = 0.0


@dataclass
class RoundLatency:
    """Where a client's round time went (seconds).  `server_wait` is queueing behind other clients."""

    client: int
    round: int
    edge_compute: float = 0.0
    uplink: float = 0.0
    server_wait: float = 0.0
    server_compute: float = 0.0
    downlink: float = 0.0
    aggregation: float = 0.0
    total: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClientRoundPlan:
    """One client's work in a parallel-SFL round: E steps of fwd -> act up -> server -> grad down -> bwd,
    then the edge adapter goes up.  Times in seconds (measured or profiled), sizes in bytes."""

    uplink: Link
    downlink: Link
    steps: int
    t_edge_fwd: float
    t_edge_bwd: float
    t_server: float
    act_bytes: int
    grad_bytes: int
    adapter_bytes: int
    start: float = 0.0


@dataclass
class RoundResult:
    t_start: float
    t_end: float
    per_client: list[RoundLatency] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.t_end - self.t_start


def simulate_round(
    plans: Sequence[ClientRoundPlan], t_aggregate: float = 0.0, round_index: int = 0, server: ServerQueue | None = None
) -> RoundResult:
    """Event-driven simulation of one round on the simulated clock: exact FIFO at the shared server,
    FIFO on each link; then aggregation and the broadcast of the new adapter (downlink)."""
    server = server or ServerQueue()
    recs = [RoundLatency(client=k, round=round_index) for k in range(len(plans))]
    t0 = min((p.start for p in plans), default=0.0)
    # events: (time, seq, client, kind, step); kind 0 = activations arrive at server
    ev: list[tuple[float, int, int, int]] = []
    seq = 0
    clocks = [VirtualClock(p.start) for p in plans]
    done_at = [p.start for p in plans]

    def start_step(k: int) -> None:
        nonlocal seq
        p, c, r = plans[k], clocks[k], recs[k]
        c.compute(p.t_edge_fwd)
        r.edge_compute += p.t_edge_fwd
        t_before = c.t
        c.send(p.uplink, p.act_bytes)
        r.uplink += c.t - t_before
        r.bytes_up += p.act_bytes
        heapq.heappush(ev, (c.t, seq, k, 0))
        seq += 1

    steps_left = [p.steps for p in plans]
    for k, p in enumerate(plans):
        if p.steps > 0:
            start_step(k)
    while ev:
        t, _, k, _ = heapq.heappop(ev)
        p, c, r = plans[k], clocks[k], recs[k]
        s, f = server.serve_detail(t, p.t_server)
        r.server_wait += s - t
        r.server_compute += p.t_server
        c.t = f
        t_before = c.t
        c.send(p.downlink, p.grad_bytes)
        r.downlink += c.t - t_before
        r.bytes_down += p.grad_bytes
        c.compute(p.t_edge_bwd)
        r.edge_compute += p.t_edge_bwd
        steps_left[k] -= 1
        if steps_left[k] > 0:
            start_step(k)
    for k, p in enumerate(plans):
        c, r = clocks[k], recs[k]
        t_before = c.t
        c.send(p.uplink, p.adapter_bytes)
        r.uplink += c.t - t_before
        r.bytes_up += p.adapter_bytes
        done_at[k] = c.t
    t_agg_start = max(done_at, default=t0)
    t_agg_end = t_agg_start + t_aggregate
    t_end = t_agg_end
    for k, p in enumerate(plans):
        arr = p.downlink.done(p.adapter_bytes, t_agg_end)
        recs[k].aggregation = t_aggregate
        recs[k].downlink += arr - t_agg_end
        recs[k].bytes_down += p.adapter_bytes
        recs[k].total = arr - p.start
        t_end = max(t_end, arr)
    return RoundResult(t0, t_end, recs)


def round_latency_model(
    rates_ul_bps: Sequence[float],
    rates_dl_bps: Sequence[float],
    steps: int,
    t_edge_fwd: float | Sequence[float],
    t_edge_bwd: float | Sequence[float],
    t_server: float | Sequence[float],
    act_bytes: int,
    grad_bytes: int,
    adapter_bytes: int,
    t_aggregate: float = 0.0,
) -> dict[str, Any]:
    """Closed form of channel.md section 5 (no server queueing):
    T_k = E (t_fwd + S_act/R_ul + t_srv + S_grad/R_dl + t_bwd) + S_ad/R_ul;
    T_round = max_k T_k + t_agg + max_k S_ad/R_dl.  Sizes in bytes, rates in bit/s."""
    K = len(rates_ul_bps)

    def per(x: float | Sequence[float]) -> list[float]:
        return list(x) if isinstance(x, Sequence) else [float(x)] * K

    fwd, bwd, srv = per(t_edge_fwd), per(t_edge_bwd), per(t_server)
    T = []
    for k in range(K):
        ul, dl = rates_ul_bps[k], rates_dl_bps[k]
        T.append(steps * (fwd[k] + 8 * act_bytes / ul + srv[k] + 8 * grad_bytes / dl + bwd[k]) + 8 * adapter_bytes / ul)
    bcast = max(8 * adapter_bytes / r for r in rates_dl_bps)
    return {
        "T_k": T,
        "T_round": max(T) + t_aggregate + bcast,
        "broadcast": bcast,
        "comm_share": [1 - steps * (fwd[k] + srv[k] + bwd[k]) / T[k] for k in range(K)],
    }


def activation_bytes(
    batch: int, seq: int, hidden: int, bytes_per_element: float = 4, label_bytes: int = 0, framing_bytes: int = 0
) -> int:
    """S_act = batch x seq x hidden x bytes_per_element + labels + framing."""
    return int(round(batch * seq * hidden * bytes_per_element)) + label_bytes + framing_bytes
