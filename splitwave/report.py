"""The outputs of a run: merged per-round records (metrics.jsonl), summary.json and PNG plots.

Per round: accuracy/loss from the server, training bytes per direction (from the server's exact transport
byte counts), the measured wall-clock round time, and the simulated round time with its latency breakdown
(virtual timeline of `splitwave.timeline`). In realtime mode the same replay is compared with the measured
round times: that is the agreement figure.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from splitwave.timeline import PARTS, estimate_close_times, measured_round_times, rounds_from_records, \
    simulate_timeline

log = logging.getLogger(__name__)

TRAIN_METHODS = ("Train", "PushAdapter", "AwaitRound")


def round_bytes(lines: list[dict]) -> list[dict]:
    """Per round: bytes per direction for training traffic and for setup (Join, bundle), from the
    cumulative (client|direction|method) counters in the server's lines."""
    out = []
    prev: dict[str, int] = {}
    for line in lines:
        cur = line.get("bytes", {})
        rec = {"bytes_up": 0, "bytes_down": 0, "bytes_setup_up": 0, "bytes_setup_down": 0, "bytes_by_method": {}}
        for key, n in cur.items():
            d = int(n) - int(prev.get(key, 0))
            if d <= 0:
                continue
            _, direction, method = key.split("|")
            train = method in TRAIN_METHODS
            rec[("bytes_" if train else "bytes_setup_") + direction] += d
            m = f"{method}|{direction}"
            rec["bytes_by_method"][m] = rec["bytes_by_method"].get(m, 0) + d
        out.append(rec)
        prev = cur
    return out


def agreement(sim: list[float], real: list[float], first: int = 1) -> dict:
    """Relative error of simulated vs measured round times over rounds >= `first` (round 0 carries the
    edges' start-up skew, which the simulation leaves out)."""
    pairs = [(s, r) for s, r in list(zip(sim, real))[first:] if r > 0]
    if not pairs:
        return {"rounds_compared": 0}
    errs = [s / r - 1.0 for s, r in pairs]
    return {"rounds_compared": len(pairs), "mean_abs_rel_err": sum(abs(e) for e in errs) / len(errs),
            "max_abs_rel_err": max(abs(e) for e in errs), "per_round_rel_err": errs,
            "total_ratio": sum(s for s, _ in pairs) / sum(r for _, r in pairs)}


def merge_rounds(cfg, mode: str, clients: list[str], edge_records: dict[str, list[dict]], lines: list[dict],
                 links_factory: Callable | None) -> tuple[list[dict], list | None, list[float]]:
    """(per-round records, virtual timeline or None, measured round times)."""
    real = measured_round_times(clients, edge_records, lines)
    close = estimate_close_times(lines, edge_records)
    timeline = None
    if mode in ("virtual", "realtime") and links_factory is not None:
        work = rounds_from_records(clients, edge_records, lines)
        timeline = simulate_timeline(links_factory(), work, close)
    byts = round_bytes(lines)
    recs, real_t = [], 0.0
    for r, line in enumerate(lines):
        cm = line.get("clients", {}) or {}
        losses = [m["train_loss"] for m in cm.values() if "train_loss" in m]
        real_t += real[r]
        rec = {"round": r, "eval_accuracy": line.get("eval_accuracy"), "eval_loss": line.get("eval_loss"),
               "train_loss": sum(losses) / len(losses) if losses else None, "reported": line.get("reported"),
               "late": line.get("late"), **byts[r], "real_round_s": real[r], "real_time_s": real_t,
               "server_round_wall_s": line.get("round_wall_s"), "server_close_s": close[r]}
        if "eval_perplexity" in line:  # causal LM: exp(loss per labelled token)
            rec["eval_perplexity"] = line["eval_perplexity"]
        if timeline is not None:
            tl = timeline[r]
            rec.update(sim_round_s=tl.duration, sim_time_s=tl.close, breakdown=tl.breakdown,
                       critical_client=clients[tl.critical_client] if tl.critical_client >= 0 else None,
                       per_client={clients[p["client"]]: {k: v for k, v in p.items() if k != "client"}
                                   for p in tl.per_client})
        else:  # no channel: simulated time is the measured time
            rec.update(sim_round_s=real[r], sim_time_s=real_t, breakdown=None)
        recs.append(rec)
    return recs, timeline, real



