"""The simulation engine vs real time on the same config: do the engine's simulated round times match the
round times measured with real processes behind shaping proxies, and how much faster is the engine?  Runs
`splitwave simulate` twice (virtual: the engine, with this machine as every device and as the server, so its
cost model is the host's profile; then realtime) on a slow static link, prints the figures side by side and
writes benchmarks/results/virtual_vs_realtime.json.

    .venv/bin/python benchmarks/virtual_vs_realtime.py [--set k=v ...] [--out runs/bench] [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from splitwave.common.config import load_config
from splitwave.report import compare_runs
from splitwave.runner import simulate

ROOT = Path(__file__).resolve().parents[1]

# a slow link (uplink 0.25 Mbit/s, downlink 0.5 Mbit/s, 30 ms one way): communication dominates
SLOW_LINK = [
    "num_clients=2",
    "rounds.num_rounds=3",
    "training.local_steps=8",
    "channel.uplink={kind: static, rate_mbps: 0.25, latency_ms: 30}",
    "channel.downlink={kind: static, rate_mbps: 0.5, latency_ms: 30}",
]


def run(config: str = "configs/quick.yaml", overrides: list[str] | None = None, out: str | None = None) -> dict:
    out = out or tempfile.mkdtemp(prefix="sw-bench-")
    load_at_start = os.getloadavg()  # the realtime half measures wall time: a loaded host shows here
    sets = SLOW_LINK + list(overrides or []) + [f"output_dir={out}"]
    host = ["sim.devices=host", "sim.server_device=host", "sim.availability={}"]  # device factor 1: the host
    v_dir = simulate(load_config(ROOT / config, sets + host + ["channel.mode=virtual"]), progress=False)
    r_dir = simulate(load_config(ROOT / config, sets + ["channel.mode=realtime"]), progress=False)
    res = compare_runs(v_dir, r_dir)
    res["config"], res["overrides"] = config, sets
    res["load_average_at_start"] = list(load_at_start)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quick.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", help="runs folder (default: a temporary one)")
    p.add_argument(
        "--results",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "virtual_vs_realtime.json",
        help="where the figures go as JSON (default: benchmarks/results/virtual_vs_realtime.json)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    res = run(args.config, args.set, args.out)
    print(f"{'round':>5} {'engine sim (s)':>16} {'realtime measured (s)':>22} {'realtime replay (s)':>20}")
    for i, (v, m, rp) in enumerate(
        zip(res["virtual_sim_round_s"], res["realtime_measured_round_s"], res["realtime_replayed_round_s"])
    ):
        print(f"{i:>5} {v:>16.3f} {m:>22.3f} {rp:>20.3f}" + ("   (start-up skew: not compared)" if i == 0 else ""))
    c, s = res["agreement_cross_run"], res["agreement_same_run_replay"] or {}
    print(
        f"agreement, engine run vs realtime run  : mean |err| {c['mean_abs_rel_err']:.2%}, max {c['max_abs_rel_err']:.2%},"
        f" total ratio {c['total_ratio']:.4f}"
    )
    if s.get("rounds_compared"):
        print(
            f"agreement, realtime replay vs measured : mean |err| {s['mean_abs_rel_err']:.2%}, "
            f"max {s['max_abs_rel_err']:.2%}, total ratio {s['total_ratio']:.4f}"
        )
    print(
        f"wall time: engine {res['wall_virtual_s']:.1f} s, realtime {res['wall_realtime_s']:.1f} s -> "
        f"{res['wall_speedup']:.1f}x (training phase: {res['training_wall_speedup']:.1f}x)"
    )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(res, indent=1))
    print(f"written {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
