"""Load: N concurrent edge clients (threads, tiny model) against one server on loopback for D seconds.

Checks what matters under load: no deadlock (every client finishes), every adapter a client pushed is
counted in its round's aggregation, memory stays bounded (server-process RSS sampled every second).
Reports per-step round-trip latency (edge sends h -> receives dL/dh: network + queueing + server compute)
p50/p99 and throughput (split steps per second, all clients together). The load itself is
`splitwave.loadtest.run_load`. Prints a table and writes benchmarks/results/load.json.

    .venv/bin/python benchmarks/load.py [--clients 32 --duration 60 --mode sfl-v2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from splitwave.loadtest import run_load

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_CACHE = ROOT / ".cache" / "bundles"
EDGE_CACHE = ROOT / ".cache" / "edge-tests"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--mode", default="sfl-v2", choices=["sl", "sfl-v1", "sfl-v2"])
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = run_load(
        args.clients, args.duration, args.mode, args.local_steps, bundle_cache=BUNDLE_CACHE, edge_cache=EDGE_CACHE
    )
    for k, v in res.items():
        print(f"{k:>24}: {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if not (res["errors"] or res["deadlocked"] or res["adapters_lost"]) else 1


if __name__ == "__main__":
    sys.exit(main())
