"""The outputs of a run: per-round records (metrics.jsonl), summary.json and PNG plots.

Virtual mode (the simulation engine, splitwave.sim): every figure of a record is counted (bytes, from the
server's transport meter) or on the virtual clock (round times and their breakdown); nothing measured on the
wall clock goes into metrics.jsonl, so two runs of one config give the same file. Real processes (`none`,
`realtime`): accuracy/loss from the server, training bytes per direction (the server's exact transport byte
counts), the measured wall-clock round time, and in realtime mode the simulated round time with its latency
breakdown (the edges' measured records replayed through the link models, `splitwave.timeline`), compared
with the measured round times: that is the agreement figure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from splitwave.timeline import (
    PARTS,
    estimate_close_times,
    eval_times,
    measured_round_times,
    rounds_from_records,
    simulate_timeline,
)

log = logging.getLogger(__name__)

TRAIN_METHODS = ("Train", "PushAdapter", "AwaitRound")
# the latency parts drawn, bottom up (the engine adds `offline` and `deadline`)
PLOT_PARTS = (*PARTS[:5], "offline", *PARTS[5:], "deadline")


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


def edge_codecs(edge_records: dict[str, list[dict]], round_idx: int) -> dict[str, dict[str, int]]:
    """Steps per codec and direction in one round, from the edges' step records (real processes; the engine
    counts its own): {"up": {"fp16": 24}, "down": {"raw": 24}}."""
    out: dict[str, dict[str, int]] = {}
    for recs in edge_records.values():
        for rec in recs:
            if rec.get("kind") != "step" or rec.get("round") != round_idx:
                continue
            for d in ("up", "down"):
                codec = rec.get(f"codec_{d}")
                if codec:
                    out.setdefault(d, {})[codec] = out.get(d, {}).get(codec, 0) + 1
    return {d: dict(sorted(c.items())) for d, c in sorted(out.items(), reverse=True)}


def agreement(sim: list[float], real: list[float], first: int = 1) -> dict:
    """Relative error of simulated vs measured round times over rounds >= `first` (round 0 carries the
    edges' start-up skew, which the simulation leaves out)."""
    pairs = [(s, r) for s, r in list(zip(sim, real))[first:] if r > 0]
    if not pairs:
        return {"rounds_compared": 0}
    errs = [s / r - 1.0 for s, r in pairs]
    return {
        "rounds_compared": len(pairs),
        "mean_abs_rel_err": sum(abs(e) for e in errs) / len(errs),
        "max_abs_rel_err": max(abs(e) for e in errs),
        "per_round_rel_err": errs,
        "total_ratio": sum(s for s, _ in pairs) / sum(r for _, r in pairs),
    }


def _no_phase(name: str, detail: str = "") -> None:
    pass


def merge_rounds(
    cfg,
    mode: str,
    clients: list[str],
    edge_records: dict[str, list[dict]],
    lines: list[dict],
    links_factory: Callable | None,
    phase: Callable = _no_phase,
) -> tuple[list[dict], list | None, list[float]]:
    """(per-round records, virtual timeline or None, measured round times)."""
    real = measured_round_times(clients, edge_records, lines)
    close = estimate_close_times(lines, edge_records)
    timeline = None
    if mode == "realtime" and links_factory is not None:
        phase("replay", f"{len(lines)} rounds of {len(clients)} clients through the link models (virtual time)")
        work = rounds_from_records(clients, edge_records, lines)
        timeline = simulate_timeline(links_factory(), work, close, eval_times(lines))
    byts = round_bytes(lines)
    recs, real_t = [], 0.0
    for r, line in enumerate(lines):
        cm = line.get("clients", {}) or {}
        losses = [m["train_loss"] for m in cm.values() if "train_loss" in m]
        real_t += real[r]
        rec = {
            "round": r,
            "eval_accuracy": line.get("eval_accuracy"),
            "eval_loss": line.get("eval_loss"),
            "train_loss": sum(losses) / len(losses) if losses else None,
            "reported": line.get("reported"),
            "late": line.get("late"),
            **byts[r],
            "real_round_s": real[r],
            "real_time_s": real_t,
            "server_round_wall_s": line.get("round_wall_s"),
            "server_close_s": close[r],
            "server_eval_s": line.get("eval_s"),
            "codecs": edge_codecs(edge_records, line.get("round", r)),
        }
        if line.get("pre_eval"):  # the global model before training (round 0's line only)
            rec["pre_eval_accuracy"] = line["pre_eval"].get("eval_accuracy")
            rec["pre_eval_loss"] = line["pre_eval"].get("eval_loss")
        if "eval_perplexity" in line:  # causal LM: exp(loss per labelled token)
            rec["eval_perplexity"] = line["eval_perplexity"]
        # text generation scores (generation.num_prompts > 0): gen_bleu, gen_rouge_l, gen_nist, gen_len, gen_s
        rec.update({k: v for k, v in line.items() if k.startswith("gen_")})
        if line.get("pre_eval"):
            rec.update({f"pre_{k}": v for k, v in line["pre_eval"].items() if k.startswith("gen_")})
        if timeline is not None:
            tl = timeline[r]
            rec.update(
                sim_round_s=tl.duration,
                sim_time_s=tl.close,
                breakdown=tl.breakdown,
                critical_client=clients[tl.critical_client] if tl.critical_client >= 0 else None,
                per_client={clients[p["client"]]: {k: v for k, v in p.items() if k != "client"} for p in tl.per_client},
            )
        else:  # no channel: simulated time is the measured time
            rec.update(sim_round_s=real[r], sim_time_s=real_t, breakdown=None)
        recs.append(rec)
    return recs, timeline, real


def _save(fig, run_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(run_dir / name, dpi=100, bbox_inches="tight")  # "tight" keeps legends placed outside the axes
    plt.close(fig)
    return name


def _integer_rounds(ax, first: int, last: int) -> None:
    """Round axes show whole rounds only (no 0.5, 1.5 ...): every round up to 15 of them."""
    from matplotlib.ticker import MaxNLocator

    if last - first < 15:
        ax.set_xticks(range(first, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _legend_outside(ax, reverse: bool = False) -> None:
    """Legend right of the axes, never over the data; `reverse` lists a bar stack top-down, as drawn."""
    handles, labels = ax.get_legend_handles_labels()
    if reverse:
        handles, labels = handles[::-1], labels[::-1]
    ax.legend(
        handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False
    )


def critical_summary(recs: list[dict]) -> str:
    """'client-1' if one client was critical in every round, else 'client-1 (rounds 1, 3), client-0 (2)';
    rounds counted from 1 as on the plots."""
    by: dict[str, list[int]] = {}
    for r in recs:
        if r.get("critical_client"):
            by.setdefault(r["critical_client"], []).append(r["round"] + 1)
    if len(by) == 1:
        return next(iter(by))
    return ", ".join(
        f"{c} (round{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})"
        for c, rs in sorted(by.items(), key=lambda kv: -len(kv[1]))
    )


def plot(run_dir: Path, recs: list[dict], title: str) -> list[str]:
    """accuracy.png, bytes.png, latency.png.  Rounds are counted from 1 (round r of metrics.jsonl is drawn
    at r + 1) so that 0 is the model before training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(recs)
    rounds = [r["round"] + 1 for r in recs]
    files = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    acc = [r["eval_accuracy"] if r["eval_accuracy"] is not None else float("nan") for r in recs]
    sim_t = [r["sim_time_s"] for r in recs]
    pre = recs[0].get("pre_eval_accuracy") if recs else None
    if pre is not None:
        ax[0].plot([0], [pre], "s", color="gray", label="before training")
        ax[1].plot([0.0], [pre], "s", color="gray", label="before training")
        ax[0].plot([0] + rounds, [pre] + acc, "-", color="C0", alpha=0.4)
        ax[1].plot([0.0] + sim_t, [pre] + acc, "-", color="C0", alpha=0.4)
    ax[0].plot(rounds, acc, "o-", color="C0", label="after the round")
    ax[1].plot(sim_t, acc, "o-", color="C0", label="after the round")
    _integer_rounds(ax[0], 0 if pre is not None else 1, n)
    ax[0].set_ylabel("eval accuracy (global model)")
    ax[1].set_xlabel("simulated time (s)")
    for a in ax:
        a.grid(alpha=0.3)
    _legend_outside(ax[1])
    fig.suptitle(f"{title}: accuracy")
    files.append(_save(fig, run_dir, "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.4
    ax.bar([x - w / 2 for x in rounds], [r["bytes_up"] / 1e6 for r in recs], w, label="uplink")
    ax.bar([x + w / 2 for x in rounds], [r["bytes_down"] / 1e6 for r in recs], w, label="downlink")
    _integer_rounds(ax, 1, n)
    ax.set_ylabel("MB (training traffic, all clients)")
    _legend_outside(ax)
    ax.set_title(f"{title}: bytes per round")
    files.append(_save(fig, run_dir, "bytes.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * n
    if recs and all(r.get("breakdown") for r in recs):
        for part in PLOT_PARTS:
            vals = [r["breakdown"].get(part, 0.0) for r in recs]
            if not any(vals):
                continue
            ax.bar(rounds, vals, 0.6, bottom=bottom, label=part.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, vals)]
        if all(r.get("real_round_s") is not None for r in recs):  # real processes: their measured round time
            ax.plot(rounds, [r["real_round_s"] for r in recs], "k_", markersize=20, mew=2, label="measured (wall)")
        ax.set_title(f"{title}: round latency of the critical client: {critical_summary(recs)}", fontsize=10)
    else:
        ax.bar(rounds, [r["real_round_s"] for r in recs], 0.6, label="measured round time")
        ax.set_title(f"{title}: round latency (measured, no channel model)", fontsize=10)
    _integer_rounds(ax, 1, n)
    ax.set_ylabel("seconds")
    _legend_outside(ax, reverse=True)
    files.append(_save(fig, run_dir, "latency.png"))
    return files


def engine_records(lines: list[dict], pre_eval: dict | None = None) -> list[dict]:
    """metrics.jsonl records of an engine run (splitwave.sim.run.round_line per round)."""
    byts = round_bytes(lines)
    recs = []
    for r, line in enumerate(lines):
        cm = line.get("clients") or {}
        losses = [m["train_loss"] for m in cm.values() if "train_loss" in m]
        sim = line["sim"]
        rec = {
            "round": line["round"],
            "eval_accuracy": line.get("eval_accuracy"),
            "eval_loss": line.get("eval_loss"),
            "train_loss": sum(losses) / len(losses) if losses else None,
            "reported": line.get("reported"),
            "late": line.get("late"),
            **byts[r],
            "sim_round_s": sim["duration"],
            "sim_time_s": sim["close"],
            "breakdown": sim["breakdown"],
            "critical_client": sim["critical_client"],
            "per_client": sim["per_client"],
            "server_close_s": sim["close_s"],
            "server_eval_s": sim["eval_s"],
            "codecs": line.get("codecs") or {},  # {"up": {codec: steps}, "down": {...}}
        }
        if r == 0 and pre_eval:
            rec["pre_eval_accuracy"] = pre_eval.get("eval_accuracy")
            rec["pre_eval_loss"] = pre_eval.get("eval_loss")
        if "eval_perplexity" in line:
            rec["eval_perplexity"] = line["eval_perplexity"]
        if line.get("aggregate_refused"):
            rec["aggregate_refused"] = line["aggregate_refused"]
        recs.append(rec)
    return recs


def write_outputs(
    run_dir: Path, cfg, mode: str, recs: list[dict], wall_s: float, extra: dict | None = None, phase=_no_phase
) -> dict:
    """metrics.jsonl, summary.json (with `extra`) and the plots of per-round records."""
    run_dir = Path(run_dir)
    phase("report", f"metrics, summary and plots in {run_dir}")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for rec in recs:
            f.write(json.dumps(rec) + "\n")
    last = recs[-1] if recs else {}
    summary = {
        "name": cfg.name,
        "mode": mode,
        "num_clients": cfg.num_clients,
        "rounds": len(recs),
        "initial_accuracy": recs[0].get("pre_eval_accuracy") if recs else None,
        "final_accuracy": last.get("eval_accuracy"),
        "final_loss": last.get("eval_loss"),
        "total_bytes_up": sum(r["bytes_up"] for r in recs),
        "total_bytes_down": sum(r["bytes_down"] for r in recs),
        "setup_bytes_down": sum(r["bytes_setup_down"] for r in recs),
        "total_sim_time_s": last.get("sim_time_s"),
        "total_real_time_s": last.get("real_time_s"),
        "wall_time_s": wall_s,
        "agreement": None,
        "run_dir": str(run_dir),
        **(extra or {}),
    }
    if "eval_perplexity" in last:
        summary["final_perplexity"] = last["eval_perplexity"]
    try:
        summary["plots"] = plot(run_dir, recs, cfg.name)
    except Exception as e:  # a plot must not lose the run's numbers
        log.warning("plots failed: %s", e)
        summary["plots"] = []
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def write_report(
    run_dir: Path,
    cfg,
    mode: str,
    clients: list[str],
    edge_records: dict[str, list[dict]],
    lines: list[dict],
    links_factory: Callable | None,
    wall_s: float,
    phase: Callable = _no_phase,
) -> dict:
    """The outputs of a run of real processes; `phase(name, detail)` hears of the replay and report phases."""
    run_dir = Path(run_dir)
    recs, timeline, real = merge_rounds(cfg, mode, clients, edge_records, lines, links_factory, phase)
    extra = {}
    if timeline is not None and mode == "realtime":
        sim = [t.duration for t in timeline]
        extra["agreement"] = {
            "round_time": agreement(sim, real),
            # the same without the server's close work (identical on both sides by construction)
            "open_to_last_push": agreement(
                [t.duration - r["server_close_s"] for t, r in zip(timeline, recs)],
                [r["server_round_wall_s"] or 0.0 for r in recs],
            ),
        }
        try:
            stats = json.loads((run_dir / "proxy_stats.json").read_text())
            extra["proxy_timing_error_ms"] = [{d: s[d]["timing_error"] for d in ("uplink", "downlink")} for s in stats]
        except (OSError, ValueError, KeyError):
            pass
    return write_outputs(run_dir, cfg, mode, recs, wall_s, extra, phase)


def _load_run(run_dir: Path) -> tuple[list[dict], dict]:
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return recs, json.loads((Path(run_dir) / "summary.json").read_text())


def compare_runs(virtual_dir: Path, realtime_dir: Path) -> dict:
    """Virtual run vs realtime run of the same config: simulated round times of the first against the
    measured round times of the second (rounds >= 1), the realtime run's own replay agreement, and how
    much faster the virtual run was on the wall clock (whole run, and the training phase alone: the engine's
    event loop against the realtime run's training)."""
    v_recs, v_sum = _load_run(virtual_dir)
    r_recs, r_sum = _load_run(realtime_dir)
    v_train = (v_sum.get("engine") or {}).get("loop_s") or v_sum["total_real_time_s"]
    cross = agreement([r["sim_round_s"] for r in v_recs], [r["real_round_s"] for r in r_recs])
    return {
        "virtual_run": str(virtual_dir),
        "realtime_run": str(realtime_dir),
        "virtual_sim_round_s": [r["sim_round_s"] for r in v_recs],
        "realtime_measured_round_s": [r["real_round_s"] for r in r_recs],
        "realtime_replayed_round_s": [r["sim_round_s"] for r in r_recs],
        "agreement_cross_run": cross,
        "agreement_same_run_replay": (r_sum.get("agreement") or {}).get("round_time"),
        "wall_virtual_s": v_sum["wall_time_s"],
        "wall_realtime_s": r_sum["wall_time_s"],
        "wall_speedup": r_sum["wall_time_s"] / v_sum["wall_time_s"],
        "training_wall_virtual_s": v_train,
        "training_wall_realtime_s": r_sum["total_real_time_s"],
        "training_wall_speedup": r_sum["total_real_time_s"] / v_train,
    }
