"""Real-time shaping of real byte streams: a user-space TCP proxy between an edge client and the server.

Any TCP client (gRPC over HTTP/2 included: the proxy only forwards bytes) sees the link.  For each
accepted connection, client->server bytes are paced by the uplink model and server->client bytes by the
downlink model.  Every MTU-sized segment read at model time t gets its release time from the same
`Link.transmit` the virtual clock uses, plus a propagation delay (latency + jitter, drawn once per busy
period so a message is not smeared by per-packet jitter).  Releases are scheduled at absolute times on
the monotonic clock, so timer lateness never accumulates; lateness is measured and reported.

All connections of one proxy share its two links (one proxy per client = one radio per client).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from .link import MTU_BYTES, Link

log = logging.getLogger(__name__)


class TimingStats:
    """Lateness of actual releases behind their scheduled model times (s), i.e. sleep precision."""

    def __init__(self, keep: int = 100_000):
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self._keep = keep
        self._sample: list[float] = []

    def add(self, late: float) -> None:
        self.count += 1
        self.total += late
        if late > self.max:
            self.max = late
        if len(self._sample) < self._keep:
            self._sample.append(late)
        else:
            self._sample[self.count % self._keep] = late

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0}
        s = sorted(self._sample)

        def q(p: float) -> float:
            return s[min(len(s) - 1, int(p * len(s)))] * 1e3

        return {
            "count": self.count,
            "mean_ms": self.total / self.count * 1e3,
            "p50_ms": q(0.5),
            "p99_ms": q(0.99),
            "max_ms": self.max * 1e3,
        }


class _Direction:
    """One direction of the proxy: the shared link, its busy-period delay, counters, timing stats."""

    def __init__(self, name: str, link: Link | None):
        self.name = name
        self.link = link
        self.delay = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.timing = TimingStats()

    def schedule(self, nbytes: int, t: float) -> float:
        """Model release time (last byte delivered) of a segment read at model time t."""
        if self.link is None:
            return t
        idle = t >= self.link.busy_until
        end = self.link.transmit(nbytes, t)
        if idle:
            self.delay = self.link.delay()
        return end + self.delay


class _Pump:
    """Bytes from `src` transport to `dst` transport, each segment released at its model time."""

    def __init__(self, proxy: ShapingProxy, direction: _Direction, src: asyncio.Transport | None):
        self.proxy = proxy
        self.dir = direction
        self.src = src
        self.dst: asyncio.Transport | None = None
        self.queue: deque[tuple[float, memoryview]] = deque()  # (release time, segment of a read buffer)
        self.pending = 0
        self.last_release = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.dst_paused = False
        self.eof = False  # src sent EOF: half-close dst after the last byte
        self.src_gone = False  # src connection lost: close dst after the last byte
        self.finished = False
        self.on_finished: Callable[[], None] | None = None

    # --- input
    def feed(self, data: bytes, t: float) -> None:
        self.dir.bytes_in += len(data)
        mv = memoryview(data)
        for o in range(0, len(data), MTU_BYTES):
            seg = mv[o : o + MTU_BYTES]
            rel = max(self.dir.schedule(len(seg), t), self.last_release)
            self.last_release = rel
            self.queue.append((rel, seg))
        self.pending += len(data)
        self._flow()
        self._arm()

    def feed_eof(self) -> None:
        self.eof = True
        self._arm()

    def feed_lost(self) -> None:
        self.src_gone = True
        self._arm()

    # --- flow control: bound the proxy's buffer without idling the link
    def _flow(self) -> None:
        if self.src is None:
            return
        over = self.pending > self.proxy.high_water or self.dst_paused
        if over and not self.reading_paused:
            self.src.pause_reading()
            self.reading_paused = True
        elif self.reading_paused and self.pending < self.proxy.low_water and not self.dst_paused:
            self.reading_paused = False
            if not self.src.is_closing():
                self.src.resume_reading()

    def set_dst(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None or self.dst is None or self.finished:
            return
        if self.queue:
            when = self.proxy._epoch + self.queue[0][0]
            self.timer = self.proxy.loop.call_at(when, self._release)
        elif self.eof or self.src_gone:
            self._finish()

    def _release(self) -> None:
        self.timer = None
        if self.dst is None or self.dst.is_closing():
            self.queue.clear()
            self.pending = 0
            self._flow()
            return
        now = self.proxy.now()
        horizon = now + self.proxy.early_s
        out = []
        n = 0
        while self.queue and self.queue[0][0] <= horizon:
            rel, seg = self.queue.popleft()
            self.dir.timing.add(now - rel)
            out.append(seg)
            n += len(seg)
        if out:
            self.dir.bytes_out += n  # before write: a reader may see the bytes before we return
            self.pending -= n
            self.dst.write(b"".join(out))
            self._flow()
        self._arm()

    def _finish(self) -> None:
        self.finished = True
        if self.dst is not None and not self.dst.is_closing():
            if self.src_gone and not self.eof:
                self.dst.close()
            elif self.dst.can_write_eof():
                self.dst.write_eof()
            else:
                self.dst.close()
        if self.on_finished:
            self.on_finished()

    def abort(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.finished = True


class _Connection:
    """One accepted client connection and its upstream connection to the target."""

    def __init__(self, proxy: ShapingProxy):
        self.proxy = proxy
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.up: _Pump | None = None
        self.down: _Pump | None = None
        self.closed = False

    def check_done(self) -> None:
        if self.up and self.down and self.up.finished and self.down.finished:
            self.close()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for p in (self.up, self.down):
            if p:
                p.abort()
        for tr in (self.client, self.server):
            if tr is not None and not tr.is_closing():
                tr.abort() if abort else tr.close()
        self.proxy._conns.discard(self)


def _tune(transport: asyncio.Transport, sndbuf: int | None) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    except OSError:  # pragma: no cover
        pass


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: what it receives feeds pump `src`; pump `dst` writes to it."""

    src_name = dst_name = ""

    def __init__(self, conn: _Connection):
        self.conn = conn

    @property
    def src(self) -> _Pump:
        return getattr(self.conn, self.src_name)

    @property
    def dst(self) -> _Pump:
        return getattr(self.conn, self.dst_name)

    def data_received(self, data: bytes) -> None:
        self.src.feed(data, self.conn.proxy.now())

    def eof_received(self) -> bool:
        self.src.feed_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.conn
        if exc is not None:
            c.close(abort=True)
            return
        self.src.feed_lost()
        self.dst.abort()
        c.check_done()

    def pause_writing(self) -> None:
        self.dst.dst_paused = True

    def resume_writing(self) -> None:
        self.dst.dst_paused = False
        self.dst._flow()


