"""Fusing the steps of clients that wait at the same time into one server step (sfl-v2 `server_batch`).

Every Train handler thread calls `StepBatcher.submit` and blocks until its own step is done. The first
waiting thread becomes the leader: it collects up to `max_steps` pending steps of *different* clients (in
arrival order), waiting at most `wait_s` after the oldest of them arrived for more to come, hands the group
to `run` (one call, on the compute thread) and delivers each participant its own result. Steps that arrive
while a group computes wait for the next group, so a busy server fuses more and an idle one adds at most
`wait_s` to a step. Only one group is collected or computed at a time: the server stays one shared resource
served in arrival order.

A group that fails fails for every participant alike (a `ServiceError` naming the cause); the batcher
itself keeps serving. Steps are validated before they get here, so one client's bad input never joins a
group; a step that passes validation and still makes the loss or gradients non-finite is refused on its
own: `run` returns a `ServiceError` in that participant's place and the others get their results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from splitwave.server.errors import ServiceError

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 30.0  # how often the INFO log line with the fused-size histogram is written


@dataclass(eq=False)
class _Pending:
    client_id: str
    item: Any
    arrived: float
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class StepBatcher:
    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_steps: int, wait_s: float):
        """`run(items) -> results` (same order) computes one fused step; it is called by one thread at a time."""
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self._run = run
        self.max_steps = max_steps
        self.wait_s = max(0.0, wait_s)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # the leader waits here for company
        self._finished = threading.Condition(self._lock)  # followers wait here for their group (or the lead)
        self._queue: deque[_Pending] = deque()
        self._leading = False
        self.submitted = 0  # steps ever submitted (done, being computed or queued)
        self.sizes: Counter[int] = Counter()  # fused size -> number of server steps of that size
        self._last_summary = time.monotonic()

    def submit(self, client_id: str, item: Any) -> Any:
        """Block until `item` was computed (alone or fused with other clients' items); return its result."""
        p = _Pending(client_id, item, time.monotonic())
        with self._lock:
            self._queue.append(p)
            self.submitted += 1
            self._arrived.notify()
        while True:
            with self._lock:
                while self._leading and not p.done:
                    self._finished.wait()
                if p.done:
                    if p.error is not None:
                        raise p.error
                    return p.result
                self._leading = True
                group = self._collect()
            self._execute(group)

    def stats(self) -> dict:
        """How many client steps went into how many server steps, and the histogram of fused sizes."""
        with self._lock:
            sizes = dict(sorted(self.sizes.items()))
        return {
            "client_steps": sum(k * v for k, v in sizes.items()),
            "server_steps": sum(sizes.values()),
            "sizes": sizes,
        }

    # -- leader --------------------------------------------------------------------------------------------
    def _pick(self) -> list[_Pending]:
        """The oldest pending steps, one per client, at most `max_steps`."""
        group, seen = [], set()
        for p in self._queue:
            if p.client_id not in seen:
                group.append(p)
                seen.add(p.client_id)
                if len(group) == self.max_steps:
                    break
        return group

    def _collect(self) -> list[_Pending]:
        """(lock held) Wait until the group is full or the oldest step has waited `wait_s`; dequeue it."""
        deadline = self._queue[0].arrived + self.wait_s
        group = self._pick()
        while len(group) < self.max_steps:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._arrived.wait(left)
            group = self._pick()
        for p in group:
            self._queue.remove(p)
        return group

    def _execute(self, group: list[_Pending]) -> None:
        t0 = time.perf_counter()
        results, error = None, None
        try:
            results = self._run([p.item for p in group])
            if len(results) != len(group):
                raise RuntimeError(f"fused step returned {len(results)} results for {len(group)} steps")
        except ServiceError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - becomes every participant's error; the batcher serves on
            log.exception("fused server step of %d client(s) %s failed", len(group), [p.client_id for p in group])
            error = ServiceError(
                "INTERNAL", f"server step (fused with {len(group)} client step(s)) failed: {type(e).__name__}: {e}"
            )
        finally:
            with self._lock:
                for i, p in enumerate(group):
                    if error is None and results is not None and isinstance(results[i], ServiceError):
                        p.error = results[i]  # this participant's step alone was refused
                    elif error is None and results is not None:
                        p.result = results[i]
                    else:  # also when `run` was interrupted by a BaseException: nobody waits forever
                        p.error = error or ServiceError("INTERNAL", "server step was interrupted")
                    p.done = True
                if error is None:
                    self.sizes[len(group)] += 1
                self._leading = False
                self._finished.notify_all()
                self._log(group, time.perf_counter() - t0)

    def _log(self, group: list[_Pending], seconds: float) -> None:
        """(lock held) One DEBUG line per server step; an INFO summary every SUMMARY_EVERY_S seconds."""
        log.debug(
            "server step fused %d client step(s) %s in %.1f ms", len(group), [p.client_id for p in group], seconds * 1e3
        )
        now = time.monotonic()
        if now - self._last_summary >= SUMMARY_EVERY_S:
            self._last_summary = now
            n_server = sum(self.sizes.values())
            n_client = sum(k * v for k, v in self.sizes.items())
            log.info(
                "server batching: %d client steps in %d server steps (%.2f per step; sizes %s)",
                n_client,
                n_server,
                n_client / max(n_server, 1),
                dict(sorted(self.sizes.items())),
            )
