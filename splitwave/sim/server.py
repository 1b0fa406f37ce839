"""The real server, in process: `SplitServer` behind its own gRPC servicer, called without a network.

Every message the engine's clients send goes through `SplitWaveServicer` exactly as it would over gRPC
(frame decoding, session and step checks, `checked_float32`, the trainer, the round manager and its
strategy, the evaluation), and every message is counted into the server's `ByteMeter` with its serialized
size under the same (client, direction, method) keys the transport uses. Only two things differ from a
deployed server, both about time: the round deadline is the engine's (it calls `RoundManager.close_now`
on the virtual clock; the wall-clock deadline is pushed out of reach), and with `training.server_batch`
> 1 the engine, not a wall-clock wait, decides which steps are fused (`GroupBatcher`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from splitwave.common.config import ExperimentConfig
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.metering import DOWN, UP, ByteMeter
from splitwave.server.app import SplitServer
from splitwave.server.errors import ServiceError
from splitwave.server.service import SplitWaveServicer

log = logging.getLogger(__name__)

NO_WALL_DEADLINE_S = 1e12  # the RoundManager's own (wall-clock) deadline: never reached; the engine closes rounds
JOINING = "(joining)"  # the meter's key for a Join, as on the transport


class Refused(Exception):
    """The server answered a call with an error status (what a real edge receives as an RpcError)."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class _Context:
    """What the servicer asks of a gRPC call context, for a call made in process."""

    def __init__(self):
        self._code = None

    def abort(self, code, details: str):
        self._code = code
        raise Refused(getattr(code, "name", str(code)), details)

    def code(self):
        return self._code

    def peer(self) -> str:
        return "sim"

    def auth_context(self) -> dict:
        return {}

    def is_active(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


class GroupBatcher:
    """Stands in for the trainer's `StepBatcher` when the engine fuses steps: the engine names the group
    (`expect`), runs the members' Train calls on threads, and the group is computed as one server step once
    every member has submitted (or failed its checks before submitting: `gone`). Members are fused in the
    order the engine gave, never in the order the threads arrive."""

    def __init__(self, run: Callable[[list], Sequence]):
        self._run = run
        self._cv = threading.Condition()
        self._order: list[str] = []
        self._items: dict[str, Any] = {}
        self._gone: set[str] = set()
        self._results: dict[str, Any] = {}

    def expect(self, order: list[str]) -> None:
        with self._cv:
            self._order, self._items, self._gone, self._results = list(order), {}, set(), {}

    def submit(self, client_id: str, item: Any) -> Any:
        with self._cv:
            self._items[client_id] = item
            self._maybe_run()
            while client_id not in self._results:
                self._cv.wait()
            r = self._results.pop(client_id)
        if isinstance(r, BaseException):
            raise r
        return r

    def gone(self, client_id: str) -> None:
        with self._cv:
            if client_id not in self._items and client_id not in self._results:
                self._gone.add(client_id)
                self._maybe_run()

    def _maybe_run(self) -> None:
        if not self._items or len(self._items) + len(self._gone) < len(self._order):
            return
        ids = [c for c in self._order if c in self._items]
        try:
            results = list(self._run([self._items[c] for c in ids]))
        except ServiceError as e:
            results = [e] * len(ids)
        except Exception as e:  # noqa: BLE001 - every member gets it, as from the StepBatcher
            results = [ServiceError("INTERNAL", f"fused server step failed: {type(e).__name__}: {e}")] * len(ids)
        self._results.update(zip(ids, results))
        self._items = {}
        self._cv.notify_all()


def _count(meter: ByteMeter, key: str, direction: str, method: str, msgs) -> int:
    n = 0
    for m in msgs:
        b = m.ByteSize()
        meter.add(key, direction, method, b)
        n += b
    return n


class InProcessServer:
    """A `SplitServer` and its servicer for the engine. Each call returns the reply messages and the bytes
    that crossed in each direction; an error status raises `Refused`."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, cache_dir: Path):
        scfg = cfg.model_copy(deep=True)
        scfg.rounds.deadline_s = NO_WALL_DEADLINE_S
        self.app = SplitServer(scfg, run_dir, cache_dir)
        self.meter = ByteMeter()
        self.app.meter = self.meter
        self.servicer = SplitWaveServicer(self.app)
        self.batcher: GroupBatcher | None = None
        self._threads: ThreadPoolExecutor | None = None
        if self.app.trainer.batcher is not None:
            self.batcher = GroupBatcher(self.app.trainer.train_fused)
            self.app.trainer.batcher = self.batcher
            self._threads = ThreadPoolExecutor(cfg.training.server_batch, thread_name_prefix="sim-train")

    def _key(self, request) -> str:
        """As the transport's meter key: the session's client id, a Join under "(joining)"."""
        header = getattr(request, "header", None)
        if header is not None and header.session_token in self.app.sessions:
            return self.app.sessions[header.session_token].client_id
        return JOINING

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        _count(self.meter, JOINING, UP, "Join", [request])
        reply = self.servicer.Join(request, _Context())
        _count(self.meter, JOINING, DOWN, "Join", [reply])
        return reply

    def await_round(self, request: pb.RoundRequest) -> tuple[list, int, int]:
        """(replies, bytes up, bytes down) of an AwaitRound the round manager can answer now."""
        key = self._key(request)
        up = _count(self.meter, key, UP, "AwaitRound", [request])
        replies = list(self.servicer.AwaitRound(request, _Context()))
        return replies, up, _count(self.meter, key, DOWN, "AwaitRound", replies)

    def train(self, msgs: list) -> tuple[list, int]:
        """One step's Train call: (replies, bytes down)."""
        key = self._key(msgs[0])
        _count(self.meter, key, UP, "Train", msgs)
        replies = list(self.servicer.Train(iter(msgs), _Context()))
        return replies, _count(self.meter, key, DOWN, "Train", replies)

    def train_group(self, steps: list[list]) -> list[tuple[list, int] | Refused]:
        """The Train calls of steps the engine fuses into one server step (each: replies and bytes down, or
        Refused), in the given order."""
        if self.batcher is None or len(steps) == 1:
            out: list = []
            for msgs in steps:
                if self.batcher is not None:  # a group of one: computed as soon as it is submitted
                    self.batcher.expect([self._key(msgs[0])])
                try:
                    out.append(self.train(msgs))
                except Refused as e:
                    out.append(e)
            return out
        names = [self._key(m[0]) for m in steps]
        self.batcher.expect(names)

        def call(name: str, msgs: list):
            try:
                return self.train(msgs)
            except Refused as e:
                return e
            finally:
                self.batcher.gone(name)

        futures = [self._threads.submit(call, n, m) for n, m in zip(names, steps)]
        return [f.result() for f in futures]

    def push(self, msgs: list) -> tuple[pb.AdapterReply, int]:
        """A PushAdapter call: (reply, bytes down). May close the round (aggregation and evaluation run in it)."""
        key = self._key(msgs[0])
        _count(self.meter, key, UP, "PushAdapter", msgs)
        reply = self.servicer.PushAdapter(iter(msgs), _Context())
        return reply, _count(self.meter, key, DOWN, "PushAdapter", [reply])

    def close_round(self) -> bool:
        """The open round's deadline passed on the virtual clock."""
        return self.app.rounds.close_now()

    def shutdown(self) -> None:
        self.app.rounds.stop("done")
        self.servicer.guard.stop()
        if self._threads is not None:
            self._threads.shutdown(wait=False)
