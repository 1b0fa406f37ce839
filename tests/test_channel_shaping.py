"""Real-time shaping through ShapingProxy on loopback: delivery times of real byte streams (plain TCP and
gRPC) agree with the link model's done() within 5%."""

import copy
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

import splitwave.channel as cs

MB = 1 << 20


def _static():
    return cs.StaticLink(10e6, latency_s=0.01)


def _trace():
    return cs.TraceLink(cs.load_trace("Verizon-LTE-short.up"), latency_s=0.01, offset_ms=5000)


class EchoAfterServer:
    """Reads `n_in` bytes, then sends `n_out` bytes back, per connection (plain TCP)."""

    def __init__(self, n_in, n_out):
        self.n_in, self.n_out = n_in, n_out
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = self.sock.getsockname()
        self.received = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        with c:
            got = bytearray()
            while len(got) < self.n_in:
                b = c.recv(1 << 16)
                if not b:
                    break
                got += b
            self.received.append(bytes(got))
            if self.n_out:
                c.sendall(bytes(range(256)) * (self.n_out // 256) + b"z" * (self.n_out % 256))
            c.shutdown(socket.SHUT_WR)
            while c.recv(1 << 16):
                pass

    def close(self):
        self._stop = True
        self.sock.close()


def _recv_exactly(s, n):
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(1 << 16)
        if not b:
            break
        buf += b
    return bytes(buf)


def _roundtrip(up, down, n_up, n_down):
    """(measured, predicted) seconds for n_up bytes up, then n_down bytes back, through a proxy."""
    srv = EchoAfterServer(n_up, n_down)
    mu, md = copy.deepcopy(up), copy.deepcopy(down)
    try:
        with cs.ShapingProxy("127.0.0.1", 0, srv.addr, up, down) as px:
            s = socket.create_connection(("127.0.0.1", px.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            time.sleep(0.02)  # connection to the target established
            payload = b"a" * n_up
            t0 = px.now()
            w0 = time.monotonic()
            s.sendall(payload)
            data = _recv_exactly(s, n_down)
            w1 = time.monotonic()
            s.close()
            stats = px.stats()
        t_up = mu.done(n_up, t0)
        t_dn = md.done(n_down, t_up)
        assert len(data) == n_down
        assert srv.received == [payload]
        return w1 - w0, t_dn - t0, stats
    finally:
        srv.close()


def test_static_1mb_each_way_matches_model():
    meas, pred, stats = _roundtrip(_static(), _static(), MB, MB)
    assert pred == pytest.approx(2 * (0.01 + 8 * MB / 10e6))
    assert meas == pytest.approx(pred, rel=0.05)
    assert stats["uplink"]["bytes_in"] == MB and stats["downlink"]["bytes_out"] == MB
    assert stats["uplink"]["timing_error"]["count"] > 0
    assert stats["uplink"]["timing_error"]["p50_ms"] < 5  # sleep precision is reported and sane


@pytest.mark.usefixtures("shared_traces")
def test_trace_uplink_1mb_matches_model():
    meas, pred, _ = _roundtrip(_trace(), cs.StaticLink(50e6, 0.01), MB, 1000)
    assert meas == pytest.approx(pred, rel=0.05)


def test_wireless_fading_uplink_1mb_matches_model():
    # Rayleigh fading per 10 ms block, 4 clients sharing 20 MHz: the rate changes ~60 times in the transfer
    up = cs.WirelessLink(300, cs.RadioParams(), cs.Cell(20e6, n_active=4), fading="rayleigh", seed=1)
    meas, pred, _ = _roundtrip(up, cs.StaticLink(50e6, 0.005), MB, 1000)
    assert pred > 0.3
    assert meas == pytest.approx(pred, rel=0.05)


def test_unshaped_passthrough_and_refused_target():
    srv = EchoAfterServer(100_000, 100_000)
    try:
        with cs.ShapingProxy("127.0.0.1", 0, srv.addr, None, None) as px:  # no link: plain forwarding
            with socket.create_connection(("127.0.0.1", px.port)) as s:
                s.sendall(b"p" * 100_000)
                assert len(_recv_exactly(s, 100_000)) == 100_000
            assert px.bytes_up == 100_000
    finally:
        srv.close()
    # target that refuses: the proxy closes the client connection instead of hanging
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    addr = dead.getsockname()
    dead.close()
    with cs.ShapingProxy("127.0.0.1", 0, addr, _static(), _static()) as px:
        s = socket.create_connection(("127.0.0.1", px.port))
        s.settimeout(5)
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
        s.close()


def test_many_concurrent_connections_share_the_link():
    n_conn, size = 24, 20_000
    srv = EchoAfterServer(size, size)
    up, down = cs.StaticLink(20e6, 0.005), cs.StaticLink(20e6, 0.005)
    results = [None] * n_conn
    try:
        with cs.ShapingProxy("127.0.0.1", 0, srv.addr, up, down) as px:

            def client(i):
                with socket.create_connection(("127.0.0.1", px.port)) as s:
                    s.sendall(bytes([i]) * size)
                    results[i] = _recv_exactly(s, size)

            w0 = time.monotonic()
            ths = [threading.Thread(target=client, args=(i,)) for i in range(n_conn)]
            for t in ths:
                t.start()
            for t in ths:
                t.join(30)
            elapsed = time.monotonic() - w0
            st = px.stats()
        expect = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        assert all(r == expect for r in results)
        assert sorted(srv.received) == sorted(bytes([i]) * size for i in range(n_conn))
        assert st["connections_total"] == n_conn
        assert st["uplink"]["bytes_in"] == n_conn * size == st["downlink"]["bytes_out"]
        # all uplink bytes share one 20 Mbit/s link: the last can't be done before they all crossed
        assert elapsed >= 0.95 * (8 * n_conn * size / 20e6)
    finally:
        srv.close()


# ------------------------------------------------------------------------------------------ gRPC
def _grpc_server():
    def up(req, ctx):
        return len(req).to_bytes(8, "big")

    def down(req, ctx):
        n = int.from_bytes(req, "big")
        chunk = b"d" * (256 << 10)
        for _ in range(n // len(chunk)):
            yield chunk

    handler = grpc.method_handlers_generic_handler(
        "sw.Test",
        {
            "Up": grpc.unary_unary_rpc_method_handler(up),
            "Down": grpc.unary_stream_rpc_method_handler(down),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.max_receive_message_length", 64 * MB)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.parametrize("kind", ["static", "trace"])
def test_grpc_unary_upload_and_streaming_download(kind, request):
    if kind == "trace":
        request.getfixturevalue("shared_traces")
    up = _static() if kind == "static" else _trace()
    down = _static()
    server, port = _grpc_server()
    try:
        with cs.ShapingProxy("127.0.0.1", 0, ("127.0.0.1", port), up, down) as px:
            ch = grpc.insecure_channel(f"127.0.0.1:{px.port}", options=[("grpc.max_receive_message_length", 64 * MB)])
            call_up = ch.unary_unary("/sw.Test/Up")
            call_down = ch.unary_stream("/sw.Test/Down")
            assert int.from_bytes(call_up(b"warm-up", timeout=10), "big") == 7
            time.sleep(0.1)  # let the link drain: the next call starts on an idle link
            mu, md = copy.deepcopy(up), copy.deepcopy(down)

            # unary upload of 1 MB: request bytes on the uplink, then the small reply on the downlink
            b_up, b_dn, t0, w0 = px.bytes_up, px.bytes_down, px.now(), time.monotonic()
            assert int.from_bytes(call_up(b"u" * MB, timeout=30), "big") == MB
            meas = time.monotonic() - w0
            n_up, n_dn = px.bytes_up - b_up, px.bytes_down - b_dn
            pred = md.done(n_dn, mu.done(n_up, t0)) - t0
            assert n_up > MB
            assert meas == pytest.approx(pred, rel=0.05), (meas, pred, n_up, n_dn)

            # server-streaming download of 1 MB in 4 messages
            time.sleep(0.1)
            mu, md = copy.deepcopy(up), copy.deepcopy(down)
            b_up, b_dn, t0, w0 = px.bytes_up, px.bytes_down, px.now(), time.monotonic()
            got = sum(len(m) for m in call_down(MB.to_bytes(8, "big"), timeout=30))
            meas = time.monotonic() - w0
            n_up, n_dn = px.bytes_up - b_up, px.bytes_down - b_dn
            assert got == MB and n_dn > MB
            # request + the client's flow-control updates go up; the 1 MB comes down after the request
            req_bytes = 200
            pred = md.done(n_dn, mu.done(req_bytes, t0)) - t0
            assert meas == pytest.approx(pred, rel=0.05), (meas, pred, n_up, n_dn)
            ch.close()
    finally:
        server.stop(None)
