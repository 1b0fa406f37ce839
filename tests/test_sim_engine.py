"""The simulation engine (splitwave.sim): event order, virtual time by hand, determinism (twice, 1 vs N
workers, a loaded machine), the real math (equal to the in-process federated reference), deadlines and
stragglers, fused server steps."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitwave.common.config import parse_config
from splitwave.report import engine_records
from splitwave.runner import build_links
from splitwave.server.adapter_export import EDGE_FILE, FINAL_DIR, TOP_FILE, load_npz
from splitwave.sim.engine import PARTS, EventQueue
from splitwave.sim.run import run_engine
from tests.conftest import CACHE

# tiny BERT, synthetic data (the bundle of configs/quick.yaml: cached once for all of these)
BASE = {
    "name": "sim-test",
    "seed": 0,
    "num_clients": 3,
    "model": {"family": "bert", "tiny": True, "task": "seq-cls", "num_labels": 2, "cut": 2},
    "lora": {"r": 4, "alpha": 8},
    "data": {"dataset": "synthetic", "num_train": 192, "num_eval": 64, "max_seq_len": 16},
    "training": {"mode": "sfl-v2", "batch_size": 8, "local_steps": 3, "optim": {"lr": 0.003}},
    "rounds": {"num_rounds": 2, "deadline_s": 120},
    "aggregation": {"strategy": "fedit"},
    "channel": {
        "mode": "virtual",
        "uplink": {"kind": "static", "rate_mbps": 10, "latency_ms": 20},
        "downlink": {"kind": "static", "rate_mbps": 40, "latency_ms": 20},
    },
}


class FixedCosts:
    """Costs proportional to the batch shape: a cost model that needs no measurement."""

    def __init__(self, fwd=1e-4, bwd=2e-4, opt=1e-3, server=3e-4, ev=1e-5, agg=1e-3):
        self.fwd, self.bwd, self.opt, self.server, self.ev, self.agg = fwd, bwd, opt, server, ev, agg

    def edge_forward_s(self, batch, seq):
        return self.fwd * batch * seq

    def edge_backward_s(self, batch, seq):
        return self.bwd * batch * seq

    def edge_optimizer_s(self):
        return self.opt

    def server_step_s(self, batch, seq, fused=1, tokens=None):
        return self.server * (batch * seq if tokens is None else tokens)

    def server_eval_s(self, batch, seq):
        return self.ev * batch * seq

    def aggregate_s(self, num_clients):
        return self.agg * num_clients


class Host:
    """A device as fast as the cost table, always online (or as slow as `factor`, offline in `gaps`)."""

    def __init__(self, factor=1.0, gaps=()):
        self.name, self.edge_factor, self.gaps = "host", factor, list(gaps)

    def online(self, t):
        return not any(a <= t < b for a, b in self.gaps)

    def next_online(self, t):
        for a, b in self.gaps:
            if a <= t < b:
                return b
        return t

    def drops_out(self, round_idx):
        return False

    def to_dict(self):
        return {"name": self.name, "edge_factor": self.edge_factor}


def _cfg(**over):
    raw = json.loads(json.dumps(BASE))
    for key, value in over.items():
        node = raw
        *path, last = key.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_config(raw)


def _run(tmp_path: Path, cfg, costs=None, devices=None, workers=0, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    res = run_engine(
        cfg,
        run_dir,
        build_links(cfg),
        CACHE,
        lambda _bundle: costs or FixedCosts(),
        devices or [Host() for _ in range(cfg.num_clients)],
        workers=workers,
        progress=False,
        **kw,
    )
    recs = engine_records(res.lines, res.pre_eval)
    final = res.server_dir / FINAL_DIR
    return recs, load_npz(final / EDGE_FILE), load_npz(final / TOP_FILE), res


def _digest(recs, edge, top) -> str:
    h = hashlib.sha256(json.dumps(recs, sort_keys=True).encode())
    for d in (edge, top):
        for k in sorted(d):
            h.update(k.encode() + np.ascontiguousarray(d[k]).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- events
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.5]), st.integers(0, 4), st.integers(0, 5)), min_size=1, max_size=40
    ),
    st.randoms(use_true_random=False),
)
def test_event_queue_pops_in_time_actor_kind_insertion_order(events, rnd):
    q = EventQueue()
    for i, (t, actor, kind) in enumerate(events):
        q.push(t, actor, kind, i)
    popped = [q.pop() for _ in range(len(events))]
    keys = [(t, a, k, data) for t, a, k, _, data in popped]
    # the order is (time, actor, kind) and, for equal keys, the order of insertion
    assert keys == sorted(keys, key=lambda x: (x[0], x[1], x[2], x[3]))
    # the same events inserted in another order pop in the same (time, actor, kind) order
    shuffled = list(events)
    rnd.shuffle(shuffled)
    q2 = EventQueue()
    for t, actor, kind in shuffled:
        q2.push(t, actor, kind)
    assert [q2.pop()[:3] for _ in range(len(events))] == [k[:3] for k in keys]


def test_event_queue_refuses_the_past_and_nan():
    q = EventQueue()
    q.push(1.0, 0, 0)
    q.pop()
    with pytest.raises(ValueError):
        q.push(0.5, 0, 0)
    with pytest.raises(ValueError):
        q.push(float("nan"), 0, 0)


# ----------------------------------------------------------------------------------------------- timing
def test_one_client_round_time_by_hand(tmp_path):
    """One client, one step, 8 Mbit/s links (1 byte = 1 us) with 10 ms latency: the round's end is the sum
    of the exact message sizes (from the byte meter) and the fixed costs."""
    link = {"kind": "static", "rate_mbps": 8, "latency_ms": 10}
    cfg = _cfg(
        num_clients=1,
        training__local_steps=1,
        rounds__num_rounds=1,
        channel__uplink=link,
        channel__downlink=link,
    )
    costs = FixedCosts()
    recs, _, _, res = _run(tmp_path, cfg, costs)
    (r,) = recs
    by = r["bytes_by_method"]
    line = res.lines[0]
    b = 8
    # the batch's (trimmed) sequence length, from the edge's cost; the BERT server top costs its valid tokens
    s = round((r["breakdown"]["edge_compute"] - costs.opt) / ((costs.fwd + costs.bwd) * b))
    assert 2 <= s <= 16
    fwd, bwd = costs.fwd * b * s, costs.bwd * b * s + costs.opt
    tokens = r["breakdown"]["server_compute"] / costs.server
    assert tokens == pytest.approx(round(tokens)) and b <= round(tokens) < b * s  # padding is not computed
    server = costs.server * round(tokens)
    us = 1e-6
    t = by["AwaitRound|up"] * us + 0.01  # the AwaitRound request reaches the server
    t += by["AwaitRound|down"] * us + 0.01  # the round's adapter reaches the client
    t += fwd + by["Train|up"] * us + 0.01 + server + by["Train|down"] * us + 0.01 + bwd
    t += by["PushAdapter|up"] * us + 0.01  # the adapter is in
    push = t
    t += costs.agg * 1 + line["sim"]["eval_s"]
    assert r["sim_time_s"] == pytest.approx(t, abs=1e-9)
    assert r["per_client"]["client-0"]["push_arrival"] == pytest.approx(push, abs=1e-9)
    assert r["sim_round_s"] == pytest.approx(sum(r["breakdown"].values()), abs=1e-9)
    assert r["breakdown"]["server_compute"] == pytest.approx(server)
    assert r["breakdown"]["server_wait"] == 0.0 and r["critical_client"] == "client-0"
    assert set(r["breakdown"]) == set(PARTS)


def test_run_is_reproducible_and_independent_of_workers_and_load(tmp_path):
    """Bit-identical metrics and final adapters: twice in process, with 2 worker processes, and with a
    busy-looping process beside it."""
    cfg = _cfg()
    first = _run(tmp_path, cfg)
    recs = first[0]
    assert [r["round"] for r in recs] == [0, 1]
    for r in recs:
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and 0 <= r["eval_accuracy"] <= 1
        assert r["sim_round_s"] == pytest.approx(sum(r["breakdown"].values()))
        assert "real_round_s" not in r and r["reported"] == ["client-0", "client-1", "client-2"]
    ref = _digest(*first[:3])
    assert _digest(*_run(tmp_path, cfg)[:3]) == ref
    assert _digest(*_run(tmp_path, cfg, workers=2)[:3]) == ref
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert _digest(*_run(tmp_path, cfg, workers=1)[:3]) == ref
    finally:
        busy.kill()
        busy.wait()


V1 = {
    "seed": 3,
    "model": {"family": "bert", "tiny": True, "cut": 2},
    "lora": {"r": 4, "alpha": 8},
    "data": {"dataset": "synthetic", "num_train": 192, "num_eval": 32, "max_seq_len": 16},
    "training": {"batch_size": 8, "local_steps": 3, "mode": "sfl-v1", "optim": {"lr": 0.01, "weight_decay": 0.01}},
    "rounds": {"num_rounds": 2, "deadline_s": 120},
    "aggregation": {"strategy": "fedit"},
    "num_clients": 3,
}  # tests/test_grpc_exactness.py's sfl-v1 case (its cached bundle)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in a)


def test_sfl_v1_equals_the_in_process_federated_reference(tmp_path):
    """The engine's math is the real system's: sfl-v1 over 3 clients equals `federated_train` (torch edge; the
    tolerance of tests/test_grpc_exactness.py, which holds real gRPC processes to the same reference)."""
    from splitwave.server.reference import federated_train

    cfg = parse_config({**V1, "channel": {"mode": "virtual"}})
    _, edge, top, _ = _run(tmp_path, cfg)
    ref_edge, ref_top = federated_train(cfg)
    assert _max_diff(edge, ref_edge) < 1e-5
    assert _max_diff(top, ref_top) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mode,clients", [("sfl-v1", 3), ("sfl-v2", 1)])
def test_engine_equals_real_grpc_processes(tmp_path, mode, clients):
    """The engine's final adapters equal a run of real server and edge processes over gRPC (ORT edges with one
    thread, as the engine's executors) to 1e-6: sfl-v1, where the order of clients does not matter, and one
    client."""
    import yaml

    from splitwave.launch import ProcessGroup, child_env

    raw = {**V1, "num_clients": clients, "training": {**V1["training"], "mode": mode}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({**raw, "channel": {"mode": "none"}}))
    run = tmp_path / "server"
    root = Path(__file__).resolve().parents[1]
    with ProcessGroup(cwd=root, env=child_env(omp_threads=1)) as procs:
        procs.start_server(
            cfg_path, run_dir=run, cache_dir=CACHE, ready_file=run / "ready.json", log=run / "server.log"
        )
        port = procs.wait_ready("server", run / "ready.json", timeout=300)
        names = [f"client-{i}" for i in range(clients)]
        for name in names:
            procs.start_edge(
                name,
                f"127.0.0.1:{port}",
                cache_dir=tmp_path / "cache",
                log=tmp_path / f"{name}.log",
                extra=["--threads", "1"],
            )
        procs.wait_exit(names, timeout=600)
    final = tmp_path / "server" / FINAL_DIR
    real_edge, real_top = load_npz(final / EDGE_FILE), load_npz(final / TOP_FILE)
    _, edge, top, _ = _run(tmp_path / "engine", parse_config({**raw, "channel": {"mode": "virtual"}}))
    assert _max_diff(edge, real_edge) < 1e-6
    assert _max_diff(top, real_top) < 1e-6


# ----------------------------------------------------------------------------------------------- stragglers
def test_a_straggler_misses_the_deadline_and_comes_back(tmp_path):
    """client-2's device is offline from 0.05 s to 12 s: round 0 closes at its 10 s deadline without it, its
    late step is refused when it reaches the server at 12 s, and it takes part again in round 1."""
    cfg = _cfg(rounds__deadline_s=10.0)
    devices = [Host(), Host(), Host(gaps=[(0.05, 12.0)])]
    recs, _, _, _ = _run(tmp_path, cfg, devices=devices)
    r0, r1 = recs
    assert r0["late"] == ["client-2"] and r0["reported"] == ["client-0", "client-1"]
    assert r0["critical_client"] is None and r0["breakdown"]["deadline"] == pytest.approx(10.0)
    assert r0["sim_round_s"] == pytest.approx(10.0 + r0["server_close_s"])
    assert r1["reported"] == ["client-0", "client-1", "client-2"]  # back after its outage
    assert r1["per_client"]["client-2"]["offline"] == 0.0
    # its round 1 could start only after its outage and its refused step
    assert r1["critical_client"] == "client-2" and r1["sim_time_s"] > 12.0


def test_slow_device_is_the_critical_client(tmp_path):
    cfg = _cfg()
    devices = [Host(), Host(factor=4.0), Host()]
    recs, _, _, _ = _run(tmp_path, cfg, devices=devices)
    for r in recs:
        assert r["critical_client"] == "client-1"
        pc = r["per_client"]
        assert pc["client-1"]["edge_compute"] == pytest.approx(4 * pc["client-0"]["edge_compute"], rel=0.35)


def test_server_batch_fuses_steps_that_wait_together(tmp_path):
    """server_batch 3 with a long wait for company: every server step fuses the three clients' steps (each
    client is charged the same fused steps); unfused, each client's steps cost their own shapes."""
    fused = _cfg(training__server_batch=3, training__server_batch_wait_ms=1000)
    rf, _, _, _ = _run(tmp_path, fused)
    rs, _, _, _ = _run(tmp_path, _cfg())
    for a, b in zip(rf, rs):
        compute_fused = {p["server_compute"] for p in a["per_client"].values()}
        compute_single = [p["server_compute"] for p in b["per_client"].values()]
        assert len(compute_fused) == 1  # the same fused server steps for all three
        assert compute_fused.pop() == pytest.approx(sum(compute_single), rel=0.3)
        assert math.isfinite(a["eval_accuracy"])


