"""A scripted exchange through the shaping proxy and the same exchange on the virtual clock: how the proxy's real
time is checked against the link models (used by tests/test_virtual_clock.py and benchmarks/channel_accuracy.py).

Each of `steps` steps: edge compute, `nbytes` up, server compute, `nbytes` down. Compute is a sleep, which is
deterministic on a loaded host, so the comparison measures the shaping, not the machine."""

from __future__ import annotations

import socket
import threading
import time

from .link import Link
from .proxy import ShapingProxy
from .virtual import ServerQueue, VirtualClock


def proxy_exchange(up: Link, down: Link, steps: int, nbytes: int, server_s: float, edge_s: float) -> float:
    """Wall seconds of the exchange over loopback TCP through a ShapingProxy with links `up` / `down`."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def server() -> None:
        c, _ = srv.accept()
        with c:
            for _ in range(steps):
                got = 0
                while got < nbytes:
                    got += len(c.recv(1 << 16))
                time.sleep(server_s)
                c.sendall(b"g" * nbytes)

    th = threading.Thread(target=server, daemon=True)
    th.start()
    try:
        with ShapingProxy("127.0.0.1", 0, srv.getsockname(), up, down) as px:
            with socket.create_connection(("127.0.0.1", px.port)) as s:
                time.sleep(0.02)
                w0 = time.monotonic()
                for _ in range(steps):
                    time.sleep(edge_s)
                    s.sendall(b"a" * nbytes)
                    got = 0
                    while got < nbytes:
                        got += len(s.recv(1 << 16))
                return time.monotonic() - w0
    finally:
        th.join(10)
        srv.close()


def virtual_exchange(up: Link, down: Link, steps: int, nbytes: int, server_s: float, edge_s: float) -> float:
    """Simulated seconds of the same exchange: measured compute, link `done` times and the server queue."""
    clock, server = VirtualClock(), ServerQueue()
    for _ in range(steps):
        t = time.perf_counter()
        time.sleep(edge_s)
        clock.compute(time.perf_counter() - t)
        clock.send(up, nbytes)
        t = time.perf_counter()
        time.sleep(server_s)
        clock.t = server.serve(clock.t, time.perf_counter() - t)
        clock.send(down, nbytes)
    return clock.t
