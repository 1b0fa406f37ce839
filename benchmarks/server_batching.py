"""Server batching: N concurrent clients against one sfl-v2 server, unfused (`server_batch` 1) vs fused steps.

Runs benchmarks/load.py's load (`splitwave.loadtest.run_load`: N edge clients in threads, loopback gRPC,
D seconds each) once per `training.server_batch` value in one process, alternating the values over
`--repeats`, and prints total split steps/s, p50/p99 step round trip (edge sends h -> receives dL/dh) and
the ratio to server_batch 1. Then the server's compute alone: one fused step of K full-length batches (no
network, no edges), per server step and per client step, which is what fusing saves. Writes
benchmarks/results/server_batching.json. Tiny BERT by default (about a minute); `--minilm` uses the real
all-MiniLM-L6-v2 (cut 2, batch 16, SST-2, as benchmarks/split_throughput.py).

    .venv/bin/python benchmarks/server_batching.py [--clients 8 --batches 1,8 --duration 10 --minilm]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from splitwave.loadtest import loadtest_config, run_load
from splitwave.server import compute
from splitwave.server.setup import build_split
from splitwave.server.trainer import StepInput, TopTrainer

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_CACHE = ROOT / ".cache" / "bundles"
EDGE_CACHE = ROOT / ".cache" / "edge-tests"
OUT = ROOT / "benchmarks" / "results" / "server_batching.json"
MINILM = [
    "model.family=minilm",
    "model.tiny=false",
    "lora.r=8",
    "lora.alpha=16",
    "data.dataset=sst2",
    "data.max_seq_len=64",
    "training.batch_size=16",
    "training.optim.lr=1e-4",
]


def measure(
    clients: int, server_batch: int, duration_s: float, wait_ms: float, local_steps: int, base: list[str]
) -> dict:
    overrides = base + [f"training.server_batch={server_batch}", f"training.server_batch_wait_ms={wait_ms}"]
    with tempfile.TemporaryDirectory(prefix="splitwave-batching-") as d:
        res = run_load(
            clients,
            duration_s,
            "sfl-v2",
            local_steps,
            run_dir=Path(d),
            overrides=overrides,
            bundle_cache=BUNDLE_CACHE,
            edge_cache=EDGE_CACHE,
        )
    if res["errors"] or res["deadlocked"] or res["adapters_lost"]:
        raise RuntimeError(f"server_batch={server_batch}: run failed: {res}")
    stats = res.get("server_batching") or {"client_steps": res["steps"], "server_steps": res["steps"]}
    res["mean_fused"] = stats["client_steps"] / max(stats["server_steps"], 1)
    return res


def server_compute(clients: int, values: list[int], base: list[str], reps: int = 30) -> dict[int, float]:
    """Seconds of one fused server step of K clients' full batches (batch_size x max_seq_len), K in values;
    timed on the server's compute thread, where its steps run."""
    cfg = loadtest_config(clients, overrides=base)
    split = compute.run(build_split, cfg)
    trainer = TopTrainer(split, cfg.model.task, lr=cfg.training.optim.lr)
    shape = (cfg.training.batch_size, cfg.data.max_seq_len, split.peft_model.config.hidden_size)
    rng = np.random.default_rng(0)

    def timed(steps) -> float:
        for _ in range(5):
            trainer._train_fused(steps)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            trainer._train_fused(steps)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return {
        k: compute.run(
            timed,
            [
                StepInput(
                    f"c{i}",
                    rng.standard_normal(shape).astype(np.float32),
                    np.ones(shape[:2], np.int64),
                    rng.integers(0, cfg.model.num_labels, shape[0]),
                )
                for i in range(k)
            ],
        )
        for k in values
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batches", default=None, help="server_batch values, comma-separated (default: 1,N)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of training per run")
    p.add_argument("--repeats", type=int, default=2, help="alternating passes over the values (median taken)")
    p.add_argument("--wait-ms", type=float, default=2.0, help="training.server_batch_wait_ms")
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of an unmeasured first run (cold caches)")
    p.add_argument("--minilm", action="store_true", help="the real all-MiniLM-L6-v2 instead of tiny BERT")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the clients' "training is over" warnings at each run's stop
    values = [int(v) for v in (args.batches or f"1,{args.clients}").split(",")]
    if values[0] != 1:
        values.insert(0, 1)  # the ratio is against unfused steps
    base = MINILM if args.minilm else []
    runs: dict[int, list[dict]] = {v: [] for v in values}
    if args.warmup > 0:  # the first run in a process pays for imports, ORT session setup, torch first calls
        measure(args.clients, values[-1], args.warmup, args.wait_ms, args.local_steps, base)
    for _ in range(args.repeats):
        for v in values:
            runs[v].append(measure(args.clients, v, args.duration, args.wait_ms, args.local_steps, base))

    def med(v: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[v])

    rows = []
    for v in values:
        rows.append(
            {
                "server_batch": v,
                "steps_per_s": med(v, "throughput_steps_per_s"),
                "p50_ms": med(v, "step_latency_p50_ms"),
                "p99_ms": med(v, "step_latency_p99_ms"),
                "mean_fused": round(med(v, "mean_fused"), 2),
                "ratio": round(med(v, "throughput_steps_per_s") / med(1, "throughput_steps_per_s"), 2),
                "runs": runs[v],
            }
        )
    model = "all-MiniLM-L6-v2 cut 2, batch 16 x <=64" if args.minilm else "tiny BERT cut 2, batch 8 x 16"
    print(
        f"{args.clients} concurrent clients, sfl-v2, {model}, wait {args.wait_ms} ms, "
        f"{args.duration:.0f} s x {args.repeats} runs each (medians)"
    )
    print(f"{'server_batch':>12} {'steps/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'fused/step':>10} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['server_batch']:>12} {r['steps_per_s']:>9.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['mean_fused']:>10.2f} {r['ratio']:>6.2f}x"
        )
    compute_s = server_compute(args.clients, values, base)
    print("server compute alone (median of 30): K client steps fused into one server step")
    print(f"{'K':>12} {'ms/server step':>15} {'ms/client step':>15} {'speed-up':>9}")
    for k, t in compute_s.items():
        print(f"{k:>12} {t * 1e3:>15.2f} {t * 1e3 / k:>15.2f} {compute_s[1] * k / t:>8.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "clients": args.clients,
                "model": model,
                "wait_ms": args.wait_ms,
                "duration_s": args.duration,
                "repeats": args.repeats,
                "local_steps": args.local_steps,
                "results": rows,
                "server_compute_ms": {k: t * 1e3 for k, t in compute_s.items()},
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