def test_server_batch_with_groups_of_every_size_is_reproducible(tmp_path):
    """server_batch 2 with three clients: groups of two and lone steps (a lone step waits 2 ms for company,
    then goes alone); the run finishes and is the same with 2 worker processes."""
    cfg = _cfg(training__server_batch=2)
    a = _run(tmp_path, cfg)
    assert [r["reported"] for r in a[0]] == [["client-0", "client-1", "client-2"]] * 2
    sizes = a[3].stats["server_steps_by_size"]
    assert set(sizes) == {1, 2} and sizes[1] + 2 * sizes[2] == 3 * 3 * 2  # every client step served once
    assert _digest(*_run(tmp_path, cfg, workers=2)[:3]) == _digest(*a[:3])


@pytest.mark.parametrize(
    "over",
    [
        {"aggregation__strategy": "fedex-lora"},  # base-weight deltas: executors rebuild their graphs per version
        {"aggregation__strategy": "flora", "aggregation__params": {"client_ranks": {"client-0": 2, "client-1": 3}}},
        {"training__mode": "sl", "training__edge_mode": "saved", "training__codec_up": "int8"},
    ],
    ids=["fedex-lora", "flora-ranks", "sl-saved-int8"],
)
def test_strategies_and_modes_are_reproducible_across_executors(tmp_path, over):
    """The edge-side paths of the directives (base deltas, FLoRA re-init at a client's rank), saved
    activations and a lossy codec give the same run in process and on a worker process."""
    cfg = _cfg(**over)
    a = _run(tmp_path, cfg)
    assert len(a[0]) == 2 and all(r["reported"] for r in a[0])
    assert _digest(*_run(tmp_path, cfg, workers=1)[:3]) == _digest(*a[:3])


