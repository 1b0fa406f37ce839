"""Compute cost model of the simulation engine: host seconds (device factor 1) of each piece of work.

Two models (`sim.cost_model`):
* `measured`: the real edge runtime (EdgeRuntime on the bundle, 1 intra-op thread, the config's edge_mode)
  and the real server trainer step (1 thread, devices.SERVER_THREADS) are timed ONCE on this machine, in
  isolation, per (bundle, batch shape): the median of REPS runs after WARMUP, over a small grid of batch
  sizes and sequence-length buckets (multiples of SEQ_BUCKET), stored as JSON under cache_dir, keyed by the
  bundle, the grid and a host fingerprint. A query between grid points is interpolated (time is close to
  affine in rows and in tokens), one beyond the grid scaled in proportion to its rows / tokens. Once the
  table exists nothing is timed again: the same config gives the same numbers however loaded the machine is
  (delete the file to measure afresh; a busy machine at measurement time is warned about).
* `flops`: splitwave.sim.flops' FLOP count divided by the host's calibrated fp32 GFLOP/s, plus its operator
  count times the host's calibrated time per operator (splitwave.sim.devices.calibrated, also cached).
The engine multiplies these by the device's `edge_factor` / the server's factor. `time_edge` and
`time_server_step` are the one timing code path: `splitwave plan` uses them too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from splitwave.common.config import ExperimentConfig
from splitwave.common.factors import load_factors
from splitwave.common.manifest import BundleManifest
from splitwave.edge.runtime import EdgeRuntime
from splitwave.server.aggregation import ClientUpdate, make_strategy
from splitwave.server.aggregation.robust import min_clients_for
from splitwave.server.evaluation import batch_rows
from splitwave.server.models import tiny_config
from splitwave.server.setup import build_split
from splitwave.server.split import LoraSpec, split_model
from splitwave.server.trainer import StepInput, TopTrainer
from splitwave.sim import flops as F
from splitwave.sim.devices import (
    best_time,
    calibrated,
    default_cache_dir,
    host_fingerprint,
    host_gflops,
    measure_numpy_op_s,
    measure_ort_op_s,
    server_threads,
    write_json,
)

log = logging.getLogger(__name__)

COSTS_VERSION = 2  # 2: server_step_half (a top that computes valid tokens only)
SEQ_BUCKET = 8
REPS = 5
WARMUP = 2
EVAL_ROWS = 64  # rows per evaluation batch (SplitServer.evaluate_global's default)
ID_RANGE = (3, 100)  # token ids valid in every model (the tiny ones have 100)


def bucket(seq: int) -> int:
    """A sequence length rounded up to a multiple of SEQ_BUCKET (at least SEQ_BUCKET)."""
    return max(SEQ_BUCKET, -(-int(seq) // SEQ_BUCKET) * SEQ_BUCKET)


def seq_grid(max_seq_len: int) -> list[int]:
    """Measured sequence buckets: 8, 16, 32, ... (doubling) and the bucket of the longest sequence."""
    top, pts, x = bucket(max_seq_len), {SEQ_BUCKET}, 2 * SEQ_BUCKET
    while x < top:
        pts.add(x)
        x *= 2
    return sorted(pts | {top})


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys) (sorted xs, ys >= 0); below the first point the first value, beyond
    the last proportional to x (time grows with the work; this keeps the extrapolation monotone in both axes
    of a Grid, which continuing the last segment would not)."""
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1]) * x / xs[-1]
    i = bisect_right(xs, x) - 1
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def valid_share_cost(full: float, half: float, share: float) -> float:
    """Seconds of a step of which `share` of the padded shape is valid tokens, for a server that computes only
    those, from the same shape's times with full rows and with half of each row valid: affine in the share
    (the attention scores and per-step overheads stay, the token-wise work goes), never below a tenth of full."""
    gone = (full - min(half, full)) / 0.5  # seconds per unit of share the token-wise work takes
    return max(0.1 * full, full - gone * (1.0 - min(max(share, 0.0), 1.0)))


