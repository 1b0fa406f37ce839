"""One engine run: the in-process server, the executor pool, the engine, a progress bar; returns the per-round
lines the report turns into metrics.jsonl (no wall-clock value in them).

`splitwave.runner.simulate` calls this for `channel.mode: virtual` and writes the run folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitwave.channel import LinkPair
from splitwave.common.config import ExperimentConfig
from splitwave.progress import RoundProgress
from splitwave.sim.engine import CostModel, Device, Engine, RoundTiming
from splitwave.sim.executors import make_pool
from splitwave.sim.server import InProcessServer

log = logging.getLogger(__name__)


@dataclass
class EngineRun:
    """What a run produced: per-round lines (the server's record of each round plus its virtual timing),
    the server's pre-training evaluation, where the final adapters are, and wall-clock figures."""

    lines: list[dict]
    pre_eval: dict | None
    server_dir: Path
    bundle_dir: Path
    wall: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def round_line(t: RoundTiming) -> dict:
    """A round as the report reads it: the server's fields (as in server_metrics.jsonl, without its wall
    times) and `sim`, the round on the virtual clock."""
    rec = t.record
    return {
        "round": t.round,
        "selected": rec.selected,
        "reported": rec.reported,
        "late": rec.late,
        "clients": rec.client_metrics,
        "bytes": t.bytes,
        "aggregate_refused": rec.refused or None,
        "codecs": t.codecs,  # steps per codec and direction in the round
        **{k: v for k, v in t.metrics.items() if k.startswith("eval_") and k != "eval_s"},
        "sim": {
            "start": t.start,
            "close": t.close,
            "duration": t.duration,
            "critical_client": t.critical,
            "breakdown": t.breakdown,
            "per_client": t.per_client,
            "close_s": t.close_s,
            "eval_s": t.eval_s,
        },
    }


class _Timed:
    """Wall seconds spent in an object's method calls, for the run's statistics (how much of the wall time is
    the math and how much the engine itself); nothing simulated ever reads them."""

    def __init__(self, obj, totals: dict[str, float], key: str):
        self._obj, self._totals, self._key = obj, totals, key
        totals.setdefault(key, 0.0)

    def __getattr__(self, name: str):
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._totals[self._key] += time.perf_counter() - t0

        return timed


def run_engine(
    cfg: ExperimentConfig,
    run_dir: Path,
    links: Sequence[LinkPair],
    cache_dir: Path,
    costs: Callable[[Path], CostModel],
    devices: Sequence[Device],
    server_factor: float = 1.0,
    executor: str = "local",
    workers: int = 0,
    ray_address: str | None = None,
    server_workers: int = 1,
    progress: bool = True,
) -> EngineRun:
    """Run `cfg` on the engine. `costs(bundle_dir)` gives the cost model once the bundle is known; the server's
    own files (server_metrics.jsonl, final/ adapters) go to run_dir/server."""
    # one OpenMP thread: the server's arithmetic then does not depend on the machine's core count, and a
    # team of threads on a busy machine waits at every operator (measured: a tiny-BERT round 27 s -> 1.7 s)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    server = InProcessServer(cfg, Path(run_dir) / "server", cache_dir)
    app = server.app
    tr = cfg.training
    optim = dict(lr=tr.optim.lr, weight_decay=tr.optim.weight_decay, betas=tr.optim.betas, eps=tr.optim.eps)
    pool = None
    bar = RoundProgress(cfg.rounds.num_rounds, cfg.name, progress, simulated=True)
    try:
        cost_model = costs(app.bundle_dir)
        pool = make_pool(executor, workers, app.bundle_dir, tr.edge_mode, optim, ray_address)
        t_setup = time.perf_counter() - t0
        spent: dict[str, float] = {}
        engine = Engine(
            cfg,
            _Timed(server, spent, "server_s"),  # the server's logic and math, the close's evaluation included
            _Timed(pool, spent, "edge_wait_s"),  # the edge math in process, or waiting for it from the workers
            cost_model,
            devices,
            links,
            server_factor=server_factor,
            server_workers=server_workers,
            on_round=lambda r: bar.round_done(r.round, r.metrics.get("eval_accuracy"), r.close),
            on_event=bar.event,
        )
        joins = dict(spent)
        t1 = time.perf_counter()
        timings = engine.run()
        t_loop = time.perf_counter() - t1
        loop = {k: v - joins.get(k, 0.0) for k, v in spent.items()}
        held = engine.idle_client_bytes()
        stats = {
            "events": engine.q.pushed,
            "client_steps": engine.client_steps,
            "server_steps_by_size": dict(sorted(engine.server_steps.items())),
            "idle_clients": len(held),
            "idle_client_bytes_max": max(held, default=0),
            "idle_client_bytes_mean": sum(held) / max(len(held), 1),
            # wall seconds of the global evaluations (the close's, inside loop_s; the pre-training one, inside
            # setup_s): a benchmark can set the training apart from the evaluation
            "eval_wall_s": sum(float(t.metrics.get("eval_s", 0.0)) for t in timings),
            "pre_eval_wall_s": float((app.pre_eval or {}).get("eval_s", 0.0)),
        }
    finally:
        bar.close()
        if pool is not None:
            pool.close()
        server.shutdown()
    if len(timings) < cfg.rounds.num_rounds:
        raise RuntimeError(f"the engine stopped after {len(timings)} of {cfg.rounds.num_rounds} rounds")
    return EngineRun(
        [round_line(t) for t in timings],
        app.pre_eval,
        Path(run_dir) / "server",
        app.bundle_dir,
        {
            "setup_s": t_setup,
            "loop_s": t_loop,
            **loop,
            "engine_overhead_s": t_loop - sum(loop.values()),  # everything but the server and edge math
        },
        stats,
    )
