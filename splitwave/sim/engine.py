"""A discrete-event engine for split-federated rounds on a virtual clock.

Events sit in one heap ordered by (virtual time, actor, kind, sequence): `actor` is the client's index, or
N (after every client) for the server's own events, so at one instant every client event comes before the
server looks at its queue; `sequence` is the insertion order. Nothing reads a wall clock: every duration is
a cost-model figure scaled by the device's factor, or a link's answer for the exact serialized bytes of a
message. Which executor computed something, and when its result came back, never moves an event.

One client's round, as the real edge runs it (splitwave.edge.client):

    ASSIGN   the server answers the client's AwaitRound (the round is open and selects it; its request has
             arrived): the reply's exact bytes go down the client's downlink, the client applies it
    FORWARD  edge forward done (device-scaled cost): h is encoded, its Train messages go up the uplink
    ARRIVE   the step reaches the server: refused if the round is closed, else it queues
    GRAD     grad_h has come back down: edge backward + AdamW (device-scaled cost), then the next FORWARD,
             or after the last step PUSH_SEND. (The math of both went to the executor as soon as the server
             had computed grad_h: it depends on grad_h and the client's own state only, so the edge computes
             while the engine replays the server's next steps; only the clock waits for GRAD.)
    PUSH_SEND the adapter's PushAdapter messages go up
    PUSH     they reach the server; the push that completes the round closes it (aggregation and
             evaluation with the real strategy), whose reply leaves only after the close
             then the push reply comes down and the client's next AwaitRound goes up: it is idle again

The server (actor N):
    DISPATCH free workers (K = sim.server_workers) take the oldest waiting steps, FIFO; with
             training.server_batch B > 1 up to B steps of different clients are fused into one server
             step, a lone step waiting training.server_batch_wait_ms for company as the real batcher does.
             The math runs here, in dispatch order: the order of updates to sfl-v2's shared top adapter
             is the order of virtual arrivals.
    SERVED   a worker finished: each member's grad_h goes down its client's downlink
    DEADLINE the round's deadline (rounds.deadline_s after it opened): the round closes with what arrived;
             late clients learn it when they next reach the server (refused), as real edges do
    OPEN     the close's work is over: the next round's selected clients are answered

Codecs: under a channel-aware `training.codec_policy` each step's codecs are chosen when it leaves the edge
(FORWARD done, at t): h's from the uplink's `rate_at(t)` and latency, grad_h's from the downlink's, both with
the policy's `choose_codec` (what a perfectly informed edge could know at that moment; a real edge has only
its estimates); grad_h's goes to the server in the step's `StepEnd.codec_down`, as a real edge sends it. The
codecs each step travelled in are counted per round (`RoundTiming.codecs`).

The math is the real system's: the server is `InProcessServer` (SplitServer behind its servicer), the edge
math `EdgeRuntime` in an executor pool (splitwave.sim.executors).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from splitwave.channel import LinkPair
from splitwave.common.batching import Batcher
from splitwave.common.codec_policy import CodecPolicy, step_shapes
from splitwave.common.config import ExperimentConfig
from splitwave.common.shard import round_batch
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import adapter_codec_up, encode
from splitwave.protos.steps import Step, build_step
from splitwave.server.evaluation import batch_rows
from splitwave.sim.clients import (
    ClientState,
    apply_assignment,
    await_request,
    frame_codec,
    join_request,
    push_messages,
    rank_adapter,
    read_assignment,
    step_reply,
)
from splitwave.sim.executors import initial_factors
from splitwave.sim.server import InProcessServer, Refused

log = logging.getLogger(__name__)

# where a round's time went, for the critical client (the last adapter in): the same parts as before, plus
# `offline` (device unavailable) and `deadline` (a round closed by its deadline)
PARTS = (
    "edge_compute",
    "uplink",
    "server_wait",
    "server_compute",
    "downlink",
    "offline",
    "aggregation",
    "evaluation",
    "deadline",
)

# event kinds; at one instant a client has at most one event pending, the server's are ordered by kind
ASSIGN, FORWARD, ARRIVE, GRAD, PUSH_SEND, PUSH = range(6)
SERVED, DEADLINE, OPEN, DISPATCH = range(4)


class EventQueue:
    """Events ordered by (time, actor, kind, insertion sequence). The sequence makes every key unique, so
    the order never depends on the payload, and events pushed in any order pop in one order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0
        self.now = 0.0

    def push(self, t: float, actor: int, kind: int, data: Any = None) -> None:
        if not t >= self.now:  # also refuses NaN
            raise ValueError(f"event at {t!r} is before the current time {self.now!r}")
        heapq.heappush(self._heap, (float(t), actor, kind, self._seq, data))
        self._seq += 1

    def pop(self) -> tuple[float, int, int, int, Any]:
        ev = heapq.heappop(self._heap)
        self.now = ev[0]
        return ev

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def pushed(self) -> int:
        """Events ever pushed."""
        return self._seq