class Grid:
    """Seconds over (rows, seq) grid points, made monotone (a bigger shape never costs less: timing noise at
    the small shapes could say otherwise); bilinear between points, proportional beyond the last."""

    def __init__(self, rows: list[int], seqs: list[int], values: list[list[float]]):
        v = np.maximum.accumulate(np.maximum.accumulate(np.asarray(values, dtype=np.float64), axis=0), axis=1)
        self.rows, self.seqs, self.values = list(rows), list(seqs), v.tolist()

    def at(self, rows: float, seq: float) -> float:
        per_row = [_interp(self.seqs, line, seq) for line in self.values]
        return _interp(self.rows, per_row, rows)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "seqs": self.seqs, "seconds": self.values}

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        return cls(d["rows"], d["seqs"], d["seconds"])


class CostModel:
    """Host seconds (device factor 1) of each piece of simulated compute."""

    kind = "?"

    def edge_forward_s(self, batch: int, seq: int) -> float:
        raise NotImplementedError

    def edge_backward_s(self, batch: int, seq: int) -> float:
        raise NotImplementedError

    def edge_optimizer_s(self) -> float:
        raise NotImplementedError

    def server_step_s(self, batch: int, seq: int, fused: int = 1, tokens: int | None = None) -> float:
        """One server step over `fused` client steps of `batch` rows each, padded to `seq` (members of
        different sizes: pass their total rows as batch with fused=1). `tokens`: the valid tokens, when the
        server computes only those (a BERT top, ServerPart.unpads): the token-wise work scales with them, the
        attention scores keep the padded shape."""
        raise NotImplementedError

    def server_eval_s(self, batch: int, seq: int) -> float:
        """The server's evaluation of one batch of the global model (whole-model forward, as
        server/evaluation.py does at round ends)."""
        raise NotImplementedError

    def aggregate_s(self, num_clients: int) -> float:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError


class MeasuredCosts(CostModel):
    kind = "measured"

    def __init__(self, table: dict, path: Path | None = None):
        self.table, self.path = table, path
        self.fwd = Grid.from_dict(table["edge_forward"])
        self.bwd = Grid.from_dict(table["edge_backward"])
        self.step = Grid.from_dict(table["server_step"])
        # the same steps with each row's first half valid, for a server that computes valid tokens only
        self.half = Grid.from_dict(table["server_step_half"]) if "server_step_half" in table else None
        self.eval = Grid.from_dict(table["server_eval"])
        self.opt = float(table["edge_optimizer"])
        agg = table["aggregate"]
        ys = list(np.maximum.accumulate(agg["seconds"]))
        self.agg_x, self.agg_y = [0, *agg["clients"]], [0.0, *ys]

    def edge_forward_s(self, batch: int, seq: int) -> float:
        return self.fwd.at(batch, bucket(seq))

    def edge_backward_s(self, batch: int, seq: int) -> float:
        return self.bwd.at(batch, bucket(seq))

    def edge_optimizer_s(self) -> float:
        return self.opt

    def server_step_s(self, batch: int, seq: int, fused: int = 1, tokens: int | None = None) -> float:
        rows, width = batch * fused, bucket(seq)
        full = self.step.at(rows, width)
        if tokens is None or self.half is None:
            return full
        return valid_share_cost(full, self.half.at(rows, width), tokens / (rows * width))

    def server_eval_s(self, batch: int, seq: int) -> float:
        return self.eval.at(batch, bucket(seq))

    def aggregate_s(self, num_clients: int) -> float:
        return _interp(self.agg_x, self.agg_y, num_clients)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "table": str(self.path) if self.path else None, "key": self.table.get("key")}


