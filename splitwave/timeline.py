"""Virtual time of a finished realtime run: replay the edges' measured step records through the link models.

What it is for now: a realtime run (real processes behind shaping proxies) is compared with its own replay
(the agreement figure of its summary), and `splitwave plan` feeds it a profiled step. `channel.mode: virtual`
no longer replays anything: it runs on the simulation engine (splitwave.sim).

Nothing sleeps. Each client's simulated clock is advanced by the compute it measured (edge forward,
backward and the edge's own overhead between steps) and by `link.done(n, t)` for the exact serialized
size of every message; the server is one shared FIFO resource (`ServerQueue`) serving each step for the
`server_s` it measured. The protocol's small messages are modelled too (push reply, the next AwaitRound
request), so the critical path is the one the real system has.

Round r (the server's view, the one the real run measures as the time between two round closes):
  client k starts when the previous round's adapter broadcast reaches it (round 0: at t=0), runs its
  steps, uploads its adapter; the round closes `t_close` after the last adapter arrives (aggregation and
  the global evaluation, measured on the server), then each client gets the new adapter.
The latency breakdown of a round is that of its critical client (the last adapter to arrive) plus the
server's close time, split into `evaluation` (the global evaluation's measured `eval_s`) and `aggregation`
(the rest), so the parts add up to the round duration exactly.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from splitwave.channel import LinkPair, ServerQueue

PARTS = ("edge_compute", "uplink", "server_wait", "server_compute", "downlink", "aggregation", "evaluation")


@dataclass
class StepTimes:
    """One measured training step (seconds, bytes). `edge_other_s`: the edge's time before this step's
    forward that is not forward/backward (batching, encoding)."""

    edge_fwd_s: float
    edge_bwd_s: float
    server_s: float
    bytes_up: int
    bytes_down: int
    edge_other_s: float = 0.0


@dataclass
class ClientRound:
    """What one client did in one round, as measured."""

    steps: list[StepTimes]
    push_bytes: int  # adapter upload (PushAdapter request bytes)
    pre_push_s: float = 0.0  # edge time between the last step and the push
    push_reply_bytes: int = 0
    await_request_bytes: int = 0
    broadcast_bytes: int = 0  # the adapter (AwaitRound reply) that starts this round; ignored in round 0


@dataclass
class RoundTiming:
    round: int
    start: float  # previous close (0 for round 0)
    close: float  # last adapter arrival + t_close
    duration: float
    critical_client: int
    breakdown: dict[str, float]
    per_client: list[dict[str, float]] = field(default_factory=list)


def _zero() -> dict[str, float]:
    return {p: 0.0 for p in PARTS}


def simulate_timeline(
    links: Sequence[LinkPair],
    rounds: Sequence[dict[int, ClientRound]],
    t_close: Sequence[float],
    t_eval: Sequence[float] | None = None,
) -> list[RoundTiming]:
    """Virtual timeline of a run. `rounds[r]` maps client index -> its measured work in round r (clients
    absent from a round did not take part); `t_close[r]` is the server's measured close time of round r,
    `t_eval[r]` the part of it spent on the global evaluation (default 0)."""
    server = ServerQueue()
    out: list[RoundTiming] = []
    prev_close = 0.0
    # per client: when its AwaitRound request reached the server (it may get the broadcast only after that)
    ready_at = {k: 0.0 for k in range(len(links))}
    for r, work in enumerate(rounds):
        parts = {k: _zero() for k in work}
        clock: dict[int, float] = {}
        # 1) the broadcast of the previous round's adapter starts this round
        for k, cr in work.items():
            if r == 0:
                clock[k] = 0.0
                continue
            send = max(prev_close, ready_at[k])
            parts[k]["downlink"] += send - prev_close  # waiting for its own AwaitRound request (protocol)
            clock[k] = links[k].downlink.done(cr.broadcast_bytes, send)
            parts[k]["downlink"] += clock[k] - send
        # 2) local steps, the server shared FIFO in simulated arrival order
        ev: list[tuple[float, int, int]] = []
        seq = 0

        def start_step(k: int, j: int) -> None:
            nonlocal seq
            st = work[k].steps[j]
            t = clock[k] + st.edge_other_s + st.edge_fwd_s
            parts[k]["edge_compute"] += st.edge_other_s + st.edge_fwd_s
            arr = links[k].uplink.done(st.bytes_up, t)
            parts[k]["uplink"] += arr - t
            clock[k] = arr
            heapq.heappush(ev, (arr, seq, k, j))
            seq += 1

        push_arrival: dict[int, float] = {}

        def push(k: int) -> None:
            cr = work[k]
            t = clock[k] + cr.pre_push_s
            parts[k]["edge_compute"] += cr.pre_push_s
            arr = links[k].uplink.done(cr.push_bytes, t)
            parts[k]["uplink"] += arr - t
            clock[k] = push_arrival[k] = arr

        for k, cr in work.items():
            if cr.steps:
                start_step(k, 0)
            else:
                push(k)
        while ev:
            t, _, k, j = heapq.heappop(ev)
            st = work[k].steps[j]
            s, f = server.serve_detail(t, st.server_s)
            parts[k]["server_wait"] += s - t
            parts[k]["server_compute"] += st.server_s
            arr = links[k].downlink.done(st.bytes_down, f)
            parts[k]["downlink"] += arr - f
            clock[k] = arr + st.edge_bwd_s
            parts[k]["edge_compute"] += st.edge_bwd_s
            if j + 1 < len(work[k].steps):
                start_step(k, j + 1)
            else:
                push(k)
        # 3) close: the last adapter in, then aggregation + evaluation on the server
        last = max(push_arrival, key=lambda k: (push_arrival[k], k)) if push_arrival else -1
        t_last = push_arrival[last] if push_arrival else prev_close
        close = t_last + float(t_close[r])
        # 4) push replies (the last pusher's only after the close) and the next AwaitRound requests
        for k, cr in work.items():
            sent = close if k == last else push_arrival[k]
            got = links[k].downlink.done(cr.push_reply_bytes, sent)
            ready_at[k] = links[k].uplink.done(cr.await_request_bytes, got)
        bd = dict(parts[last]) if last >= 0 else _zero()
        bd["evaluation"] = min(float(t_close[r]), float(t_eval[r]) if t_eval is not None else 0.0)
        bd["aggregation"] = float(t_close[r]) - bd["evaluation"]
        out.append(
            RoundTiming(
                r,
                prev_close,
                close,
                close - prev_close,
                last,
                bd,
                [{"client": k, **parts[k], "push_arrival": push_arrival[k]} for k in sorted(work)],
            )
        )
        prev_close = close
    return out


# ----------------------------------------------------------------------------- from a run's records
CONTROL_REPLY_BYTES = 32  # PushAdapter reply: a few dozen bytes; its latency matters, not its size
CONTROL_REQUEST_BYTES = 64  # AwaitRound request


def _bytes_diff(lines: list[dict], r: int, key: str) -> int:
    now = lines[r].get("bytes", {}).get(key, 0)
    before = lines[r - 1].get("bytes", {}).get(key, 0) if r > 0 else 0
    return max(0, int(now) - int(before))


def estimate_close_times(lines: list[dict], edge_records: dict[str, list[dict]]) -> list[float]:
    """Server time from the last adapter's arrival to the round's end (aggregation + global evaluation).

    The server's line r is written at wall time L(r) when its close work ends; the round opened right after
    L(r-1) and the last adapter arrived `round_wall_s` later, so t_close(r) = L(r) - L(r-1) - round_wall_s(r).
    Round 0 has no L(-1): it takes the median of later rounds, or (a single round) the last pusher's push
    duration, which on an unshaped link is the close work itself; never less than the close work the server
    measured in it (`aggregate_s` + `eval_s`).
    """
    tc: list[float | None] = [None] * len(lines)
    for r in range(1, len(lines)):
        tc[r] = max(0.0, lines[r]["time"] - lines[r - 1]["time"] - lines[r]["round_wall_s"])
    later = sorted(x for x in tc[1:] if x is not None)
    if later:
        tc[0] = later[len(later) // 2]
    elif lines:
        pushes = [
            rec for recs in edge_records.values() for rec in recs if rec.get("kind") == "push" and rec["round"] == 0
        ]
        tc[0] = max((p["push_s"] for p in pushes), default=0.0)
    if lines:
        measured = float(lines[0].get("aggregate_s") or 0.0) + float(lines[0].get("eval_s") or 0.0)
        tc[0] = max(float(tc[0] or 0.0), measured)
    return [float(x or 0.0) for x in tc]


def eval_times(lines: list[dict]) -> list[float]:
    """The server's measured global-evaluation time per round (`eval_s`; 0 for rounds without one)."""
    return [max(0.0, float(line.get("eval_s") or 0.0)) for line in lines]