class _ClientSide(_Side):
    """The edge's socket: its bytes go up, the downlink pump writes to it."""

    src_name, dst_name = "up", "down"

    def __init__(self, proxy: ShapingProxy):
        super().__init__(_Connection(proxy))
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a TCP server's transports are stream Transports
        c = self.conn
        c.client = transport
        _tune(transport, self.proxy.sndbuf)
        self.proxy._conns.add(c)
        self.proxy.connections_total += 1
        c.up = up = _Pump(self.proxy, self.proxy._up, transport)
        c.down = _Pump(self.proxy, self.proxy._down, None)
        c.up.on_finished = c.check_done
        c.down.on_finished = c.check_done
        c.down.set_dst(transport)
        self.proxy.loop.create_task(self._connect(up))

    async def _connect(self, up: _Pump) -> None:
        c = self.conn
        try:
            server, _ = await self.proxy.loop.create_connection(
                lambda: _ServerSide(c), self.proxy.target[0], self.proxy.target[1]
            )
        except OSError as e:
            log.warning("proxy: cannot reach target %s: %s", self.proxy.target, e)
            c.close(abort=True)
            return
        if c.closed:
            server.close()
            return
        c.server = server
        _tune(server, self.proxy.sndbuf)
        up.set_dst(server)


class _ServerSide(_Side):
    """The server's socket: its bytes go down, the uplink pump writes to it."""

    src_name, dst_name = "down", "up"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        down = self.conn.down
        if down is not None:  # made by _ClientSide.connection_made before it connects here
            down.src = cast(asyncio.Transport, transport)