class FlopCosts(CostModel):
    """FLOPs / the host's GFLOP/s plus operators x the host's per-operator time (see splitwave.sim.flops)."""

    kind = "flops"

    def __init__(self, shape: F.ModelShape, host: dict, torch_ops: dict, edge_ops: tuple[int, int], recompute: bool):
        self.shape, self.host, self.torch, self.edge_ops, self.recompute = shape, host, torch_ops, edge_ops, recompute
        self.edge_fps, self.server_fps = host["edge_gflops"] * 1e9, host["server_gflops"] * 1e9

    def edge_forward_s(self, batch: int, seq: int) -> float:
        return F.edge_forward(self.shape, batch, seq) / self.edge_fps + self.edge_ops[0] * self.host["ort_op_s"]

    def edge_backward_s(self, batch: int, seq: int) -> float:
        flop = F.edge_backward(self.shape, batch, seq, self.recompute)
        return flop / self.edge_fps + self.edge_ops[1] * self.host["ort_op_s"]

    def edge_optimizer_s(self) -> float:
        s = self.shape
        return F.edge_optimizer(s) / self.edge_fps + F.edge_optimizer_ops(s) * self.host["numpy_op_s"]

    def server_step_s(self, batch: int, seq: int, fused: int = 1, tokens: int | None = None) -> float:
        t = self.torch
        return F.server_step(self.shape, batch * fused, seq, tokens) / self.server_fps + t["step_ops"] * t["op_s"]

    def server_eval_s(self, batch: int, seq: int) -> float:
        t = self.torch
        return F.full_forward(self.shape, batch, seq) / self.server_fps + t["eval_ops"] * t["op_s"]

    def aggregate_s(self, num_clients: int) -> float:
        s = self.shape
        return F.aggregate(s, num_clients) / self.server_fps + F.aggregate_ops(s, num_clients) * self.host["numpy_op_s"]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            **self.host,
            "server_torch": self.torch,
            "edge_graph_ops": list(self.edge_ops),
            "edge_params": F.edge_params(self.shape),
        }


def measure_torch_ops(shape: F.ModelShape) -> dict:
    """The server's eager-torch cost beyond arithmetic, on a model of the same structure at hidden size 32:
    aten ops of one training step and of one evaluation forward (counted; the count does not depend on the
    width), and seconds per op (the tiny model's time / its ops, its arithmetic being negligible)."""
    hf = tiny_config(shape.family, shape.task, shape.num_labels)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(hf, key):
            setattr(hf, key, shape.layers)
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if shape.task == "seq-cls" else AutoModelForCausalLM
    lora = LoraSpec(r=shape.lora_r, alpha=2.0 * shape.lora_r, targets=list(shape.lora_targets))
    split = split_model(auto.from_config(hf).eval(), shape.cut, lora, shape.task)
    trainer = TopTrainer(split, shape.task, lr=1e-3)
    ids, mask, labels = _inputs(2, 8, shape.task)
    h = np.random.default_rng(0).standard_normal((2, 8, int(split.peft_model.config.hidden_size))).astype(np.float32)
    steps = [StepInput("c0", h, mask, labels)]
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    def evaluate():
        with torch.no_grad():
            split(ids_t, mask_t)

    before = torch.get_num_threads()
    torch.set_num_threads(server_threads())
    try:
        trainer._train_fused(steps)
        with _CountOps() as step_ops:
            trainer._train_fused(steps)
        with _CountOps() as eval_ops:
            evaluate()
        t = best_time(lambda: trainer._train_fused(steps), 10) + best_time(evaluate, 10)
    finally:
        torch.set_num_threads(before)
    return {"step_ops": step_ops.n, "eval_ops": eval_ops.n, "op_s": t / (step_ops.n + eval_ops.n)}