def rounds_from_records(
    clients: list[str], edge_records: dict[str, list[dict]], lines: list[dict]
) -> list[dict[int, ClientRound]]:
    """Per round, per client index: the measured work (ClientRound) from edge JSON lines and server lines."""
    out: list[dict[int, ClientRound]] = []
    for r in range(len(lines)):
        work: dict[int, ClientRound] = {}
        for k, name in enumerate(clients):
            recs = [x for x in edge_records.get(name, []) if x.get("round") == r]
            steps = sorted((x for x in recs if x["kind"] == "step"), key=lambda x: x["step"])
            push = next((x for x in recs if x["kind"] == "push"), None)
            rnd = next((x for x in recs if x["kind"] == "round"), None)
            if push is None or rnd is None:
                continue  # not selected, or late: not part of this round
            t = rnd["time"] - rnd["wall_s"]  # the edge's round start
            st_list = []
            for s in steps:
                busy = s["edge_fwd_s"] + s["roundtrip_s"] + s["edge_bwd_s"]
                st_list.append(
                    StepTimes(
                        s["edge_fwd_s"],
                        s["edge_bwd_s"],
                        s["server_s"],
                        int(s["bytes_up"]),
                        int(s["bytes_down"]),
                        max(0.0, s["time"] - t - busy),
                    )
                )
                t = s["time"]
            work[k] = ClientRound(
                st_list,
                int(push["bytes_up"]),
                max(0.0, push["time"] - push["push_s"] - t),
                CONTROL_REPLY_BYTES,
                CONTROL_REQUEST_BYTES,
                _bytes_diff(lines, r, f"{name}|down|AwaitRound") if r > 0 else 0,
            )
        out.append(work)
    return out


def measured_round_times(clients: list[str], edge_records: dict[str, list[dict]], lines: list[dict]) -> list[float]:
    """Wall-clock round durations of the real run: L(r) - L(r-1) (round 0: from the first edge's start)."""
    starts = [
        rec["time"] - rec["wall_s"]
        for name in clients
        for rec in edge_records.get(name, [])
        if rec.get("kind") == "round" and rec["round"] == 0
    ]
    prev = min(starts) if starts else (lines[0]["time"] - lines[0]["round_wall_s"] if lines else 0.0)
    out = []
    for line in lines:
        out.append(line["time"] - prev)
        prev = line["time"]
    return out
