"""Federated rounds: who trains when, deadlines, and turning pushed adapters into the next round's start.

Plain threading code, no gRPC: the service calls `wait_assignment`, `check_training`, `submit` and the
manager decides. A round opens with a seeded sample of the registered clients (fraction, minimum), closes
when every selected client has pushed or at its deadline (late clients are left out and may take part in a
later round), and then calls the strategy. `sl` (vanilla split learning) is the special case of one client
per round, round robin, whose adapter is handed on to the next client.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from splitwave.server.aggregation.base import AggregateResult, ClientDirective, ClientUpdate, Strategy
from splitwave.server.errors import ServiceError

log = logging.getLogger(__name__)

HISTORY_KEEP = 64  # closed rounds kept in memory (server_metrics.jsonl has them all)


def check_metrics(metrics: dict, max_entries: int, max_name_bytes: int) -> dict[str, float]:
    """A client-sent metrics map, refused when it is larger than the server keeps (it is logged every round)."""
    if len(metrics) > max_entries:
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"metrics map has {len(metrics)} entries; at most {max_entries} "
            f"are accepted (server.security.max_metrics_entries)",
        )
    long = [k for k in metrics if len(str(k).encode()) > max_name_bytes]
    if long:
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"metric name {str(long[0])[:32]!r}... is longer than "
            f"{max_name_bytes} bytes (server.security.max_metric_name_bytes)",
        )
    return {str(k): float(v) for k, v in metrics.items()}


@dataclass
class Assignment:
    """What a client is told when it asks for work."""

    round_idx: int
    directive: ClientDirective | None
    stop: bool = False
    stop_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    closed_round: int = -1


@dataclass
class _Report:
    factors: dict[str, np.ndarray]
    num_samples: float
    metrics: dict[str, float]


@dataclass
class RoundRecord:
    round_idx: int
    selected: list[str]
    reported: list[str]
    late: list[str]
    opened_at: float
    closed_at: float
    result: AggregateResult | None
    client_metrics: dict[str, dict[str, float]]
    refused: str = ""  # why the aggregate was not committed (the previous global adapter stays), "" if it was


class RoundManager:
    def __init__(
        self,
        strategy: Strategy,
        *,
        num_rounds: int,
        expected_clients: int,
        fraction: float = 1.0,
        min_clients: int = 1,
        deadline_s: float = 600.0,
        join_timeout_s: float | None = None,
        sequential: bool = False,
        seed: int = 0,
        on_close: Callable[[RoundRecord], dict[str, float] | None] | None = None,
        start_round: int = 0,
        registered: list[str] | None = None,
        on_checkpoint: Callable[[int, dict[str, float]], None] | None = None,
        last_metrics: dict[str, float] | None = None,
        max_metrics_entries: int = 64,
        max_metric_name_bytes: int = 64,
    ):
        self.strategy = strategy
        self.num_rounds = num_rounds
        self.expected_clients = expected_clients
        self.fraction = fraction
        self.min_clients = min_clients
        self.deadline_s = deadline_s
        self.join_timeout_s = deadline_s if join_timeout_s is None else join_timeout_s
        self.sequential = sequential
        self.seed = seed
        self.on_close = on_close
        self.on_checkpoint = on_checkpoint
        self.max_metrics_entries = max_metrics_entries
        self.max_metric_name_bytes = max_metric_name_bytes
        # after a restart from a checkpoint, the round that was open when the server died is run again; a
        # client that had already finished it (waits for the round after) is handed it once more
        self.redo_round = start_round if start_round > 0 or registered else None
        self._cv = threading.Condition()
        self.registered: list[str] = list(registered or [])
        self.round_idx = start_round  # the round open now, or the next one to open
        self.is_open = False
        self.selected: list[str] = []
        self.directives: dict[str, ClientDirective] = {}
        self.reports: dict[str, _Report] = {}
        self.opened_at = 0.0
        self.deadline = math.inf
        self.stopped = start_round >= num_rounds
        self.stop_reason = "max_rounds" if self.stopped else ""
        self.last_metrics: dict[str, float] = dict(last_metrics or {})
        self.history: deque[RoundRecord] = deque(maxlen=HISTORY_KEEP)
        self._first_join = None
        self._closing = False
        self.shutting_down = False  # the server is going away: waiting clients are told to retry (UNAVAILABLE)
        self._preloaded: dict[int, dict[str, _Report]] = {}  # round -> adapters pushed before a server restart
        self._timer = threading.Thread(target=self._watch, name="round-deadline", daemon=True)
        self._alive = True
        self._timer.start()

    # -- membership ----------------------------------------------------------------------------------------
    def register(self, client_id: str) -> None:
        with self._cv:
            if client_id not in self.registered:
                self.registered.append(client_id)
            if self._first_join is None:
                self._first_join = time.monotonic()
            self._maybe_open()
            self._cv.notify_all()

    def unregister(self, client_id: str) -> None:
        with self._cv:
            if client_id in self.registered:
                self.registered.remove(client_id)
            self._maybe_close()
            self._cv.notify_all()

    # -- what clients ask ----------------------------------------------------------------------------------
    def wait_assignment(
        self, client_id: str, min_round: int, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> Assignment | None:
        """Block until an open round >= min_round selects `client_id` (or the run stops); None on timeout or
        when `alive()` turns false (the caller went away: its thread must not stay parked here)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                if self.shutting_down:
                    raise ServiceError(
                        "UNAVAILABLE", "the server is shutting down; retry (it resumes from its checkpoint)"
                    )
                if client_id not in self.registered:
                    raise ServiceError("FAILED_PRECONDITION", f"client {client_id!r} is not registered")
                redo = self.redo_round is not None and self.round_idx == self.redo_round == min_round - 1
                if (
                    self.is_open
                    and (self.round_idx >= min_round or redo)
                    and client_id in self.selected
                    and client_id not in self.reports
                ):
                    return Assignment(
                        self.round_idx,
                        self.directives[client_id],
                        metrics=dict(self.last_metrics),
                        closed_round=self.round_idx - 1,
                    )
                if self.stopped:
                    return Assignment(
                        self.round_idx,
                        None,
                        stop=True,
                        stop_reason=self.stop_reason,
                        metrics=dict(self.last_metrics),
                        closed_round=self.round_idx - 1,
                    )
                left = None if end is None else end - time.monotonic()
                if (left is not None and left <= 0) or (alive is not None and not alive()):
                    return None
                self._cv.wait(timeout=0.5 if left is None else min(left, 0.5))

    def check_training(self, client_id: str, round_idx: int) -> None:
        """Raise ServiceError unless `client_id` may train in `round_idx` now."""
        with self._cv:
            if self.shutting_down:
                raise ServiceError("UNAVAILABLE", "the server is shutting down; retry")
            if self.stopped:
                raise ServiceError("FAILED_PRECONDITION", "training is over")
            if not self.is_open or round_idx != self.round_idx:
                raise ServiceError(
                    "FAILED_PRECONDITION",
                    f"round {round_idx} is not open (open round: {self.round_idx if self.is_open else 'none'})",
                )
            if client_id not in self.selected:
                raise ServiceError("FAILED_PRECONDITION", f"client {client_id!r} is not selected for round {round_idx}")
            if client_id in self.reports:
                raise ServiceError("FAILED_PRECONDITION", f"client {client_id!r} already pushed round {round_idx}")

    def submit(
        self,
        client_id: str,
        round_idx: int,
        factors: dict[str, np.ndarray],
        num_samples: float,
        metrics: dict[str, float] | None = None,
    ) -> tuple[int, int]:
        """Accept a client's adapter for the open round; returns (reported, expected)."""
        with self._cv:
            self.check_training(client_id, round_idx)
            metrics = check_metrics(metrics or {}, self.max_metrics_entries, self.max_metric_name_bytes)
            if not num_samples > 0:
                raise ServiceError("INVALID_ARGUMENT", f"num_samples must be > 0, got {num_samples}")
            expected = set(self.directives[client_id].upload_keys)
            if set(factors) != expected:
                missing, extra = sorted(expected - set(factors)), sorted(set(factors) - expected)
                raise ServiceError(
                    "INVALID_ARGUMENT",
                    f"adapter keys do not match the round's upload list: missing {missing[:3]}, unexpected {extra[:3]}",
                )
            self.reports[client_id] = _Report(factors, float(num_samples), metrics)
            reported, want = len(self.reports), len(self.selected)
            self._maybe_close()
            self._cv.notify_all()
            return reported, want

    # -- internals -----------------------------------------------------------------------------------------
    def _select(self) -> list[str]:
        pool = sorted(self.registered)
        if self.sequential:
            return [pool[self.round_idx % len(pool)]]
        n = min(len(pool), max(self.min_clients, math.ceil(self.fraction * len(pool))))
        rng = np.random.default_rng([self.seed, self.round_idx])
        return sorted(rng.choice(pool, size=n, replace=False).tolist())

    def _maybe_open(self) -> None:
        if self.is_open or self.stopped or self._closing or not self.registered:
            return
        enough = len(self.registered) >= self.expected_clients
        waited = self._first_join is not None and time.monotonic() - self._first_join >= self.join_timeout_s
        if (
            self.round_idx == 0
            and not self.history
            and not (enough or (waited and len(self.registered) >= self.min_clients))
        ):
            return
        if len(self.registered) < self.min_clients:
            return
        self.selected = self._select()
        self.directives = self.strategy.configure_round(self.round_idx, self.selected)
        self.reports = {c: r for c, r in self._preloaded.pop(self.round_idx, {}).items() if c in self.selected}
        self.opened_at = time.monotonic()
        self.deadline = self.opened_at + self.deadline_s
        self.is_open = True
        log.info("round %d open: %s", self.round_idx, ", ".join(self.selected))

    def _maybe_close(self) -> None:
        if not self.is_open or not self._alive:  # stopped (shutdown): an interrupted round is not a result
            return
        active = [c for c in self.selected if c in self.registered]
        if not active and not self.reports:  # everyone selected left before doing anything: not a round
            self.is_open = False
            log.info("round %d: every selected client left without a report; selecting again", self.round_idx)
            return
        if all(c in self.reports for c in active) or time.monotonic() >= self.deadline:
            self._close()

    def _close(self) -> None:
        """Aggregate what arrived (the condition lock is held); late clients are left out."""
        self.is_open = False
        self._closing = True
        late = [c for c in self.selected if c not in self.reports]
        updates = [ClientUpdate(c, r.factors, r.num_samples) for c, r in sorted(self.reports.items())]
        result, refused = None, ""
        try:
            if updates:
                result = self.strategy.aggregate(self.round_idx, updates)
        except Exception as err:  # a bad aggregate must not kill the server: keep the previous adapter
            refused = f"{type(err).__name__}: {err}"
            log.error(
                "round %d: aggregate refused, the previous global adapter stays: %s",
                self.round_idx,
                refused,
                exc_info=not isinstance(err, ValueError),
            )
        record = RoundRecord(
            self.round_idx,
            list(self.selected),
            sorted(self.reports),
            late,
            self.opened_at,
            time.monotonic(),
            result,
            {c: r.metrics for c, r in self.reports.items()},
            refused,
        )
        if late:
            log.warning("round %d closed without %s (deadline)", self.round_idx, ", ".join(late))
        extra = None
        if self.on_close is not None:
            try:
                extra = self.on_close(record)
            except Exception:
                log.exception("round %d: on_close hook failed", self.round_idx)
        self.last_metrics = (
            dict(result.metrics if result else {})
            | dict(extra or {})
            | ({"aggregate_refused": 1.0} if record.refused else {})
        )
        self.history.append(record)
        self.round_idx += 1
        self._closing = False
        if self.round_idx >= self.num_rounds:
            self.stopped, self.stop_reason = True, "max_rounds"
        if self.on_checkpoint is not None:  # before the next round opens: nobody has seen it yet
            try:
                self.on_checkpoint(self.round_idx, self.last_metrics)
            except Exception:
                log.exception("round %d: checkpoint failed", record.round_idx)
        if not self.stopped:
            self._maybe_open()
        self._cv.notify_all()

    def _watch(self) -> None:
        while self._alive:
            with self._cv:
                self._maybe_close()
                self._maybe_open()
                self._cv.wait(timeout=0.05)

    def close_now(self) -> bool:
        """Close the open round now, as its deadline would (a caller that keeps its own clock, like the
        simulation engine, decides when); False if no round is open."""
        with self._cv:
            if not self.is_open:
                return False
            self._close()
            self._cv.notify_all()
            return True

    def selected_since(self, client_id: str) -> float | None:
        """When (monotonic) the open round that wants work from `client_id` opened; None if none does."""
        with self._cv:
            if self.is_open and client_id in self.selected and client_id not in self.reports:
                return self.opened_at
            return None

    def preload(self, round_idx: int, reports: dict[str, tuple[dict, float, dict]]) -> None:
        """Adapters pushed for `round_idx` before a server restart: they count when that round opens again."""
        with self._cv:
            got = {c: _Report(f, n, m) for c, (f, n, m) in reports.items()}
            if self.is_open and self.round_idx == round_idx:  # the watcher opened it already
                self.reports.update({c: r for c, r in got.items() if c in self.selected})
                self._maybe_close()
                self._cv.notify_all()
            else:
                self._preloaded[round_idx] = got

    def shutdown(self) -> None:
        """Stop the deadline watcher without ending the run: waiting and training clients get UNAVAILABLE and
        retry against the restarted server."""
        with self._cv:
            self._alive = False
            self.shutting_down = True
            self._cv.notify_all()

    def directive(self, client_id: str) -> ClientDirective | None:
        with self._cv:
            return self.directives.get(client_id) if self.is_open else None

    def stop(self, reason: str = "shutdown") -> None:
        with self._cv:
            self._alive = False
            if not self.stopped:
                self.stopped, self.stop_reason = True, reason
            self._cv.notify_all()