class _CountOps(TorchDispatchMode):
    """Counts the aten ops run inside it."""

    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def graph_ops(bundle_dir: Path, manifest: BundleManifest, mode: str) -> tuple[int, int]:
    """Operators of the edge's forward and backward graphs (ONNX nodes, less Constant/Identity, which ORT
    folds away)."""
    out = []
    for name in manifest.graphs[mode]:
        graph = onnx.load(str(bundle_dir / name), load_external_data=False).graph
        out.append(sum(1 for n in graph.node if n.op_type not in ("Constant", "Identity")))
    return out[0], out[1]


def host_profile(cache_dir: Path) -> dict:
    """The calibrated figures of this machine the flops model divides by / multiplies with (all cached)."""
    return {
        "edge_gflops": host_gflops(1, cache_dir),
        "server_gflops": host_gflops(server_threads(), cache_dir),
        "ort_op_s": float(calibrated("ort-op-s", measure_ort_op_s, cache_dir)),
        "numpy_op_s": float(calibrated("numpy-op-s", measure_numpy_op_s, cache_dir)),
    }


def torch_profile(shape: F.ModelShape, cache_dir: Path) -> dict:
    """measure_torch_ops for this structure, once per machine (cached with the host's calibration)."""
    ident = [shape.family, shape.task, shape.layers, shape.cut, shape.lora_r, *shape.lora_targets, server_threads()]
    return calibrated("torch-ops-" + "-".join(map(str, ident)), lambda: measure_torch_ops(shape), cache_dir)


# ------------------------------------------------------------------------------------------------ timing
def median_time(fn: Callable[[], object], reps: int = REPS, warmup: int = WARMUP) -> float:
    """Median wall time of fn() over `reps` runs after `warmup` runs (first calls pay lazy initialisation)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def time_edge(runtime, ids: np.ndarray, mask: np.ndarray, reps: int = REPS, warmup: int = WARMUP) -> dict:
    """Median seconds of an edge backend's forward, backward (for EdgeRuntime in recompute mode this includes
    the recomputed forward) and optimizer step: EdgeRuntime or server.torch_edge.TorchEdge alike."""
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    grad = None
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        h = runtime.forward(ids, mask)
        t1 = time.perf_counter()
        if grad is None:
            grad = (1e-3 * np.random.default_rng(0).standard_normal(h.shape)).astype(np.float32)
        grads = runtime.backward(grad)
        t2 = time.perf_counter()
        runtime.step(grads)
        t3 = time.perf_counter()
        if i >= warmup:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k].append(dt)
    return {k: float(np.median(v)) for k, v in times.items()}


def time_server_step(trainer: TopTrainer, steps: list[StepInput], reps: int = REPS, warmup: int = WARMUP) -> float:
    """Median seconds of one server step over `steps` (several: fused), on the calling thread: the trainer's
    own step code (`_train_fused`, what its compute thread runs), not the queue in front of it."""
    return median_time(lambda: trainer._train_fused(steps), reps, warmup)


def time_eval(split, ids: np.ndarray, mask: np.ndarray, reps: int = REPS, warmup: int = WARMUP) -> float:
    """Median seconds of the whole split model's forward (the server's evaluation of one batch)."""
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        return median_time(lambda: split(ids_t, mask_t), reps, warmup)


def _inputs(rows: int, seq: int, task: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng([seed, rows, seq])
    ids = g.integers(*ID_RANGE, size=(rows, seq), dtype=np.int64)
    mask = np.ones((rows, seq), dtype=np.int64)
    labels = ids.copy() if task == "causal-lm" else np.zeros(rows, dtype=np.int64)
    return ids, mask, labels


# ------------------------------------------------------------------------------------------------ tables
def _manifest_key(manifest: BundleManifest) -> str:
    stable = {k: v for k, v in manifest.to_dict().items() if k != "export_seconds"}  # re-exporting changes only this
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def table_spec(cfg: ExperimentConfig, manifest: BundleManifest) -> dict:
    """Everything the measured numbers depend on (the cache key is its hash)."""
    tr, agg = cfg.training, cfg.aggregation
    b, k = tr.batch_size, tr.server_batch
    robust = agg.robust or {}
    n1 = max(2, min_clients_for(robust.get("method", "mean"), robust.get("trim_ratio", 0.1)))
    return {
        "version": COSTS_VERSION,
        "bundle": _manifest_key(manifest),
        "model": cfg.model.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "seed": cfg.seed,
        "edge_mode": tr.edge_mode,
        "edge_rows": sorted({1, b}),
        "server_rows": sorted({1, b, b * k}),
        "server_batch": k,
        "seqs": seq_grid(cfg.data.max_seq_len),
        "aggregation": {
            "strategy": agg.strategy,
            "params": agg.params,
            "robust": agg.robust,
            "dp": agg.dp,
            "server_opt": agg.server_opt,
            "top_too": tr.mode == "sfl-v1",
            "clients": [n1, n1 + 8],
        },
        "reps": REPS,
        "warmup": WARMUP,
        "server_threads": server_threads(),
        "host": host_fingerprint(),
        "torch": torch.__version__,
    }


def _strategy(cfg: ExperimentConfig, family: str, scope: str, name: str | None = None):
    """The run's aggregation strategy, built as the server builds it (SplitServer._make_strategy)."""
    agg = cfg.aggregation
    return make_strategy(
        name or agg.strategy,
        lora_alpha=cfg.lora.alpha,
        use_rslora=cfg.lora.rslora,
        fan_in_fan_out=family == "gpt2",
        robust=agg.robust,
        dp=agg.dp,
        server_opt=agg.server_opt,
        scope=scope,
        **({"max_abs_value": cfg.server.security.max_abs_value, **agg.params} if name is None else {}),
    )