# ----------------------------------------------------------------------------------------------- codec policy
def test_channel_aware_policy_picks_each_clients_codecs_from_its_links(tmp_path):
    """Three clients, one with a slow uplink and one with a slow downlink (0.05 Mbit/s: nothing fits the
    50 ms budget, so the coarsest rung), the rest 1 Gbit/s (raw fits): every step's codecs follow its client's
    links, the server sends grad_h in the codec the step asked for, the counts are in metrics, the run is
    reproducible, and the slow links carry fewer bytes than under the fixed raw codec."""
    fast, slow = {"rate_mbps": 1000}, {"rate_mbps": 0.05}
    policy = {"kind": "channel_aware", "ladder": ["raw", "fp16", "int8"], "budget_s": 0.05}
    over = {
        "training__codec_policy": policy,
        "channel__per_client": [
            {"uplink": fast, "downlink": fast},
            {"uplink": slow, "downlink": fast},
            {"uplink": fast, "downlink": slow},
        ],
        "rounds__deadline_s": 1000,
    }
    cfg = _cfg(**over)
    first = _run(tmp_path, cfg)
    for r in first[0]:
        assert r["codecs"] == {"up": {"int8": 3, "raw": 6}, "down": {"int8": 3, "raw": 6}}
        assert r["reported"] == ["client-0", "client-1", "client-2"]
    assert _digest(*_run(tmp_path, cfg)[:3]) == _digest(*first[:3])
    packed = _run(tmp_path, _cfg(training__packed=True, **over))
    assert [r["codecs"] for r in packed[0]] == [r["codecs"] for r in first[0]]  # packed steps: the same choices here
    fixed, _, _, _ = _run(tmp_path, _cfg(channel__per_client=cfg.channel.per_client, rounds__deadline_s=1000))
    assert [r["codecs"] for r in fixed] == [{"up": {"raw": 9}, "down": {"raw": 9}}] * 2
    for a, b in zip(first[0], fixed):
        assert a["bytes_by_method"]["Train|up"] < b["bytes_by_method"]["Train|up"]
        assert a["bytes_by_method"]["Train|down"] < b["bytes_by_method"]["Train|down"]
