"""Load: N concurrent edge clients (threads, tiny model) against one in-process server on loopback.

Checks what matters under load: no deadlock (every client finishes), every adapter a client pushed is
counted in its round's aggregation, memory stays bounded (this process's RSS, sampled every second).
Measures per-step round-trip latency (edge sends h -> receives dL/dh: network + queueing + server compute)
and throughput (split steps per second, all clients together). Used by benchmarks/load.py,
benchmarks/server_batching.py and tests/test_load.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from splitwave.common.config import ExperimentConfig
from splitwave.edge.client import ClientOptions, EdgeClient
from splitwave.inprocess import tiny_config
from splitwave.server.app import SplitServer
from splitwave.server.service import start_server


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def loadtest_config(
    num_clients: int,
    mode: str = "sfl-v2",
    local_steps: int = 5,
    max_rounds: int = 100000,
    max_workers: int | None = None,
    overrides: list[str] | None = None,
) -> ExperimentConfig:
    """The load's config: `splitwave.inprocess.TINY_CONFIG` with `num_clients` clients (16 samples each),
    rounds until stopped, no evaluation; `overrides` (`a.b=value`, as `--set`) change it, e.g. the model or
    `training.server_batch`."""
    return tiny_config(
        overrides,
        num_clients=num_clients,
        data={"num_train": 16 * num_clients},
        training={"mode": mode, "local_steps": local_steps},
        rounds={"num_rounds": max_rounds, "deadline_s": 120, "eval_every": 1000000},
        server={"max_workers": max_workers or 32},
    )


def run_load(
    num_clients: int = 32,
    duration_s: float = 60.0,
    mode: str = "sfl-v2",
    local_steps: int = 5,
    max_rounds: int = 100000,
    run_dir: str | os.PathLike | None = None,
    max_workers: int | None = None,
    overrides: list[str] | None = None,
    min_rounds: int = 0,
    max_wait_s: float = 600.0,
    bundle_cache: str | os.PathLike = ".cache/bundles",
    edge_cache: str | os.PathLike = ".cache/edge",
) -> dict[str, Any]:
    """Run the load for `duration_s` of training, and on until `min_rounds` rounds closed (a loaded host can
    be too slow to close one in a short run; bounded by `max_wait_s`). The result: rounds, steps, latency
    percentiles, adapters pushed/counted/lost, RSS over the run, errors and clients that never finished."""
    cfg = loadtest_config(num_clients, mode, local_steps, max_rounds, max_workers, overrides)
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="splitwave-load-"))
    app = SplitServer(cfg, run_dir, cache_dir=Path(bundle_cache))
    srv = start_server(app, max_workers=max_workers)
    rss, rss_t = [_rss()], [time.monotonic()]
    clients: dict[str, EdgeClient] = {}
    errors: dict[str, BaseException] = {}
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(1.0):
            rss.append(_rss())
            rss_t.append(time.monotonic())

    def go(name: str) -> None:
        c = EdgeClient(srv.address, ClientOptions(name=name, cache_dir=Path(edge_cache), threads=1))
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
