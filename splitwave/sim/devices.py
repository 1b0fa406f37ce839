"""Client devices of the simulation engine: how much slower than this machine each computes, and when it is online.

A device's `edge_factor` is how many times longer than the host its compute takes (the host is 1.0). A named
class (splitwave.common.device_classes: phone, rpi4, laptop, ..., each with its source) gets
    factor = host GFLOP/s / class GFLOP/s,
the host's GFLOP/s measured once per machine by a fixed fp32 matmul through ONNX Runtime (the edge runtime's
own kernels, on one thread: the host profile is one core, for the edge and for the server alike) and cached
as JSON, so a later run on a loaded machine reads the same number. Every draw (class, spread, availability) comes from a numpy
Generator seeded with (cfg.seed, a fixed stream id, the client id): never from the wall clock, and client k's
device does not depend on how many clients there are.

Availability: a client is online when its `intervals` windows (optionally periodic, shifted per client) and
its on/off Markov process both say so; `dropout` is a per-(client, round) coin. `next_online(t)` is the first
time >= t at which `online` holds (math.inf if never again).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitwave.common.config import AvailabilityConfig, ExperimentConfig
from splitwave.common.device_classes import DEVICE_CLASSES, HOST
from splitwave.edge.runtime import session_options

log = logging.getLogger(__name__)

# stream ids of the seeded Generators (fixed: changing one changes every draw of that kind)
STREAM_CLASS, STREAM_SPREAD, STREAM_MARKOV, STREAM_OFFSET, STREAM_DROPOUT = 7101, 7102, 7103, 7104, 7105

PROBE_N = 512  # the calibration matmul: [512 x 512] @ [512 x 512] fp32, 268 MFLOP
PROBE_REPS = 30
OVERHEAD_OPS = 200  # operators in the per-operator overhead probes
MARKOV_CHUNK = 256  # on/off spells drawn at a time
CALIBRATION_VERSION = 1


def default_cache_dir() -> Path:
    """$SPLITWAVE_CACHE/sim (default .cache/sim): where calibrations and cost tables live."""
    return Path(os.environ.get("SPLITWAVE_CACHE", ".cache")) / "sim"


#: threads of the host's server profile: one core, like an edge's (a multi-core or GPU server is a
#: server_device class or factor). One thread also keeps the one-time measurement sane on a busy machine,
#: where OpenMP teams of 2+ threads wait on each other at every operator.
SERVER_THREADS = 1


def server_threads() -> int:
    return SERVER_THREADS


def host_fingerprint() -> dict:
    """What a measurement on this machine depends on: CPU model and count, runtime versions."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def fingerprint_key(extra: dict | None = None) -> str:
    ident = {**host_fingerprint(), **(extra or {})}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _onnx_model(nodes: list, n: int) -> bytes:
    """A small ONNX graph over float [n, n] tensors A, B -> C (built with onnx's helpers, only needed here)."""
    from onnx import TensorProto, helper  # lazily: only the first calibration on a machine builds a graph

    t = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("A", "B", "C")]
    graph = helper.make_graph(nodes, "probe", t[:2], t[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def best_time(fn: Callable[[], object], reps: int = PROBE_REPS) -> float:
    """The fastest of `reps` runs after 3 warm-ups: the one least disturbed by whatever else the machine does."""
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _ort_session(model: bytes, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(threads, low_memory=False), providers=["CPUExecutionProvider"])


def measure_gflops(threads: int) -> float:
    """fp32 matmul GFLOP/s of ONNX Runtime with `threads` intra-op threads ([512 x 512] @ [512 x 512])."""
    from onnx import helper  # lazily, as in _onnx_model

    sess = _ort_session(_onnx_model([helper.make_node("MatMul", ["A", "B"], ["C"])], PROBE_N), threads)
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((PROBE_N, PROBE_N), dtype=np.float32) for x in ("A", "B")}
    return 2.0 * PROBE_N**3 / best_time(lambda: sess.run(None, feeds)) / 1e9


def measure_ort_op_s() -> float:
    """Seconds ONNX Runtime (1 thread) spends per operator beyond its arithmetic: a chain of OVERHEAD_OPS Adds
    on 4 x 4 tensors."""
    from onnx import helper  # lazily, as in _onnx_model

    names = ["A", *[f"x{i}" for i in range(OVERHEAD_OPS - 1)], "C"]
    nodes = [helper.make_node("Add", [names[i], "B"], [names[i + 1]]) for i in range(OVERHEAD_OPS)]
    sess = _ort_session(_onnx_model(nodes, 4), 1)
    feeds = {x: np.ones((4, 4), np.float32) for x in ("A", "B")}
    return best_time(lambda: sess.run(None, feeds)) / OVERHEAD_OPS


def measure_numpy_op_s() -> float:
    """Seconds per numpy call on a small array (the edge optimizer and aggregation are chains of them)."""
    a, b = np.ones(64, np.float32), np.ones(64, np.float32)

    def chain():
        x = a
        for _ in range(OVERHEAD_OPS):
            x = np.add(x, b)

    return best_time(chain) / OVERHEAD_OPS


def calibrated(name: str, measure: Callable[[], float | dict], cache_dir: Path | None = None):
    """A figure of this machine (a number, or a dict of them) under `name`: measured the first time, then read
    from the cache."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"host-{fingerprint_key({'v': CALIBRATION_VERSION})}.json"
    table: dict = json.loads(path.read_text()) if path.is_file() else {}
    values = table.get("values", {})
    if name not in values:
        values = {**values, name: measure()}
        log.info("calibrated this machine: %s = %s (cached in %s)", name, values[name], path)
        write_json(path, {"fingerprint": host_fingerprint(), "values": values})
    return values[name]


def host_gflops(threads: int = 1, cache_dir: Path | None = None) -> float:
    """This machine's fp32 matmul GFLOP/s with `threads` threads (measured once, cached)."""
    return float(calibrated(f"gflops-{int(threads)}", lambda: measure_gflops(int(threads)), cache_dir))


def write_json(path: Path, obj: dict) -> None:
    """Atomic write (a concurrent reader sees the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def class_factor(name: str, threads: int = 1, cache_dir: Path | None = None) -> float:
    """Slowdown of a named class against this machine (`host`: 1.0)."""
    if name == HOST:
        return 1.0
    return host_gflops(threads, cache_dir) / DEVICE_CLASSES[name].gflops


def _rng(seed: int, stream: int, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed % (1 << 63), stream, *ids])


# ------------------------------------------------------------------------------------------- availability
class _Windows:
    """Online windows [start, end), once or repeating every `period`, shifted by `offset`."""

    def __init__(self, windows: list[tuple[float, float]], period: float | None, offset: float):
        self.starts = [float(s) for s, _ in windows]
        self.ends = [float(e) for _, e in windows]
        self.period, self.offset = period, offset

    def _abs(self, cycle: int, i: int) -> tuple[float, float]:
        base = self.offset + cycle * self.period if self.period else self.offset
        return base + self.starts[i], base + self.ends[i]

    def _cycle(self, t: float) -> int:
        return math.floor((t - self.offset) / self.period) if self.period else 0

    def online(self, t: float) -> bool:
        k = self._cycle(t)
        for c in (k - 1, k, k + 1) if self.period else (0,):
            for i in range(len(self.starts)):
                s, e = self._abs(c, i)
                if s <= t < e:
                    return True
        return False

    def next_online(self, t: float) -> float:
        if self.online(t):
            return t
        k = self._cycle(t)
        for c in (k - 1, k, k + 1, k + 2) if self.period else (0,):
            for i in range(len(self.starts)):
                s, e = self._abs(c, i)
                if s > t and s < e:  # (a window narrower than the float spacing at this time never opens)
                    return s
        return math.inf


class _Markov:
    """On/off process with exponential spells. The flip times are drawn lazily from the client's Generator, in
    chunks of MARKOV_CHUNK spells, always in the same order, so the same times come out whatever order the
    queries come in."""

    def __init__(self, mean_on: float, mean_off: float, rng: np.random.Generator):
        self.mean = {True: mean_on, False: mean_off}
        self.rng = rng
        self.start_on = bool(rng.random() < mean_on / (mean_on + mean_off))  # the stationary state at t = 0
        self.flips: list[float] = []  # strictly increasing times at which the state flips

    def _cover(self, t: float) -> None:
        while not self.flips or self.flips[-1] <= t:
            state = self.start_on ^ (len(self.flips) % 2 == 1)  # the state the next spell is in
            means = np.where(np.arange(MARKOV_CHUNK) % 2 == 0, self.mean[state], self.mean[not state])
            times = (self.flips[-1] if self.flips else 0.0) + np.cumsum(
                self.rng.standard_exponential(MARKOV_CHUNK) * means
            )
            last = self.flips[-1] if self.flips else 0.0
            for x in times.tolist():
                # a zero spell (or one below the float spacing here) would flip twice at one time
                last = x if x > last else math.nextafter(last, math.inf)
                self.flips.append(last)

    def online(self, t: float) -> bool:
        self._cover(t)
        return self.start_on ^ (bisect.bisect_right(self.flips, t) % 2 == 1)

    def next_online(self, t: float) -> float:
        if self.online(t):
            return t
        return self.flips[bisect.bisect_right(self.flips, t)]  # offline at t: the next flip turns it on


# ------------------------------------------------------------------------------------------------ devices
@dataclass
class Device:
    """One client's device: compute slowdown against the host and availability on the virtual clock."""

    client: int
    name: str  # class name ("phone"), or "factor" for an explicit factor
    edge_factor: float
    base_factor: float  # before the per-client lognormal spread
    dropout: float = 0.0
    seed: int = 0
    _windows: _Windows | None = field(default=None, repr=False)
    _markov: _Markov | None = field(default=None, repr=False)

    def online(self, t: float) -> bool:
        return (self._windows is None or self._windows.online(t)) and (self._markov is None or self._markov.online(t))

    def next_online(self, t: float) -> float:
        """The first time >= t at which the device is online (math.inf if it never is again)."""
        for _ in range(1_000_000):
            t1 = t if self._windows is None else self._windows.next_online(t)
            if math.isinf(t1):
                return t1
            t2 = t1 if self._markov is None else self._markov.next_online(t1)
            if t2 == t1:
                return t1
            t = t2
        raise RuntimeError(f"client {self.client}: no time found where its windows and on/off process agree")

    def drops_out(self, round_idx: int) -> bool:
        """Whether this client, if selected, drops out of round `round_idx` (a coin of its own per round)."""
        return self.dropout > 0 and bool(
            _rng(self.seed, STREAM_DROPOUT, self.client, round_idx).random() < self.dropout
        )

    def to_dict(self) -> dict:
        out: dict = {
            "client": self.client,
            "name": self.name,
            "edge_factor": self.edge_factor,
            "base_factor": self.base_factor,
        }
        if self.dropout:
            out["dropout"] = self.dropout
        if self._windows is not None:
            out["windows_offset_s"] = self._windows.offset
        if self._markov is not None:
            out["starts_online"] = self._markov.start_on
        return out


def _availability(av: AvailabilityConfig, seed: int, k: int) -> tuple[_Windows | None, _Markov | None]:
    windows = markov = None
    if av.intervals is not None:
        if av.offset_s == "random":
            assert av.period_s is not None  # the config requires it
            offset = float(_rng(seed, STREAM_OFFSET, k).uniform(0.0, av.period_s))
        else:
            offset = float(av.offset_s)
        windows = _Windows(list(av.intervals), av.period_s, offset)
    if av.mean_on_s is not None and av.mean_off_s is not None:
        markov = _Markov(av.mean_on_s, av.mean_off_s, _rng(seed, STREAM_MARKOV, k))
    return windows, markov


def _base(cfg: ExperimentConfig, k: int, factor_of) -> tuple[str, float]:
    """(name, factor) of client k before the spread."""
    d = cfg.sim.devices
    if d.per_client:
        e = d.per_client[k % len(d.per_client)]
        return (e, factor_of(e)) if isinstance(e, str) else ("factor", float(e))
    if d.mix:
        names = sorted(d.mix)  # a fixed order: the draw must not depend on how the YAML listed them
        w = np.array([d.mix[n] for n in names], dtype=np.float64)
        name = names[int(_rng(cfg.seed, STREAM_CLASS, k).choice(len(names), p=w / w.sum()))]
        return name, factor_of(name)
    name = d.class_ or HOST
    return name, factor_of(name)


def build_devices(cfg: ExperimentConfig, cache_dir: Path | None = None) -> list[Device]:
    """One Device per client (cfg.num_clients), deterministic from cfg.seed."""
    memo: dict[str, float] = {}

    def factor_of(name: str) -> float:
        if name not in memo:
            memo[name] = class_factor(name, 1, cache_dir)
        return memo[name]

    sigma = cfg.sim.devices.lognormal_sigma
    av = cfg.sim.availability
    out = []
    for k in range(cfg.num_clients):
        name, base = _base(cfg, k, factor_of)
        factor = base * math.exp(sigma * float(_rng(cfg.seed, STREAM_SPREAD, k).standard_normal())) if sigma else base
        windows, markov = _availability(av, cfg.seed, k)
        out.append(Device(k, name, factor, base, av.dropout, cfg.seed, windows, markov))
    return out


def server_factor(cfg: ExperimentConfig, cache_dir: Path | None = None) -> float:
    """Slowdown of the server against this machine: a factor, or a class against the host's server threads."""
    dev = cfg.sim.server_device
    if isinstance(dev, str):
        return class_factor(dev, server_threads(), cache_dir)
    return float(dev)
