"""Channel accuracy: delivery time through the real-time shaping proxy vs. the link model's prediction
(static and trace links; 1, 4, 16 MB; plain TCP and gRPC), and virtual-vs-real agreement on a scripted
split-learning exchange.  Prints a table, writes benchmarks/results/channel_accuracy.json.

Usage: .venv/bin/python benchmarks/channel_accuracy.py [--sizes 1 4 16] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

import splitwave.channel as cs
from splitwave.channel.probe import proxy_exchange, virtual_exchange

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


def links() -> dict[str, Callable[[], cs.Link]]:
    return {
        "static 20Mbit/s 20ms": lambda: cs.StaticLink(20e6, 0.02),
        "trace Verizon-LTE-short.up +20ms": lambda: cs.TraceLink(cs.load_trace("Verizon-LTE-short.up"), 0.02, 5000),
    }


def tcp_upload(make: Callable[[], cs.Link], nbytes: int) -> tuple[float, float, dict]:
    """Receiver-measured time of the last byte of an nbytes upload through the proxy, and the prediction."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    res = {}

    def sink():
        c, _ = srv.accept()
        with c:
            n = 0
            while n < nbytes:
                b = c.recv(1 << 18)
                if not b:
                    break
                n += len(b)
            res["t_last"] = time.monotonic()
            res["n"] = n

    th = threading.Thread(target=sink, daemon=True)
    th.start()
    link = make()
    model = copy.deepcopy(link)
    with cs.ShapingProxy("127.0.0.1", 0, srv.getsockname(), link, None) as px:
        with socket.create_connection(("127.0.0.1", px.port)) as s:
            time.sleep(0.02)
            t0, w0 = px.now(), time.monotonic()
            s.sendall(b"x" * nbytes)
            th.join(120)
        stats = px.stats()["uplink"]["timing_error"]
    srv.close()
    assert res["n"] == nbytes
    return res["t_last"] - w0, model.done(nbytes, t0) - t0, stats


def grpc_upload(make: Callable[[], cs.Link], nbytes: int) -> tuple[float, float]:
    handler = grpc.method_handlers_generic_handler(
        "sw.Bench", {"Up": grpc.unary_unary_rpc_method_handler(lambda req, ctx: len(req).to_bytes(8, "big"))}
    )
    opts = [("grpc.max_receive_message_length", 64 * MB), ("grpc.max_send_message_length", 64 * MB)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=opts)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    up, down = make(), cs.StaticLink(20e6, 0.02)
    try:
        with cs.ShapingProxy("127.0.0.1", 0, ("127.0.0.1", port), up, down) as px:
            ch = grpc.insecure_channel(f"127.0.0.1:{px.port}", options=opts)
            call = ch.unary_unary("/sw.Bench/Up")
            call(b"warm", timeout=30)
            time.sleep(0.2)
            mu, md = copy.deepcopy(up), copy.deepcopy(down)
            b_up, b_dn, t0, w0 = px.bytes_up, px.bytes_down, px.now(), time.monotonic()
            call(b"u" * nbytes, timeout=120)
            meas = time.monotonic() - w0
            pred = md.done(px.bytes_down - b_dn, mu.done(px.bytes_up - b_up, t0)) - t0
            ch.close()
    finally:
        server.stop(None)
    return meas, pred


def virtual_vs_real(steps: int = 3, nbytes: int = MB, server_s: float = 0.05, edge_s: float = 0.02) -> dict:
    up, down = cs.StaticLink(20e6, 0.01), cs.StaticLink(20e6, 0.01)
    w0 = time.monotonic()
    virtual = virtual_exchange(copy.deepcopy(up), copy.deepcopy(down), steps, nbytes, server_s, edge_s)
    wall_v = time.monotonic() - w0
    real = proxy_exchange(up, down, steps, nbytes, server_s, edge_s)
    # pure link part, no compute: the speedup of the simulated clock itself
    w0 = time.perf_counter()
    c = cs.VirtualClock()
    u, d = copy.deepcopy(up), copy.deepcopy(down)
    for _ in range(1000):
        c.send(u, nbytes)
        c.send(d, nbytes)
    comm_only = (time.perf_counter() - w0) / 1000
    return {
        "virtual_s": virtual,
        "real_s": real,
        "ratio": virtual / real,
        "wall_virtual_s": wall_v,
        "speedup_with_compute": real / wall_v,
        "simulated_per_wall_comm_only": 2 * 8 * nbytes / 20e6 / comm_only * 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="MiB")
    ap.add_argument("--quick", action="store_true", help="sizes 1 4, no gRPC 16 MB")
    args = ap.parse_args()
    sizes = [1, 4] if args.quick else args.sizes
    out = {
        "host": platform.node(),
        "python": platform.python_version(),
        "sleep_precision": cs.measure_sleep_precision(),
        "tcp": [],
        "grpc": [],
    }
    print(f"{'link':36s} {'path':5s} {'MiB':>4s} {'measured s':>11s} {'model s':>9s} {'ratio':>7s} {'err %':>6s}")
    for name, make in links().items():
        for mb in sizes:
            meas, pred, st = tcp_upload(make, mb * MB)
            out["tcp"].append(
                {
                    "link": name,
                    "mib": mb,
                    "measured_s": meas,
                    "predicted_s": pred,
                    "ratio": meas / pred,
                    "timing_error": st,
                }
            )
            print(
                f"{name:36s} {'tcp':5s} {mb:4d} {meas:11.4f} {pred:9.4f} {meas / pred:7.4f} {100 * (meas / pred - 1):6.2f}"
            )
        for mb in sizes[:2]:
            meas, pred = grpc_upload(make, mb * MB)
            out["grpc"].append({"link": name, "mib": mb, "measured_s": meas, "predicted_s": pred, "ratio": meas / pred})
            print(
                f"{name:36s} {'grpc':5s} {mb:4d} {meas:11.4f} {pred:9.4f} {meas / pred:7.4f} {100 * (meas / pred - 1):6.2f}"
            )
    vr = virtual_vs_real()
    out["virtual_vs_real"] = vr
    print(
        f"virtual vs real (3 x [1 MiB up, 50 ms server, 1 MiB down, 20 ms edge], static 20 Mbit/s 10 ms): "
        f"virtual {vr['virtual_s']:.4f} s, real {vr['real_s']:.4f} s, ratio {vr['ratio']:.4f}; "
        f"wall speedup {vr['speedup_with_compute']:.1f}x (compute really run), "
        f"{vr['simulated_per_wall_comm_only']:.0f}x for the link part alone"
    )
    sp = out["sleep_precision"]
    print(
        "sleep precision (1 ms absolute wake-ups): time.sleep p50 {:.3f} ms p99 {:.3f} ms; asyncio p50 {:.3f} ms "
        "p99 {:.3f} ms".format(
            sp["time_sleep"]["p50_ms"],
            sp["time_sleep"]["p99_ms"],
            sp["asyncio_call_at"]["p50_ms"],
            sp["asyncio_call_at"]["p99_ms"],
        )
    )
    path = ROOT / "benchmarks" / "results" / "channel_accuracy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
