"""Load: N concurrent edge clients (threads, tiny model) against one server on loopback for D seconds.

Checks what matters under load: no deadlock (every client finishes), every adapter a client pushed is
counted in its round's aggregation, memory stays bounded (server-process RSS sampled every second).
Reports per-step round-trip latency (edge sends h -> receives dL/dh: network + queueing + server compute)
p50/p99 and throughput (split steps per second, all clients together). Prints a table and writes
benchmarks/results/load.json.

    .venv/bin/python benchmarks/load.py [--clients 32 --duration 60 --mode sfl-v2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load_config(
    num_clients: int,
    mode: str = "sfl-v2",
    local_steps: int = 5,
    max_rounds: int = 100000,
    max_workers: int | None = None,
    overrides: list[str] | None = None,
):
    """The load's tiny config; `overrides` (`a.b=value`, as `--set`) change it, e.g. the model or
    `training.server_batch`."""
    from splitwave.common.config import parse_config

    return parse_config(
        {
            "seed": 0,
            "num_clients": num_clients,
            "model": {"family": "bert", "tiny": True, "task": "seq-cls", "num_labels": 2, "cut": 2},
            "lora": {"r": 4, "alpha": 8},
            "data": {"dataset": "synthetic", "num_train": 16 * num_clients, "num_eval": 32, "max_seq_len": 16},
            "training": {"mode": mode, "batch_size": 8, "local_steps": local_steps, "optim": {"lr": 0.003}},
            "rounds": {"num_rounds": max_rounds, "deadline_s": 120, "eval_every": 1000000},
            "server": {"max_workers": max_workers or 32},
        },
        overrides,
    )


def run_load(
    num_clients: int = 32,
    duration_s: float = 60.0,
    mode: str = "sfl-v2",
    local_steps: int = 5,
    max_rounds: int = 100000,
    run_dir: Path | None = None,
    max_workers: int | None = None,
    overrides: list[str] | None = None,
    min_rounds: int = 0,
    max_wait_s: float = 600.0,
) -> dict:
    """Run the load for `duration_s` of training, and on until `min_rounds` rounds closed (a loaded host can
    be too slow to close one in a short run; bounded by `max_wait_s`)."""
    import tempfile

    from splitwave.edge.client import ClientOptions, EdgeClient
    from splitwave.server.app import SplitServer
    from splitwave.server.service import start_server

    cfg = load_config(num_clients, mode, local_steps, max_rounds, max_workers, overrides)
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="splitwave-load-"))
    app = SplitServer(cfg, run_dir, cache_dir=ROOT / ".cache" / "bundles")
    srv = start_server(app, max_workers=max_workers)
    rss, rss_t = [_rss()], [time.monotonic()]
    clients: dict[str, EdgeClient] = {}
    errors: dict[str, BaseException] = {}
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.wait(1.0):
            rss.append(_rss())
            rss_t.append(time.monotonic())

    def go(name):
        c = EdgeClient(srv.address, ClientOptions(name=name, cache_dir=ROOT / ".cache" / "edge-tests", threads=1))
        clients[name] = c
        try:
            c.run()
        except BaseException as e:  # noqa: BLE001 - reported
            errors[name] = e
        finally:
            c.close()

    threading.Thread(target=sample, daemon=True).start()
    threads = [threading.Thread(target=go, args=(f"edge-{i:02d}",), daemon=True) for i in range(num_clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    # the clock starts once every client trains; stop the run after `duration_s`
    while app.rounds.round_idx == 0 and not app.rounds.is_open and time.monotonic() - t0 < 120:
        time.sleep(0.1)
    t_train = time.monotonic()
    while not app.rounds.stopped and (
        time.monotonic() - t_train < duration_s
        or (app.rounds.round_idx < min_rounds and time.monotonic() - t_train < max_wait_s)
    ):
        time.sleep(0.2)
    app.rounds.stop("duration")
    for t in threads:
        t.join(120)
    wall = time.monotonic() - t_train
    deadlocked = [t.name for t in threads if t.is_alive()]
    stop_sampling.set()
    peak_active = dict(srv.servicer.active)
    srv.stop(1.0)

    steps = [r for c in clients.values() for r in c.history if r["kind"] == "step"]
    lat = np.array([r["roundtrip_s"] for r in steps]) if steps else np.zeros(1)
    pushed = {(r["client"], r["round"]) for c in clients.values() for r in c.history if r["kind"] == "push"}
    metrics = run_dir / "server_metrics.jsonl"  # absent when no round closed (a short run of a big model)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    counted = {(c, ln["round"]) for ln in lines for c in ln["reported"]}
    # a push into the round that the stop interrupted is not aggregated: that round never closes
    closed = {ln["round"] for ln in lines}
    lost = sorted(p for p in pushed - counted if p[1] in closed)
    return {
        "clients": num_clients,
        "mode": mode,
        "duration_s": round(wall, 1),
        "rounds_closed": len(lines),
        "steps": len(steps),
        "throughput_steps_per_s": round(len(steps) / wall, 1),
        "step_latency_p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
        "step_latency_p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2),
        "adapters_pushed": len(pushed),
        "adapters_counted": len(counted),
        "adapters_lost": lost,
        "rss_start_mb": round(rss[0] / 2**20),
        "rss_peak_mb": round(max(rss) / 2**20),
        "rss_end_mb": round(rss[-1] / 2**20),
        # after every client's runtime is loaded and a few rounds ran: growth after this point would be a leak
        "rss_after_10s_mb": round(next((r for r, t in zip(rss, rss_t) if t >= t_train + 10), rss[-1]) / 2**20),
        "errors": {k: repr(v)[:200] for k, v in errors.items()},
        "deadlocked": deadlocked,
        "open_calls_after": {k: v for k, v in peak_active.items() if v},
        **({"server_batching": app.trainer.batcher.stats()} if app.trainer.batcher is not None else {}),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--mode", default="sfl-v2", choices=["sl", "sfl-v1", "sfl-v2"])
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = run_load(args.clients, args.duration, args.mode, args.local_steps)
    for k, v in res.items():
        print(f"{k:>24}: {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if not (res["errors"] or res["deadlocked"] or res["adapters_lost"]) else 1


if __name__ == "__main__":
    sys.exit(main())