class CostModel(Protocol):
    """Host-seconds of each piece of work at device factor 1 (splitwave.sim.costs)."""

    def edge_forward_s(self, batch: int, seq: int) -> float: ...
    def edge_backward_s(self, batch: int, seq: int) -> float: ...
    def edge_optimizer_s(self) -> float: ...
    def server_step_s(self, batch: int, seq: int, fused: int = 1, tokens: int | None = None) -> float: ...
    def server_eval_s(self, batch: int, seq: int) -> float: ...
    def aggregate_s(self, num_clients: int) -> float: ...


class Device(Protocol):
    """A client's device (splitwave.sim.devices): compute speed and availability."""

    name: str
    edge_factor: float

    def online(self, t: float) -> bool: ...
    def next_online(self, t: float) -> float: ...
    def drops_out(self, round_idx: int) -> bool: ...


@dataclass
class Flight:
    """A client's work in one round, from its assignment to its push (or refusal)."""

    round: int
    worker: int
    batcher: Batcher | None
    upload: list[str]
    step: int = 0
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    handles: list = field(default_factory=list)  # executor work whose result is not needed yet
    fwd: tuple | None = None  # (handle, mask, labels) of the next step's forward, submitted ahead of its event
    reply: Any = None  # the StepResult of the step whose grad_h is on its way down
    release: Any = None  # the handle of the round's last call: the client's state back from its worker
    batch: tuple | None = None  # (mask, labels, fwd seconds) of the step in progress
    sent: Step | None = None  # its frames as sent (padded or packed): how its grad_h is read back
    losses: list[float] = field(default_factory=list)
    correct: int = 0
    count: int = 0
    push_arrival: float | None = None


@dataclass
class _Waiting:
    """A step in the server's queue."""

    client: int
    arrived: float
    msgs: list
    rows: int
    seq: int


@dataclass
class RoundTiming:
    """A closed round on the virtual clock, with the server's record of it."""

    round: int
    start: float
    close: float
    critical: str | None
    breakdown: dict[str, float]
    per_client: dict[str, dict[str, float]]
    record: Any  # server.rounds.RoundRecord
    metrics: dict  # RoundManager.last_metrics: aggregation, evaluation
    bytes: dict[str, int]  # the meter at the close, "client|direction|method" -> bytes
    close_s: float
    eval_s: float
    # steps per codec in the round, per direction: {"up": {"fp16": 24}, "down": {"raw": 24}} (sent before the close)
    codecs: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.close - self.start