def time_aggregate(cfg: ExperimentConfig, family: str, scope: str, factors: dict[str, np.ndarray], n: int) -> float:
    """Median seconds of the configured strategy aggregating n clients' adapters (fedit if it cannot run on
    random adapters)."""
    g = np.random.default_rng([cfg.seed, n])
    ups = [
        ClientUpdate(
            f"c{i}", {k: v + 1e-3 * g.standard_normal(v.shape).astype(np.float32) for k, v in factors.items()}, 10
        )
        for i in range(n)
    ]
    ids = [u.client_id for u in ups]
    for name in (None, "fedit"):
        try:
            strat = _strategy(cfg, family, scope, name)
            strat.initialize(factors)
            rnd = iter(range(1, 10**6))

            def once():
                r = next(rnd)
                strat.configure_round(r, ids)
                strat.aggregate(r, ups)

            return median_time(once)
        except Exception as e:  # an exotic strategy's demands on its uploads: time the plain mean instead
            if name is not None:
                raise
            log.warning(
                "could not time strategy %r on random adapters (%s); timing fedit instead", cfg.aggregation.strategy, e
            )
    raise AssertionError("unreachable")


def measure_table(cfg: ExperimentConfig, bundle_dir: Path, spec: dict) -> dict:
    """Time everything in `spec` on this machine (edge: 1 ORT thread; server: spec's thread count)."""
    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (os.cpu_count() or 1):
        log.warning(
            "measuring compute costs on a busy machine (load average %.1f on %d CPUs): the times will be slow; "
            "delete the cached table and measure again on a quiet machine for a faithful one",
            load,
            os.cpu_count() or 1,
        )
    manifest = BundleManifest.from_file(bundle_dir)
    task, seqs = cfg.model.task, spec["seqs"]
    opt = cfg.training.optim
    rt = EdgeRuntime(bundle_dir, mode=spec["edge_mode"], threads=1, lr=opt.lr, weight_decay=opt.weight_decay)
    fwd, bwd, opt_s = [], [], []
    for rows in spec["edge_rows"]:
        f_line, b_line = [], []
        for s in seqs:
            ids, mask, _ = _inputs(rows, s, task)
            t = time_edge(rt, ids, mask)
            f_line.append(t["forward"])
            b_line.append(t["backward"])
            opt_s.append(t["optimizer"])
        fwd.append(f_line)
        bwd.append(b_line)
    del rt

    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec["server_threads"])
    try:
        split = build_split(cfg)
        hidden = manifest.hidden_size
        trainer = TopTrainer(split, task, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps)
        b, k = cfg.training.batch_size, spec["server_batch"]
        # a top that computes valid tokens only (ServerPart.unpads) is also timed with half of each row valid
        halves = [False, True] if split.server.unpads(np.array([[1, 0]])) else [False]
        step: dict[bool, list] = {half: [] for half in halves}
        for half in halves:
            for rows in spec["server_rows"]:
                line = []
                for s in seqs:
                    fused = k if (k > 1 and rows == b * k) else 1
                    per = rows // fused
                    steps = []
                    for c in range(fused):
                        ids, mask, labels = _inputs(per, s, task, seed=c)
                        if half:
                            mask[:, max(1, s // 2) :] = 0
                        h = np.random.default_rng([c, per, s]).standard_normal((per, s, hidden)).astype(np.float32)
                        steps.append(StepInput(f"c{c}", h, mask, labels))
                    line.append(time_server_step(trainer, steps))
                step[half].append(line)
        eval_rows = sorted({1, batch_rows(split, seqs[-1], EVAL_ROWS)})
        ev = [[time_eval(split, *_inputs(rows, s, task)[:2]) for s in seqs] for rows in eval_rows]
        family = split.family
        edge_factors = load_factors(bundle_dir / manifest.factors_file)
        top_factors = trainer.factors() if spec["aggregation"]["top_too"] else None
    finally:
        torch.set_num_threads(threads_before)
    agg = []
    for n in spec["aggregation"]["clients"]:
        t = time_aggregate(cfg, family, "edge", edge_factors, n)
        if top_factors:
            t += time_aggregate(cfg, family, "top", top_factors, n)
        agg.append(t)
    log.info("compute cost table measured in %.1f s", time.perf_counter() - t_start)
    return {
        "spec": spec,
        "load_average": load,  # at measurement time, for the record (not part of the key)
        "edge_forward": Grid(spec["edge_rows"], seqs, fwd).to_dict(),
        "edge_backward": Grid(spec["edge_rows"], seqs, bwd).to_dict(),
        "edge_optimizer": float(np.median(opt_s)),
        "server_step": Grid(spec["server_rows"], seqs, step[False]).to_dict(),
        **({"server_step_half": Grid(spec["server_rows"], seqs, step[True]).to_dict()} if True in step else {}),
        "server_eval": Grid(eval_rows, seqs, ev).to_dict(),
        "aggregate": {"clients": spec["aggregation"]["clients"], "seconds": agg},
    }


def build_cost_model(cfg: ExperimentConfig, bundle_dir: str | Path, cache_dir: str | Path | None = None) -> CostModel:
    """The config's cost model for this bundle; `measured` times on the first call for a (bundle, shape grid,
    host) and reads the cached table on every later one."""
    bundle_dir = Path(bundle_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    manifest = BundleManifest.from_file(bundle_dir)
    if cfg.sim.cost_model == "flops":
        mode, shape = cfg.training.edge_mode, F.model_shape(cfg, manifest)
        return FlopCosts(
            shape,
            host_profile(cache_dir),
            torch_profile(shape, cache_dir),
            graph_ops(bundle_dir, manifest, mode),
            mode == "recompute",
        )
    spec = table_spec(cfg, manifest)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"costs-{key}.json"
    if path.is_file():
        table = json.loads(path.read_text())
        log.info("compute cost table from the cache (%s)", path)
    else:
        log.info("measuring compute costs of this bundle on this machine, once (cached in %s)", path)
        table = {"key": key, **measure_table(cfg, bundle_dir, spec)}
        write_json(path, table)
    return MeasuredCosts(table, path)
