"""Scale of the simulation engine: 10 / 100 / 1,000 MiniLM clients (configs/cell-1000.yaml, 5% per round), and
beside the sizes that real processes can still do, the same config run with one edge process per client
(`channel.mode: none`).

Per size: wall seconds per round (the engine's event loop), host seconds per simulated client step, where
the loop's wall time went (server logic and math, edge math, the engine itself: its overhead), the peak RSS of
the whole process tree (sampled every 0.2 s from /proc), and the bytes an idle client holds. Each run is a
fresh `splitwave simulate` process. Prints a table and writes benchmarks/results/sim_scale.json.

The Flower-equivalent workload (`--flower`, on by default): 1,000 clients, 8 sampled per round, 5 local steps
of batch 16 -- the sampled work Flower 1.42 on Ray was measured with on this kind of machine (1,000 MiniLM LoRA
clients, whole model on the client, 2 actors: 11-13 s per round, 13-16 s to start, 2.8-3.9 GB process tree;
figures from the issue that asked for the engine). Its round time excludes the global evaluation (Flower's
figure has none); the evaluation's wall time is reported beside it.

    .venv/bin/python benchmarks/sim_scale.py [--sizes 10 32 100 1000] [--rounds 3] [--compare 10 32] [--no-flower]
        [--set k=v ...] [--results FILE]
    # the Flower-equivalent round alone, int8 edges on two workers (docs/results.md has every variant's runs)
    .venv/bin/python benchmarks/sim_scale.py --sizes --compare --set edge.quantize=int8 \
        --set training.edge_mode=saved --set sim.workers=2 --results /tmp/flower-int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Flower 1.42 on Ray, 2 actors, 1,000 MiniLM LoRA clients, 8 sampled x 5 steps x batch 16 (see the docstring)
FLOWER = {"round_s": (11.0, 13.0), "start_s": (13.0, 16.0), "tree_gb": (2.8, 3.9)}
FLOWER_WORKLOAD = [
    "rounds.fraction=0.008",
    "rounds.min_clients=8",
    "training.local_steps=5",
    "training.batch_size=16",
    "rounds.eval_every=1000",  # only the final round evaluates
    # the same work as Flower's rounds: every sampled client online and done (no dropout, no offline spell,
    # no deadline), so each round is 8 x 5 = 40 client steps
    "sim.availability={}",
    "rounds.deadline_s=86400",
]
FLOWER_STEPS_PER_ROUND = 40


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            status = (p / "status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(p.name))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(p.name)] = int(line.split()[1]) * 1024
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        total += rss.get(q, 0)
        todo.extend(children.get(q, []))
    return total


def run_one(config: str, n: int, rounds: int, mode: str, out: Path, extra: list[str]) -> dict:
    """One `splitwave simulate` of `config` with n clients; its summary, wall time and peak tree RSS."""
    sets = [
        f"num_clients={n}",
        f"rounds.num_rounds={rounds}",
        "rounds.min_clients=1",  # 5% of 10 clients is one
        f"channel.mode={mode}",
        f"output_dir={out}",
        *extra,
    ]
    argv = [sys.executable, "-m", "splitwave.cli", "-q", "simulate", config]
    for s in sets:
        argv += ["--set", s]
    peak, done = [0], threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    log, _ = proc.communicate()
    done.set()
    th.join()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"simulate {mode} n={n} failed:\n{log[-3000:]}")
    run_dir = Path(next(line for line in log.splitlines() if line.startswith("report: ")).split(": ", 1)[1])
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"summary": summary, "records": recs, "process_wall_s": wall, "peak_tree_rss": peak[0]}


def engine_row(n: int, res: dict) -> dict:
    e, s = res["summary"]["engine"], res["summary"]
    loop = e["loop_s"]
    return {
        "clients": n,
        "rounds": s["rounds"],
        "client_steps": e["client_steps"],
        "wall_per_round_s": loop / s["rounds"],
        "host_s_per_client_step": loop / max(e["client_steps"], 1),
        "server_share": e["server_s"] / loop,
        "edge_wait_share": e["edge_wait_s"] / loop,
        "engine_overhead_share": e["engine_overhead_s"] / loop,
        "setup_s": e["setup_s"],
        "process_wall_s": res["process_wall_s"],
        "peak_tree_rss_mb": res["peak_tree_rss"] / 2**20,
        "idle_client_bytes_mean": e["idle_client_bytes_mean"],
        "idle_client_bytes_max": e["idle_client_bytes_max"],
        "final_accuracy": s["final_accuracy"],
        "sim_time_s": s["total_sim_time_s"],
        "eval_wall_s": e.get("eval_wall_s", 0.0),
        "pre_eval_wall_s": e.get("pre_eval_wall_s", 0.0),
        "train_wall_per_round_s": (loop - e.get("eval_wall_s", 0.0)) / s["rounds"],
        "setup_without_pre_eval_s": e["setup_s"] - e.get("pre_eval_wall_s", 0.0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cell-1000.yaml")
    p.add_argument("--sizes", type=int, nargs="*", default=[10, 32, 100, 1000])
    p.add_argument("--compare", type=int, nargs="*", default=[10, 32], help="sizes also run as real processes")
    p.add_argument("--no-flower", dest="flower", action="store_false", help="skip the Flower-equivalent workload")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="extra override for every run")
    p.add_argument("--out", type=Path, help="runs folder (default: a temporary one)")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "sim_scale.json")
    args = p.parse_args()
    load_at_start = list(os.getloadavg())
    out = args.out or Path(tempfile.mkdtemp(prefix="sw-scale-"))
    rows, procs = [], {}
    for n in args.sizes:
        rows.append(engine_row(n, run_one(args.config, n, args.rounds, "virtual", out, args.set)))
        print(json.dumps(rows[-1]), flush=True)
    flower = None
    if args.flower:
        flower = engine_row(1000, run_one(args.config, 1000, args.rounds, "virtual", out, args.set + FLOWER_WORKLOAD))
        want = FLOWER_STEPS_PER_ROUND * flower["rounds"]
        if flower["client_steps"] != want:  # a like-for-like comparison or none
            raise RuntimeError(f"Flower-equivalent run did {flower['client_steps']} client steps, not {want}")
        print(json.dumps(flower), flush=True)
    for n in args.compare:
        res = run_one(args.config, n, args.rounds, "none", out, args.set)
        s = res["summary"]
        procs[n] = {
            "clients": n,
            "wall_per_round_s": s["total_real_time_s"] / s["rounds"],
            "process_wall_s": res["process_wall_s"],
            "peak_tree_rss_mb": res["peak_tree_rss"] / 2**20,
        }
        print(json.dumps(procs[n]), flush=True)
    for r in rows:
        pr = procs.get(r["clients"])
        if pr:
            r["vs_processes"] = {
                "wall_per_round_ratio": r["wall_per_round_s"] / pr["wall_per_round_s"],
                "peak_tree_rss_ratio": r["peak_tree_rss_mb"] / pr["peak_tree_rss_mb"],
            }
    sizes = sorted(rows, key=lambda r: r["clients"])
    growth = None
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        growth = (b["peak_tree_rss_mb"] - a["peak_tree_rss_mb"]) * 2**20 / (b["clients"] - a["clients"])
    print()
    print(
        f"{'clients':>7} {'wall/round s':>12} {'s/client-step':>13} {'server':>7} {'edge':>6} {'engine':>7} "
        f"{'tree RSS MB':>11} {'idle client KB':>14} {'vs processes (wall, RSS)':>25}"
    )
    for r in sizes:
        vs = r.get("vs_processes")
        ratio = f"{vs['wall_per_round_ratio']:.2f}x, {vs['peak_tree_rss_ratio']:.3f}x" if vs else "-"
        print(
            f"{r['clients']:>7} {r['wall_per_round_s']:>12.2f} {r['host_s_per_client_step']:>13.3f} "
            f"{r['server_share']:>7.1%} {r['edge_wait_share']:>6.1%} {r['engine_overhead_share']:>7.1%} "
            f"{r['peak_tree_rss_mb']:>11.0f} {r['idle_client_bytes_mean'] / 1024:>14.1f} {ratio:>25}"
        )
    for n, pr in sorted(procs.items()):
        print(
            f"real processes, {n} clients: {pr['wall_per_round_s']:.2f} s per round, "
            f"tree RSS {pr['peak_tree_rss_mb']:.0f} MB"
        )
    if growth is not None:
        print(
            f"peak tree RSS growth per added client ({sizes[-2]['clients']} -> {sizes[-1]['clients']}): {growth:.0f} B"
        )
    if flower is not None:
        lo, hi = FLOWER["round_s"]
        print(
            f"Flower-equivalent workload (1,000 clients, 8 x 5 steps x batch 16): "
            f"{flower['train_wall_per_round_s']:.2f} s per round without evaluation "
            f"(Flower 1.42 on Ray: {lo:.0f}-{hi:.0f} s -> {flower['train_wall_per_round_s'] / lo:.2f}-"
            f"{flower['train_wall_per_round_s'] / hi:.2f}x), final evaluation {flower['eval_wall_s']:.1f} s; "
            f"setup {flower['setup_without_pre_eval_s']:.1f} s without the pre-training evaluation "
            f"({flower['pre_eval_wall_s']:.1f} s), whole process {flower['process_wall_s']:.1f} s; "
            f"tree RSS {flower['peak_tree_rss_mb']:.0f} MB (Flower: {FLOWER['tree_gb'][0]}-{FLOWER['tree_gb'][1]} GB)"
        )
    res = {
        "config": args.config,
        "rounds": args.rounds,
        "overrides": args.set,
        "engine": sizes,
        "processes": list(procs.values()),
        "rss_growth_per_client_bytes": growth,
        "flower_workload": flower,
        "flower_reference": FLOWER,
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
    }
    dest = args.results
    dest.write_text(json.dumps(res, indent=1))
    print(f"written {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