def _save(fig, run_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(run_dir / name, dpi=100)
    plt.close(fig)
    return name

def plot(run_dir: Path, recs: list[dict], title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in recs]
    files = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    acc = [r["eval_accuracy"] if r["eval_accuracy"] is not None else float("nan") for r in recs]
    ax[0].plot(rounds, acc, "o-")
    ax[0].set_xlabel("round")
    ax[0].set_ylabel("eval accuracy")
    ax[1].plot([r["sim_time_s"] for r in recs], acc, "o-")
    ax[1].set_xlabel("simulated time (s)")
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(f"{title}: accuracy")
    files.append(_save(fig, run_dir, "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    w = 0.4
    ax.bar([x - w / 2 for x in rounds], [r["bytes_up"] / 1e6 for r in recs], w, label="uplink")
    ax.bar([x + w / 2 for x in rounds], [r["bytes_down"] / 1e6 for r in recs], w, label="downlink")
    ax.set_xlabel("round")
    ax.set_ylabel("MB (training traffic, all clients)")
    ax.legend()
    ax.set_title(f"{title}: bytes per round")
    files.append(_save(fig, run_dir, "bytes.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(recs)
    if all(r.get("breakdown") for r in recs):
        for part in PARTS:
            vals = [r["breakdown"][part] for r in recs]
            ax.bar(rounds, vals, 0.6, bottom=bottom, label=part.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot(rounds, [r["real_round_s"] for r in recs], "k_", markersize=20, label="measured (wall)")
    else:
        ax.bar(rounds, [r["real_round_s"] for r in recs], 0.6, label="measured round time")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: round latency (critical client)")
    files.append(_save(fig, run_dir, "latency.png"))
    return files


def write_report(run_dir: Path, cfg, mode: str, clients: list[str], edge_records: dict[str, list[dict]],
                 lines: list[dict], links_factory: Callable | None, wall_s: float) -> dict:
    run_dir = Path(run_dir)
    recs, timeline, real = merge_rounds(cfg, mode, clients, edge_records, lines, links_factory)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for rec in recs:
            f.write(json.dumps(rec) + "\n")
    last = recs[-1] if recs else {}
    summary = {
        "name": cfg.name, "mode": mode, "num_clients": cfg.num_clients, "rounds": len(recs),
        "final_accuracy": last.get("eval_accuracy"), "final_loss": last.get("eval_loss"),
        "total_bytes_up": sum(r["bytes_up"] for r in recs), "total_bytes_down": sum(r["bytes_down"] for r in recs),
        "setup_bytes_down": sum(r["bytes_setup_down"] for r in recs),
        "total_sim_time_s": last.get("sim_time_s"), "total_real_time_s": last.get("real_time_s"),
        "wall_time_s": wall_s, "agreement": None, "run_dir": str(run_dir),
    }
    if "eval_perplexity" in last:
        summary["final_perplexity"] = last["eval_perplexity"]
    if timeline is not None and mode == "realtime":
        sim = [t.duration for t in timeline]
        summary["agreement"] = {
            "round_time": agreement(sim, real),
            # the same without the server's close work (identical on both sides by construction)
            "open_to_last_push": agreement([t.duration - r["server_close_s"] for t, r in zip(timeline, recs)],
                                           [r["server_round_wall_s"] or 0.0 for r in recs]),
        }
        try:
            stats = json.loads((run_dir / "proxy_stats.json").read_text())
            summary["proxy_timing_error_ms"] = [{d: s[d]["timing_error"] for d in ("uplink", "downlink")}
                                                for s in stats]
        except (OSError, ValueError, KeyError):
            pass
    try:
        summary["plots"] = plot(run_dir, recs, cfg.name)
    except Exception as e:  # a plot must not lose the run's numbers
        log.warning("plots failed: %s", e)
        summary["plots"] = []
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _load_run(run_dir: Path) -> tuple[list[dict], dict]:
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return recs, json.loads((Path(run_dir) / "summary.json").read_text())


def compare_runs(virtual_dir: Path, realtime_dir: Path) -> dict:
    """Virtual run vs realtime run of the same config: simulated round times of the first against the
    measured round times of the second (rounds >= 1), the realtime run's own replay agreement, and how
    much faster the virtual run was on the wall clock (whole run, and the training phase alone)."""
    v_recs, v_sum = _load_run(virtual_dir)
    r_recs, r_sum = _load_run(realtime_dir)
    cross = agreement([r["sim_round_s"] for r in v_recs], [r["real_round_s"] for r in r_recs])
    return {
        "virtual_run": str(virtual_dir), "realtime_run": str(realtime_dir),
        "virtual_sim_round_s": [r["sim_round_s"] for r in v_recs],
        "realtime_measured_round_s": [r["real_round_s"] for r in r_recs],
        "realtime_replayed_round_s": [r["sim_round_s"] for r in r_recs],
        "agreement_cross_run": cross,
        "agreement_same_run_replay": (r_sum.get("agreement") or {}).get("round_time"),
        "wall_virtual_s": v_sum["wall_time_s"], "wall_realtime_s": r_sum["wall_time_s"],
        "wall_speedup": r_sum["wall_time_s"] / v_sum["wall_time_s"],
        "training_wall_virtual_s": v_sum["total_real_time_s"], "training_wall_realtime_s": r_sum["total_real_time_s"],
        "training_wall_speedup": r_sum["total_real_time_s"] / v_sum["total_real_time_s"],
    }
