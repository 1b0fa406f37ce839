"""`splitwave simulate`: the experiment of a config, written to runs/NAME/TIMESTAMP/.

Channel modes: `virtual` runs on the simulation engine (splitwave.sim: virtual clients as state on a pool of
executors, every time on a virtual clock from the cost model, the devices and the link models);
`none` (plain loopback) and `realtime` (one `ShapingProxy` per client in this process, the edge talks to its
proxy) run one server process and N edge processes on loopback, started by `splitwave.launch`: always
terminated on the way out (Ctrl-C, errors, timeouts), and they die with this process even if it is killed
outright.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

from splitwave import report
from splitwave.channel import Cell, LinkPair, ShapingProxy, make_link_pair, place_clients
from splitwave.common.config import ConfigError, ExperimentConfig, dump_config
from splitwave.launch import LaunchError, ProcessGroup, child_env
from splitwave.progress import RoundProgress
from splitwave.report import write_report
from splitwave.sim.costs import build_cost_model
from splitwave.sim.devices import build_devices, server_factor
from splitwave.sim.run import run_engine

log = logging.getLogger(__name__)

CELL_KEYS = {
    "r_cell_m",
    "d_min_m",
    "bandwidth_mhz",
    "allocation",
    "n_active",
    "distances_m",
    "seed",
    "uplink",
    "downlink",
}


class SimulationError(LaunchError):
    """A run that could not finish: names the process or the timeout and points at its log."""


# ----------------------------------------------------------------------------- links per client
def _merge(default: dict, override: dict | None) -> dict:
    if not override:
        return dict(default)
    if "kind" in override and override["kind"] != default.get("kind"):
        return dict(override)  # another kind of link: the defaults do not apply
    return {**default, **override}


def link_specs(cfg: ExperimentConfig) -> list[dict]:
    """One {"uplink": spec, "downlink": spec} per client (the `make_link_pair` format), seeded per client.

    `channel.cell` set: wireless links, distances drawn in the cell (or `cell.distances_m`), cell keys other
    than CELL_KEYS apply to both directions, `cell.uplink`/`cell.downlink` to one. Otherwise
    `channel.uplink`/`downlink` are the defaults and `channel.per_client[k % len]` overrides client k.
    """
    ch, n = cfg.channel, cfg.num_clients
    specs = []
    if ch.cell is not None:
        cell = ch.cell
        seed = int(cell.get("seed", cfg.seed))
        r_cell, d_min = float(cell.get("r_cell_m", 500.0)), float(cell.get("d_min_m", 35.0))
        dists = cell.get("distances_m")
        if dists is None:
            dists = place_clients(n, r_cell, d_min, [seed, 7]).tolist()
        elif len(dists) < n:
            raise ConfigError(f"channel.cell.distances_m: {len(dists)} distances for {n} clients")
        shared = {k: v for k, v in cell.items() if k not in CELL_KEYS}
        for k in range(n):
            base = {**shared, "kind": "wireless", "distance_m": float(dists[k])}
            up = {**base, **(cell.get("uplink") or {}), "direction": "up", "seed": seed * 1000 + 2 * k}
            down = {**base, **(cell.get("downlink") or {}), "direction": "down", "seed": seed * 1000 + 2 * k + 1}
            pc = ch.per_client[k % len(ch.per_client)] if ch.per_client else {}
            specs.append({"uplink": _merge(up, pc.get("uplink")), "downlink": _merge(down, pc.get("downlink"))})
        return specs
    for k in range(n):
        pc = ch.per_client[k % len(ch.per_client)] if ch.per_client else {}
        unknown = set(pc) - {"uplink", "downlink"}
        if unknown:
            raise ConfigError(
                f"channel.per_client[{k % len(ch.per_client)}]: unknown keys {sorted(unknown)} "
                "(expected uplink, downlink)"
            )
        up, down = _merge(ch.uplink, pc.get("uplink")), _merge(ch.downlink, pc.get("downlink"))
        up.setdefault("seed", cfg.seed * 1000 + 2 * k)
        down.setdefault("seed", cfg.seed * 1000 + 2 * k + 1)
        specs.append({"uplink": up, "downlink": down})
    return specs


def build_links(cfg: ExperimentConfig, specs: list[dict] | None = None) -> list[LinkPair]:
    """Fresh link objects (empty queues) for every client; wireless clients share one cell per direction."""
    specs = specs or link_specs(cfg)
    up_cell = down_cell = None
    if cfg.channel.cell is not None:
        c = cfg.channel.cell
        up_cell = Cell(float(c.get("bandwidth_mhz", 20.0)) * 1e6, c.get("allocation", "equal"), c.get("n_active"))
        down_cell = Cell(float(c.get("bandwidth_mhz", 20.0)) * 1e6, c.get("allocation", "equal"), c.get("n_active"))
    pairs = []
    for k, spec in enumerate(specs):
        try:
            pairs.append(make_link_pair(copy.deepcopy(spec), up_cell, down_cell))
        except (ValueError, KeyError, FileNotFoundError) as e:
            where = "channel.cell" if cfg.channel.cell is not None else "channel.uplink/downlink/per_client"
            raise ConfigError(f"{where} (client {k}): {e}") from None
    return pairs


# ----------------------------------------------------------------------------- the run
def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                break
    return out


def _cache_root() -> Path:
    return Path(os.environ.get("SPLITWAVE_CACHE", ".cache"))


def make_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / cfg.name
    d = base / stamp
    i = 1
    while d.exists():
        d = base / f"{stamp}-{i}"
        i += 1
    d.mkdir(parents=True)
    return d


def _simulate_engine(cfg: ExperimentConfig, run_dir: Path, specs: list[dict], progress: bool) -> Path:
    """Virtual mode: the run on the simulation engine; its metrics.jsonl holds no wall-clock value."""

    cache = _cache_root()
    devices = build_devices(cfg)
    (run_dir / "devices.json").write_text(json.dumps([d.to_dict() for d in devices], indent=1))
    sim = cfg.sim
    log.info(
        "phase simulation: %d clients on the engine (%s executor, %d workers)",
        cfg.num_clients,
        sim.executor,
        sim.workers,
    )
    t0 = time.time()
    res = run_engine(
        cfg,
        run_dir,
        build_links(cfg, specs),
        cache / "bundles",
        lambda bundle: build_cost_model(cfg, bundle, cache / "sim"),
        devices,
        server_factor(cfg),
        executor=sim.executor,
        workers=sim.workers,
        ray_address=sim.ray_address,
        server_workers=sim.server_workers,
        progress=progress,
    )
    wall = time.time() - t0
    engine = {**res.wall, **res.stats, "executor": sim.executor, "workers": sim.workers}
    summary = report.write_outputs(
        run_dir, cfg, "virtual", report.engine_records(res.lines, res.pre_eval), wall, {"engine": engine}
    )
    log.info(
        "run %s: final accuracy %s, simulated %.1f s, wall %.1f s",
        run_dir,
        summary.get("final_accuracy"),
        summary.get("total_sim_time_s") or 0.0,
        wall,
    )
    return run_dir


def simulate(
    cfg: ExperimentConfig,
    virtual_only: bool = False,
    run_dir: Path | None = None,
    startup_timeout_s: float = 900.0,
    round_timeout_s: float | None = None,
    progress: bool = True,
    edge_threads: int | None = 1,
    exit_timeout_s: float = 60.0,
) -> Path:
    """Run the experiment of `cfg`; returns the run directory (config.yaml, links.json, metrics.jsonl,
    summary.json, plots; virtual mode also devices.json). `virtual_only` runs a realtime config on the engine.

    Real processes (`none`, `realtime`), phases announced on the progress bar and in the log: training
    (server start, edges, rounds), replay (realtime: virtual time through the link models) and report.
    Every wait has a bound: `startup_timeout_s` for the server to serve, `round_timeout_s` without a finished
    round, `exit_timeout_s` for the edges to exit once the server is done.
    """
    mode = cfg.channel.mode
    if virtual_only and mode == "realtime":
        mode = "virtual"
    if mode == "virtual" and cfg.training.edge_backend != "onnxruntime":
        raise ConfigError(
            "training.edge_backend: the simulation engine (channel.mode virtual) runs the ONNX Runtime edge; "
            "the torch reference edge needs channel.mode none or realtime"
        )
    specs = link_specs(cfg)
    build_links(cfg, specs)  # fail on a bad link spec before starting anything
    run_dir = Path(run_dir) if run_dir else make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "links.json").write_text(json.dumps(specs, indent=1))
    if mode == "virtual":
        return _simulate_engine(cfg, run_dir, specs, progress)
    round_timeout_s = round_timeout_s or cfg.rounds.deadline_s * 1.5 + 120.0
    clients = [f"client-{k}" for k in range(cfg.num_clients)]
    procs = ProcessGroup(env=child_env())
    proxies: list[ShapingProxy] = []
    live_links: list[LinkPair] = []
    bar = RoundProgress(cfg.rounds.num_rounds, cfg.name, progress)
    old_term = None
    if threading.current_thread() is threading.main_thread():

        def _on_term(*_):
            raise KeyboardInterrupt("SIGTERM")

        old_term = signal.signal(signal.SIGTERM, _on_term)
    t_wall0 = time.time()
    try:
        ready = run_dir / "server.ready.json"
        cache = _cache_root()
        server = procs.start_server(
            run_dir / "config.yaml",
            run_dir=run_dir / "server",
            cache_dir=cache / "bundles",
            ready_file=ready,
            log=run_dir / "logs" / "server.log",
            quiet=True,
        )
        bar.phase("training", "starting the server (the first run of a model exports its edge bundle)")
        try:
            port = procs.wait_ready("server", ready, startup_timeout_s)
        except LaunchError as e:
            raise SimulationError(str(e)) from None
        targets = [f"127.0.0.1:{port}"] * len(clients)
        if mode == "realtime":
            live_links = build_links(cfg, specs)
            for pair in live_links:
                px = ShapingProxy("127.0.0.1", 0, ("127.0.0.1", port), pair.uplink, pair.downlink).start()
                proxies.append(px)
            targets = [f"127.0.0.1:{px.port}" for px in proxies]
        edge_dir = run_dir / "edges"
        extra = ["--backend", cfg.training.edge_backend, *(["--threads", str(edge_threads)] if edge_threads else [])]
        for name, target in zip(clients, targets):
            procs.start_edge(
                name,
                target,
                cache_dir=cache / "edge",
                metrics=edge_dir / f"{name}.jsonl",
                log=run_dir / "logs" / f"{name}.log",
                extra=extra,
                quiet=True,
            )
        bar.note(f"training: {len(clients)} edges joining")
        metrics_path = run_dir / "server" / "server_metrics.jsonl"
        seen, last_progress, server_done = 0, time.monotonic(), None
        while True:
            lines = _read_jsonl(metrics_path)
            for line in lines[seen:]:
                bar.round_done(line["round"], line.get("eval_accuracy"))
                for pair in live_links:
                    pair.set_round(line["round"] + 1)  # per-round shadowing follows the real rounds
                last_progress = time.monotonic()
            seen = max(seen, len(lines))
            for name in clients:
                rc = procs.procs[name].poll()
                if rc not in (None, 0):
                    raise SimulationError(f"{name} exited with code {rc}; log {procs.logs[name]}:\n{procs.tail(name)}")
            rc = server.poll()
            if rc is not None:
                if rc != 0:
                    raise SimulationError(
                        f"server exited with code {rc}; log {procs.logs['server']}:\n{procs.tail('server')}"
                    )
                running = [n for n in clients if procs.procs[n].poll() is None]
                if not running:
                    break
                server_done = server_done or time.monotonic()
                if time.monotonic() - server_done > exit_timeout_s:
                    raise SimulationError(
                        f"the server finished but {', '.join(running)} did not exit within "
                        f"{exit_timeout_s:.0f} s; logs in {run_dir / 'logs'}"
                    )
            if time.monotonic() - last_progress > round_timeout_s:
                raise SimulationError(
                    f"no round finished for {round_timeout_s:.0f} s (round {seen} of "
                    f"{cfg.rounds.num_rounds}); logs in {run_dir / 'logs'}"
                )
            time.sleep(0.2)
        wall = time.time() - t_wall0
        log.info("training done in %.1f s", wall)
        if proxies:
            (run_dir / "proxy_stats.json").write_text(json.dumps([px.stats() for px in proxies], indent=1))
    except BaseException:
        bar.close()  # on success it stays up for the replay and report phases
        raise
    finally:
        procs.stop()
        for px in proxies:
            px.stop()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    try:
        lines = _read_jsonl(run_dir / "server" / "server_metrics.jsonl")
        if len(lines) < cfg.rounds.num_rounds:
            raise SimulationError(
                f"server finished after {len(lines)} of {cfg.rounds.num_rounds} rounds; logs in {run_dir / 'logs'}"
            )
        edge_records = {n: _read_jsonl(edge_dir / f"{n}.jsonl") for n in clients}
        summary = write_report(
            run_dir, cfg, mode, clients, edge_records, lines, lambda: build_links(cfg, specs), wall, phase=bar.phase
        )
    finally:
        bar.close()
    log.info(
        "run %s: final accuracy %s, simulated %.1f s, wall %.1f s",
        run_dir,
        summary.get("final_accuracy"),
        summary.get("total_sim_time_s") or 0.0,
        wall,
    )
    return run_dir
