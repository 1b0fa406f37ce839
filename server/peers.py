"""What one peer may hold of the server: open calls, worker threads, time.

The synchronous gRPC server gives every open call a worker thread until its handler returns, and a
streaming call (Train, Evaluate, PushAdapter) reaches its handler before its first message, i.e. before it
has shown a session token. `CallGuard` keeps account of the open calls and bounds them:

* a call that has not yet shown a token ("pending") is closed after `first_message_timeout_s`; there are at
  most `max_pending_per_peer` of them per peer address and `max_pending_calls` in all, each plus one per
  client of the run (every edge opens its Train stream before it computes the first step, possibly all at
  once from behind one address), and a newcomer beyond either closes the oldest one instead of being refused
  (an honest stream sends its first message soon after opening, so silent strangers are the ones that get
  old; an honest one that is closed is retried by the edge and then sends at once);
* an authenticated stream that waits longer than `stream_idle_timeout_s` for its client's next message is
  closed;
* one client (session) holds at most `max_calls_per_client` calls at once.

So pending calls hold at most `max_pending_calls` + clients threads, registered clients at most
`max_calls_per_client` each, and the server's pool is sized for both plus spares (health checks, Join): a
stranger can never take the threads the registered clients need. Calls are closed with `context.cancel()` (the blocked handler then
ends; the client sees CANCELLED, which edges retry). Not covered: a unary call whose one request never
arrives waits in gRPC itself before any handler runs (bounded by the pool's `maximum_concurrent_rpcs`); keep
a proxy with per-address connection limits in front of a public server (docs/security.md).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter

from splitwave.server.errors import ServiceError

log = logging.getLogger(__name__)


def peer_address(peer: str) -> str:
    """The host part of a gRPC peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678", "unix:...")."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")] if "]" in rest else rest
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


class Call:
    """One open call as the guard sees it."""

    __slots__ = ("context", "method", "peer", "stream", "seq", "started", "last", "waiting", "client", "closed")

    def __init__(self, context, method: str, peer: str, stream: bool, seq: int):
        self.context, self.method, self.peer, self.stream, self.seq = context, method, peer, stream, seq
        self.started = self.last = time.monotonic()
        self.waiting = True  # the handler waits for the client's next message (idle time counts)
        self.client: str | None = None  # set once the call showed a valid session token
        self.closed = ""  # why the guard closed it ("" while open)

    def busy(self) -> None:
        """A message arrived: the handler works on it (no idle time counts until `idle()`)."""
        self.waiting, self.last = False, time.monotonic()

    def idle(self) -> None:
        """The handler answered and waits for the client's next message."""
        self.waiting, self.last = True, time.monotonic()


class CallGuard:
    def __init__(self, limits, num_clients: int = 0, tick_s: float = 0.1):
        self.limits = limits
        self.per_peer = limits.max_pending_per_peer + num_clients
        self.pending_cap = limits.max_pending_calls + num_clients
        self._lock = threading.Lock()
        self._calls: set[Call] = set()
        self._seq = itertools.count()
        self.closed = Counter()  # reason -> calls the guard closed (for tests and logs)
        self._stop = threading.Event()
        self._tick = tick_s
        self._thread = threading.Thread(target=self._watch, name="call-guard", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def call(self, context, method: str, stream: bool):
        """Account for one call for as long as its handler runs. Closing a pending call here is what keeps a
        newcomer from being refused: the oldest silent call makes room."""
        try:
            peer = peer_address(context.peer())
        except Exception:  # noqa: BLE001 - a context without a peer (tests calling handlers directly)
            peer = "?"
        c = Call(context, method, peer, stream, next(self._seq))
        evict = None
        with self._lock:
            if stream:
                pending = [x for x in self._calls if x.client is None and x.stream and not x.closed]
                same = [x for x in pending if x.peer == peer]
                if len(same) >= self.per_peer:
                    evict = min(same, key=lambda x: x.seq)
                    why = "pending_per_peer"
                elif len(pending) >= self.pending_cap:
                    evict = min(pending, key=lambda x: x.seq)
                    why = "pending_total"
            self._calls.add(c)
        if evict is not None:
            self._close(evict, why)
        try:
            yield c
        except Exception:
            if not c.closed:
                raise
            # the guard cancelled it: the handler's blocked read raised; the client already has its status
        finally:
            with self._lock:
                self._calls.discard(c)

    def authenticate(self, c: Call, client_id: str) -> None:
        """The call showed `client_id`'s token: it no longer counts as a stranger's, but as one of that
        client's calls, of which there may be `max_calls_per_client` at once."""
        with self._lock:
            n = sum(1 for x in self._calls if x.client == client_id and not x.closed)
            if n >= self.limits.max_calls_per_client:
                raise ServiceError(
                    "RESOURCE_EXHAUSTED",
                    f"client {client_id!r} has {n} calls open (at most {self.limits.max_calls_per_client} at once)",
                )
            c.client = client_id
        c.busy()

    def open_calls(self) -> dict[str, int]:
        """Open calls by kind ("pending", or "client:<id>")."""
        with self._lock:
            return dict(Counter("pending" if x.client is None else f"client:{x.client}" for x in self._calls))

    def _close(self, c: Call, why: str) -> None:
        if c.closed:
            return
        c.closed = why
        self.closed[why] += 1
        log.info("closing %s call from %s (%s)", c.method, c.peer, why)
        try:
            c.context.cancel()
        except Exception:  # noqa: BLE001 - the call ended meanwhile
            pass

    def _watch(self) -> None:
        lim = self.limits
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            expired = []
            with self._lock:
                for x in self._calls:
                    if not x.stream or x.closed or not x.waiting:
                        continue
                    if x.client is None and now - x.started > lim.first_message_timeout_s:
                        expired.append((x, "first_message_timeout"))
                    elif x.client is not None and now - x.last > lim.stream_idle_timeout_s:
                        expired.append((x, "idle_timeout"))
            for x, why in expired:
                self._close(x, why)

    def stop(self) -> None:
        self._stop.set()