class ShapingProxy:
    """TCP proxy listen_host:port -> target, shaping client->server by `uplink`, back by `downlink`.

    Model time 0 is `start()`; `now()` gives the proxy's model time (for predictions with a copy of
    the links).  A link of None forwards that direction unshaped.
    """

    def __init__(
        self,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        target: tuple[str, int] = ("127.0.0.1", 0),
        uplink: Link | None = None,
        downlink: Link | None = None,
        *,
        high_water: int = 4 << 20,
        low_water: int = 1 << 20,
        sndbuf: int | None = 128 << 10,
        early_s: float = 0.0002,
    ):
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target = (target[0], int(target[1]))
        self.uplink = uplink
        self.downlink = downlink
        self.high_water = high_water
        self.low_water = low_water
        self.sndbuf = sndbuf
        self.early_s = early_s  # release this much ahead at most: centres the ~ms timer granularity
        self._up = _Direction("uplink", uplink)
        self._down = _Direction("downlink", downlink)
        self._conns: set[_Connection] = set()
        self.connections_total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._epoch = 0.0
        self.port: int | None = None

    def now(self) -> float:
        """Model time: seconds since start() on the monotonic clock (= the event loop's clock)."""
        return time.monotonic() - self._epoch

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The proxy's event loop (its own thread); only there once start() has run."""
        if self._loop is None:
            raise RuntimeError("proxy not started")
        return self._loop

    # --- lifecycle
    def start(self) -> ShapingProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        ready = threading.Event()
        err: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                server = self._server = loop.run_until_complete(
                    loop.create_server(lambda: _ClientSide(self), self.listen_host, self.listen_port, backlog=512)
                )
                self.port = server.sockets[0].getsockname()[1]
                self._epoch = time.monotonic()
            except BaseException as e:  # noqa: BLE001 - handed to start()
                err.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"shaping-proxy-{self.listen_port}", daemon=True)
        self._thread.start()
        ready.wait()
        if err:
            self._thread.join()
            self._thread = None
            raise err[0]
        log.info(
            "shaping proxy %s:%d -> %s:%d up=%r down=%r",
            self.listen_host,
            self.port,
            *self.target,
            self.uplink,
            self.downlink,
        )
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        loop, server = self.loop, self._server
        assert server is not None  # start() returned, so the server is listening

        async def shutdown() -> None:
            server.close()
            for c in list(self._conns):
                c.close(abort=True)
            await server.wait_closed()
            await asyncio.sleep(0)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- reporting
    def stats(self) -> dict[str, Any]:
        """Bytes per direction and timing error (lateness of releases vs. model time)."""
        out: dict[str, Any] = {"connections_total": self.connections_total, "connections_active": len(self._conns)}
        for d in (self._up, self._down):
            out[d.name] = {"bytes_in": d.bytes_in, "bytes_out": d.bytes_out, "timing_error": d.timing.summary()}
        return out

    @property
    def bytes_up(self) -> int:
        return self._up.bytes_in

    @property
    def bytes_down(self) -> int:
        return self._down.bytes_in


def measure_sleep_precision(n: int = 200, interval_s: float = 0.001) -> dict[str, dict[str, float]]:
    """Lateness of absolute-time wake-ups, for time.sleep and for the asyncio loop the proxy uses."""
    lates = []
    t0 = time.monotonic()
    for i in range(1, n + 1):
        target = t0 + i * interval_s
        d = target - time.monotonic()
        if d > 0:
            time.sleep(d)
        lates.append(time.monotonic() - target)

    async def aio() -> list[float]:
        loop = asyncio.get_running_loop()
        out = []
        start = loop.time()
        for i in range(1, n + 1):
            target = start + i * interval_s
            fut = loop.create_future()
            loop.call_at(target, fut.set_result, None)
            await fut
            out.append(loop.time() - target)
        return out

    alates = asyncio.run(aio())

    def summ(x: list[float]) -> dict[str, float]:
        s = sorted(x)
        return {
            "mean_ms": sum(s) / len(s) * 1e3,
            "p50_ms": s[len(s) // 2] * 1e3,
            "p99_ms": s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3,
            "max_ms": s[-1] * 1e3,
        }

    return {"time_sleep": summ(lates), "asyncio_call_at": summ(alates)}