class Engine:
    """Runs `cfg`'s rounds for `len(links)` virtual clients; `run()` returns the RoundTimings."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        server: InProcessServer,
        pool,
        costs: CostModel,
        devices: Sequence[Device],
        links: Sequence[LinkPair],
        server_factor: float = 1.0,
        server_workers: int = 1,
        on_round: Callable[[RoundTiming], None] | None = None,
        on_event: Callable[[float], None] | None = None,
    ):
        if len(devices) != cfg.num_clients or len(links) != cfg.num_clients:
            raise ValueError(f"{len(devices)} devices and {len(links)} links for {cfg.num_clients} clients")
        self.cfg, self.server, self.app, self.pool = cfg, server, server.app, pool
        self.costs, self.devices, self.links = costs, list(devices), list(links)
        self.server_factor = float(server_factor)
        self.n = cfg.num_clients
        self.on_round, self.on_event = on_round, on_event
        self.q = EventQueue()
        app = self.app
        self.manifest = app.manifest
        self.shapes = self.manifest.factor_shapes()
        self.initial = initial_factors(app.bundle_dir)
        self.data = app.train_data  # what each edge builds from its Join's spec, the same call
        self.clients: list[ClientState] = []
        self.by_name: dict[str, int] = {}
        for k in range(self.n):
            j = server.join(join_request(f"client-{k}"))
            c = ClientState(k, j.client_id, j.session_token, j.config.shard.shard_index, j.config.shard.num_samples)
            self.clients.append(c)
            self.by_name[c.name] = k
        self.run_id = j.run_id
        self.codec_up = j.config.codec_up
        self.packed = j.config.packed_steps
        self.codec_adapter_up = adapter_codec_up(j.config)
        self.feedback = frozenset(j.config.error_feedback)  # the edge's directions: "up", "adapter_up"
        self.policy = CodecPolicy.from_proto(j.config.codec_policy)  # as the edge reads it from its Join
        self.codec_counts: dict[int, dict[str, Counter]] = {}  # round -> direction -> codec -> steps
        self.seed, self.batch_size, self.local_steps = j.config.seed, j.config.batch_size, j.config.local_steps
        self.flights: dict[int, Flight] = {}
        self.ready_at = [0.0] * self.n  # when each idle client's AwaitRound request reached the server
        self.idle = [True] * self.n
        self.waiting: list[_Waiting] = []
        self.busy_until = [0.0] * max(1, int(server_workers))
        self.batch = cfg.training.server_batch
        self.batch_wait_s = cfg.training.server_batch_wait_ms / 1e3 if self.batch > 1 else 0.0
        self._dispatch_at: float | None = None
        self._arrivals = 0
        self.client_steps = 0
        self.server_steps: dict[int, int] = {}  # fused size -> server steps of that size
        self.deltas: dict[int, dict] = {0: {}}  # base-weight version -> deltas (from the AwaitRound that brought it)
        self._sent_versions = [{0} for _ in range(pool.size)]
        self._next_worker = 0
        self.open_round_idx = -1
        self.open_at: dict[int, float] = {}
        self.timings: list[RoundTiming] = []
        self.eval_s = self._eval_cost()
        for k, c in enumerate(self.clients):  # round 0: every edge asks for work right after joining
            self.ready_at[k] = self.links[k].uplink.done(await_request(c, self.run_id).ByteSize(), 0.0)

    # ------------------------------------------------------------------------------------------- the loop
    def run(self) -> list[RoundTiming]:
        self.q.push(0.0, self.n, OPEN)
        handlers = {
            (False, ASSIGN): self._assign,
            (False, FORWARD): self._forward_done,
            (False, ARRIVE): self._arrive,
            (False, GRAD): self._grad,
            (False, PUSH_SEND): self._push_send,
            (False, PUSH): self._push,
            (True, SERVED): self._served,
            (True, DEADLINE): self._deadline,
            (True, OPEN): self._open,
            (True, DISPATCH): self._dispatch,
        }
        while len(self.q) and not self.app.rounds.stopped:
            t, actor, kind, _, data = self.q.pop()
            handlers[(actor == self.n, kind)](t, actor, data)
            if self.on_event is not None:
                self.on_event(t)
        return self.timings

    # ------------------------------------------------------------------------------------------- helpers
    def _online(self, k: int, t: float) -> float:
        """When client k's device can compute from t on (math.inf: never again); waiting counts as offline."""
        d = self.devices[k]
        if d.online(t):
            return t
        t2 = float(d.next_online(t))
        if math.isfinite(t2):
            self.flights[k].parts["offline"] += t2 - t
        return t2

    def _results(self, f: Flight) -> None:
        """Wait for the client's earlier executor work (its errors surface here)."""
        for h in f.handles:
            self.pool.result(h)
        f.handles.clear()

    def _eval_cost(self) -> float:
        """Virtual seconds of one global evaluation: the server's eval batches (evaluate_global) at their shapes."""
        ev = self.app.eval_data
        rows = batch_rows(self.app.split, ev.input_ids.shape[1], 64)
        total = 0.0
        for i in range(0, len(ev), rows):
            ids, _, _ = ev.batch(np.arange(i, min(len(ev), i + rows)))
            total += self.costs.server_eval_s(int(ids.shape[0]), int(ids.shape[1]))
        return total * self.server_factor

    def _is_open_for(self, k: int, r: int) -> bool:
        rounds = self.app.rounds
        name = self.clients[k].name
        return rounds.is_open and rounds.round_idx == r and name in rounds.selected and name not in rounds.reports

    def idle_client_bytes(self) -> list[int]:
        """Array bytes each idle client holds (its edge state); in-flight ones are on an executor."""
        return [c.edge.nbytes() for k, c in enumerate(self.clients) if self.idle[k]]

    # ------------------------------------------------------------------------------------------- rounds
    def _open(self, t: float, _actor: int, _data) -> None:
        r = self.app.rounds.round_idx
        self.open_round_idx, self.open_at[r] = r, t
        for name in self.app.rounds.selected:
            k = self.by_name[name]
            if self.idle[k]:
                self.q.push(max(t, self.ready_at[k]), k, ASSIGN, r)
        self.q.push(t + self.cfg.rounds.deadline_s, self.n, DEADLINE, r)

    def _deadline(self, t: float, _actor: int, r: int) -> None:
        if self.open_round_idx == r and self.app.rounds.round_idx == r and self.server.close_round():
            self._closed(t, None)

    def _closed(self, t: float, critical: int | None) -> float:
        """Round `open_round_idx` has just closed at t (its aggregation and evaluation done, in the server);
        returns when that work ends on the virtual clock, which is when the next round opens."""
        rounds = self.app.rounds
        rec, metrics = rounds.history[-1], dict(rounds.last_metrics)
        r = rec.round_idx
        agg = self.costs.aggregate_s(len(rec.reported)) * self.server_factor
        ev = self.eval_s if "eval_accuracy" in metrics else 0.0
        end = t + agg + ev
        start = self.open_at[r]
        if critical is not None:
            f = self.flights[critical]
            bd = {**f.parts, "aggregation": agg, "evaluation": ev}
            crit = self.clients[critical].name
        else:
            bd = {**dict.fromkeys(PARTS, 0.0), "deadline": t - start, "aggregation": agg, "evaluation": ev}
            crit = None
        per_client = {}
        for name in rec.reported:
            f = self.flights.get(self.by_name[name])
            if f is not None and f.round == r:
                per_client[name] = {**f.parts, "push_arrival": f.push_arrival}
        snap = {f"{c}|{d}|{m}": n for (c, d, m), n in self.server.meter.snapshot().items()}
        counts = self.codec_counts.pop(r, {})
        codecs = {d: dict(sorted(counts[d].items())) for d in ("up", "down") if d in counts}
        timing = RoundTiming(r, start, end, crit, bd, per_client, rec, metrics, snap, agg + ev, ev, codecs)
        self.timings.append(timing)
        if self.on_round is not None:
            self.on_round(timing)
        if not rounds.stopped:
            self.q.push(end, self.n, OPEN)
        return end

    # ------------------------------------------------------------------------------------------- a client
    def _assign(self, t: float, k: int, r: int) -> None:
        if not self.idle[k] or self.open_round_idx != r or not self._is_open_for(k, r):
            return  # stays idle; a later round that selects it answers it
        if self.devices[k].drops_out(r):
            return  # gone for this round (it never asks): late at the deadline, back for a later round
        c, app = self.clients[k], self.app
        replies, _, nbytes = self.server.await_round(await_request(c, self.run_id))
        a = read_assignment(replies)
        if a.directives.stop:
            return
        if a.deltas:
            self.deltas[app.base_version] = a.deltas
        c.edge.base_version = app.base_version
        ranks = rank_adapter(self.manifest, c.edge.ranks)
        apply_assignment(c.edge, a, self.initial, self.shapes, ranks, self.seed, c.shard_index)
        c.last_round = a.directives.next_round
        self.idle[k] = False
        self.links[k].set_round(r)
        arrival = self.links[k].downlink.done(nbytes, t)
        w = self._next_worker % self.pool.size
        self._next_worker += 1
        f = Flight(
            r,
            w,
            Batcher(app.shards[c.shard_index], self.batch_size, self.seed, client_id=c.shard_index),
            list(a.directives.upload_factors) or list(self.shapes),
        )
        f.parts["downlink"] += arrival - self.open_at[r]  # waiting for its own request, then the broadcast
        self.flights[k] = f
        v = c.edge.base_version
        new = self.deltas[v] if v not in self._sent_versions[w] else None
        self._sent_versions[w].add(v)
        f.handles.append(self.pool.submit(w, "begin", k, c.edge, new))
        self._start_step(k, arrival)

    def _submit_forward(self, k: int, step: int) -> None:
        """Hand step `step`'s forward to the client's executor now: its inputs are a pure function of (seed,
        shard, round, step), so it can run while the virtual clock is still before the event that needs it."""
        f = self.flights[k]
        ids, mask, labels = round_batch(self.data, f.batcher, self.local_steps, f.round, step)
        f.fwd = (self.pool.submit(f.worker, "forward", k, ids, mask), mask, labels)

    def _start_step(self, k: int, t: float) -> None:
        f = self.flights[k]
        t = self._online(k, t)
        if not math.isfinite(t):
            return  # the device never comes back: the client is late for good
        if f.fwd is None:  # the round's first step (later ones were handed over with the step before's backward)
            self._submit_forward(k, f.step)
        _, mask, labels = f.fwd
        dur = self.costs.edge_forward_s(*mask.shape) * self.devices[k].edge_factor
        f.batch = (mask, labels, dur)
        f.parts["edge_compute"] += dur
        self.q.push(t + dur, k, FORWARD)

    def _forward_done(self, t: float, k: int, _data) -> None:
        f, c = self.flights[k], self.clients[k]
        h = self.pool.result(f.fwd[0])
        f.fwd = None
        self._results(f)
        mask, labels, fwd_s = f.batch
        enc = c.feedback.encode if "up" in self.feedback else encode
        up, down = self._step_codecs(k, t, h, mask, labels)
        f.sent = build_step(h, mask, labels, up, packed=self.packed, encode=enc)
        header = c.header(self.run_id, f.round, f.step)
        msgs = f.sent.messages(pb.TrainRequest, header, {"edge_fwd_s": fwd_s}, codec_down=down)
        self._count(f.round, "up", frame_codec(msgs, "h") or (up if isinstance(up, str) else up.codec or "raw"))
        arrival = self.links[k].uplink.done(sum(m.ByteSize() for m in msgs), t)
        f.parts["uplink"] += arrival - t
        self.q.push(arrival, k, ARRIVE, (msgs, int(h.shape[0])))

    def _step_codecs(self, k: int, t: float, h, mask, labels) -> tuple[pb.CodecSpec | str, str]:
        """(h's codec, the grad_h codec the step asks for, "" = the run's) of a step leaving client k at t: the
        run's fixed codecs, or the policy's choice from each link's rate at t (rate_at is bit/s)."""
        if self.policy.kind == "fixed":
            return self.codec_up, ""
        up_link, down_link = self.links[k].uplink, self.links[k].downlink
        shape, extra = step_shapes(h, mask, labels, self.packed)  # as the step travels (packed or padded)
        up = self.policy.choose("up", h.dtype.name, shape, up_link.rate_at(t) / 8, up_link.latency_s, extra)
        down = self.policy.choose("down", "float32", shape, down_link.rate_at(t) / 8, down_link.latency_s)
        return up or self.codec_up, down or ""

    def _count(self, r: int, direction: str, codec: str) -> None:
        self.codec_counts.setdefault(r, {}).setdefault(direction, Counter())[codec] += 1

    def _arrive(self, t: float, k: int, data) -> None:
        msgs, rows = data
        f = self.flights[k]
        if not self._is_open_for(k, f.round):  # the round closed under it: the server refuses at once
            self._refused(t, k, self.server.train_group([msgs])[0])
            return
        self.client_steps += 1
        self.waiting.append(_Waiting(k, t, msgs, rows, self._arrivals))
        self._arrivals += 1
        self._dispatch_soon(t)

    def _refused(self, t: float, k: int, err) -> None:
        """A call of k was answered with an error status at t: its round is over for it (EdgeClient.train_round
        returns 'closed'); it takes its state back and asks for its next round."""
        if not isinstance(err, Refused) or err.code != "FAILED_PRECONDITION":
            raise RuntimeError(f"{self.clients[k].name}: unexpected answer from the server: {err}")
        f = self.flights[k]
        self._results(f)
        self.clients[k].edge = self.pool.result(self.pool.submit(f.worker, "release", k))
        self._next_request(k, self.links[k].downlink.done(0, t))

    def _grad(self, t: float, k: int, _data) -> None:
        f = self.flights[k]
        t = self._online(k, t)
        if not math.isfinite(t):
            return
        mask, _, _ = f.batch
        b, s = mask.shape
        dur = (self.costs.edge_backward_s(b, s) + self.costs.edge_optimizer_s()) * self.devices[k].edge_factor
        f.parts["edge_compute"] += dur
        f.step += 1  # its backward (and the next step's forward) went to the executor with grad_h (_hand_over)
        if f.step < self.local_steps:
            self._start_step(k, t + dur)
        else:
            self.q.push(t + dur, k, PUSH_SEND)

    def _hand_over(self, k: int, grad_h: np.ndarray) -> None:
        """grad_h of client k's step exists (the server's math is done): its backward and AdamW step, and the
        next step's forward or the release of its state, go to its executor now. The math depends only on
        grad_h and the client's own state, not on when the virtual clock reaches GRAD, so the edge works while
        the engine replays the server steps in between (a device that never comes back computes for nothing)."""
        f = self.flights[k]
        f.handles.append(self.pool.submit(f.worker, "backward", k, grad_h))
        if f.step + 1 < self.local_steps:
            self._submit_forward(k, f.step + 1)
        else:
            f.release = self.pool.submit(f.worker, "release", k)

    def _push_send(self, t: float, k: int, _data) -> None:
        f, c = self.flights[k], self.clients[k]
        c.edge = self.pool.result(f.release)
        f.release = None
        self._results(f)
        stats = {
            "steps": f.step,
            "train_loss": float(np.mean(f.losses)) if f.losses else float("nan"),
            "train_accuracy": f.correct / max(f.count, 1),
        }
        ranks = rank_adapter(self.manifest, c.edge.ranks)
        hdr = c.header(self.run_id, f.round, f.step)
        enc = c.feedback.encode if "adapter_up" in self.feedback else encode
        msgs = push_messages(hdr, c.edge, f.upload, ranks, self.codec_adapter_up, c.num_samples, stats, enc)
        arrival = self.links[k].uplink.done(sum(m.ByteSize() for m in msgs), t)
        f.parts["uplink"] += arrival - t
        self.q.push(arrival, k, PUSH, msgs)

    def _push(self, t: float, k: int, msgs: list) -> None:
        f = self.flights[k]
        f.push_arrival = t
        r = self.app.rounds.round_idx
        try:
            _, nbytes = self.server.push(msgs)
        except Refused as e:  # the round closed before the adapter arrived
            if e.code != "FAILED_PRECONDITION":
                raise RuntimeError(f"{self.clients[k].name}: push refused: {e}") from None
            self._next_request(k, self.links[k].downlink.done(0, t))
            return
        sent = self._closed(t, k) if self.app.rounds.round_idx != r else t  # the closing push waits for the close
        self._next_request(k, self.links[k].downlink.done(nbytes, sent))

    def _next_request(self, k: int, t: float) -> None:
        """At t the client has its answer and sends its next AwaitRound; it is idle until a round takes it."""
        c, f = self.clients[k], self.flights[k]
        f.batcher = f.batch = None  # an idle client keeps its edge state only (the flight's parts stay for the record)
        self.ready_at[k] = self.links[k].uplink.done(await_request(c, self.run_id).ByteSize(), t)
        self.idle[k] = True
        r = self.open_round_idx
        if r >= 0 and self._is_open_for(k, r):
            self.q.push(max(self.open_at[r], self.ready_at[k]), k, ASSIGN, r)

    # ------------------------------------------------------------------------------------------- the server
    def _dispatch_soon(self, t: float) -> None:
        if self._dispatch_at is None or self._dispatch_at > t:
            self._dispatch_at = t
            self.q.push(t, self.n, DISPATCH)

    def _dispatch(self, t: float, _actor: int, _data) -> None:
        if self._dispatch_at is not None and self._dispatch_at <= t:
            self._dispatch_at = None
        while self.waiting:
            free = [i for i, b in enumerate(self.busy_until) if b <= t]
            if not free:
                return  # SERVED dispatches again
            group, seen = [], set()
            for w in self.waiting:  # the oldest steps, one per client
                if w.client not in seen:
                    group.append(w)
                    seen.add(w.client)
                    if len(group) == self.batch:
                        break
            due = self.waiting[0].arrived + self.batch_wait_s
            if len(group) < self.batch and t < due:  # a lone step waits for company, as the batcher does
                self._dispatch_soon(due)
                return
            for w in group:
                self.waiting.remove(w)
            self._serve(t, free[0], group)

    def _serve(self, t: float, worker: int, group: list[_Waiting]) -> None:
        results = self.server.train_group([w.msgs for w in group])
        done = [(w, res) for w, res in zip(group, results) if not isinstance(res, Refused)]
        for w, res in zip(group, results):
            if isinstance(res, Refused):
                self.flights[w.client].parts["server_wait"] += t - w.arrived
                self._refused(t, w.client, res)
        if not done:
            return
        self.server_steps[len(done)] = self.server_steps.get(len(done), 0) + 1
        rows = sum(w.rows for w, _ in done)
        seq = max(self.flights[w.client].sent.seq for w, _ in done)
        tokens = self._server_tokens([self.flights[w.client].batch[0] for w, _ in done], seq)
        dur = self.costs.server_step_s(rows, seq, tokens=tokens) * self.server_factor  # the fused step's total rows
        self.busy_until[worker] = t + dur
        for w, (replies, _) in done:
            f = self.flights[w.client]
            f.parts["server_wait"] += t - w.arrived
            f.parts["server_compute"] += dur
            grad_h, f.reply = step_reply(replies, f.sent)
            self._hand_over(w.client, grad_h)
        self.q.push(t + dur, self.n, SERVED, (worker, done))

    def _server_tokens(self, masks: list[np.ndarray], seq: int) -> int | None:
        """The valid tokens of a server step whose (padded, concatenated) mask the server computes only the
        valid tokens of (ServerPart.unpads), else None: what its cost depends on."""
        mask = np.concatenate([np.pad(m, ((0, 0), (0, seq - m.shape[1]))) for m in masks])
        return int(np.count_nonzero(mask)) if self.app.split.server.unpads(mask) else None

    def _served(self, t: float, _actor: int, data) -> None:
        worker, done = data
        for w, (replies, nbytes) in done:
            k = w.client
            f = self.flights[k]
            res, f.reply = f.reply, None
            self._count(f.round, "down", frame_codec(replies, "grad_h") or "raw")
            f.losses.append(res.loss)
            f.correct += res.correct
            f.count += res.count
            arrival = self.links[k].downlink.done(nbytes, t)
            f.parts["downlink"] += arrival - t
            self.q.push(arrival, k, GRAD)
        if self.waiting:
            self._dispatch_soon(t)


__all__ = ["PARTS", "Engine", "EventQueue", "RoundTiming"]
