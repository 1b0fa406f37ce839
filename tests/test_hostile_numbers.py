"""One hostile client must not poison the model (issue 12, items 1, 2 and 5's PushAdapter precondition).

Live probes run the tiny config with an honest edge; after its step 1 of round 0 a hostile sequence is fired
with a raw stub (with the honest client's own token: the checks must hold even for a peer that stole it).
The refusal's status and message are checked, and the honest client's final adapters must equal those of a
run without the attack, bit for bit. Trainer and aggregation guards are also checked directly: a refused
step or aggregate leaves the adapter, AdamW and strategy state bit-identical.
"""

from __future__ import annotations

import copy
import json

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from net_helpers import (
    ROOT,
    assert_same_factors,
    final_factors,
    rss_bytes,
    run_clients,
    run_with_attack,
    serving,
    tiny_cfg,
)

from splitwave.common import lora
from splitwave.common.config import DEFAULT_CLIP_NORM, ConfigError
from splitwave.common.robust_rules import min_clients_for
from splitwave.edge.client import EdgeClient
from splitwave.protos import splitwave_pb2 as pb
from splitwave.protos.codec import encode
from splitwave.server.aggregation import ClientUpdate, make_strategy
from splitwave.server.aggregation.robust import Combiner
from splitwave.server.errors import ServiceError
from splitwave.server.rounds import HISTORY_KEEP, RoundManager
from splitwave.server.trainer import StepInput, TopTrainer
from splitwave.server.validation import checked_float32
from tests.conftest import make_split

EDGE_CACHE = ROOT / ".cache" / "edge-tests"
B, S, H = 8, 16, 32  # batch, sequence, hidden of the tiny config
C = grpc.StatusCode


def _run(tmp_path, attack=None, when=("step", 0, 1), overrides=None, **sections):
    """The honest client with `attack(stub, joined, app)` at `when` (net_helpers.run_with_attack)."""
    factors, result, _ = run_with_attack(tmp_path, tiny_cfg(overrides, **sections), EDGE_CACHE, attack, when)
    return factors, result


_REFERENCES: dict = {}


def reference(tmp_path_factory, mode: str = "sfl-v1"):
    """The honest client's result without any attack (one run per training mode)."""
    if mode not in _REFERENCES:
        _REFERENCES[mode] = _run(tmp_path_factory.mktemp(f"ref-{mode}"), training={"mode": mode})[0]
    return _REFERENCES[mode]


def _hdr(j, round_idx=0, step=2):
    return pb.Header(session_token=j.session_token, run_id=j.run_id, round=round_idx, step=step)


def _train(stub, j, h, step=2):
    hdr = _hdr(j, step=step)
    msgs = [
        pb.TrainRequest(header=hdr, frame=f)
        for name, a in (("h", h), ("attention_mask", np.ones((B, S), np.int64)), ("labels", np.zeros(B, np.int64)))
        for f in encode(name, a)
    ]
    msgs.append(pb.TrainRequest(header=hdr, end_step=pb.StepEnd(batch_size=B)))
    try:
        for _ in stub.Train(iter(msgs), timeout=20):
            pass
    except grpc.RpcError as e:
        return e.code(), e.details()
    return C.OK, ""


def _factors(j, value=0.0) -> dict[str, np.ndarray]:
    return {f["name"]: np.full(f["shape"], value, np.float32) for f in json.loads(j.manifest_json)["factors"]}


def _push(stub, j, factors, num_samples=8, metrics=None, round_idx=0):
    hdr = _hdr(j, round_idx=round_idx)
    msgs = [pb.AdapterRequest(header=hdr, frame=f) for k, v in factors.items() for f in encode(k, v)]
    msgs.append(
        pb.AdapterRequest(header=hdr, end=pb.AdapterEnd(num_samples=num_samples, local_steps=1, metrics=metrics or {}))
    )
    try:
        stub.PushAdapter(iter(msgs), timeout=20)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return C.OK, ""


def _trainer_state(app) -> dict:
    return copy.deepcopy(app.trainer.state_dict())


def _assert_same_state(a, b, where="state"):
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ----------------------------------------------------------------------------- Train steps, live
def _step_probe(h):
    """Send `h` as step 2; the trainer's adapters and AdamW moments must be exactly as before."""

    def attack(stub, j, app):
        before = _trainer_state(app)
        got = _train(stub, j, h)
        _assert_same_state(_trainer_state(app), before, "trainer")
        return got

    return attack


def float64_1e300():
    return np.full((B, S, H), 1e300, np.float64)  # finite as float64, inf as the float32 the model computes in


def float32_1e30():
    return np.full((B, S, H), 1e30, np.float32)


def nan_producing():
    """Finite and in bound (the bound is raised to 1e38 for this probe), but the server's forward overflows."""
    return (np.sign(np.random.default_rng(0).standard_normal((B, S, H))) * 1e20).astype(np.float32)


STEP_PROBES = [
    (float64_1e300, [], C.INVALID_ARGUMENT, "NaN or Inf"),
    (float32_1e30, [], C.INVALID_ARGUMENT, "max_abs_value"),
    (nan_producing, ["server.security.max_abs_value=1e38"], C.INVALID_ARGUMENT, "not finite"),
]


@pytest.mark.parametrize("mode", ["sfl-v1", "sfl-v2"])
@pytest.mark.parametrize("make_h,overrides,code,text", STEP_PROBES, ids=[p[0].__name__ for p in STEP_PROBES])
def test_hostile_step_is_refused_and_changes_nothing(tmp_path, tmp_path_factory, mode, make_h, overrides, code, text):
    factors, (got, details) = _run(tmp_path, _step_probe(make_h()), overrides=overrides, training={"mode": mode})
    assert got == code and text.lower() in details.lower(), (got, details)
    assert_same_factors(factors, reference(tmp_path_factory, mode))


# ----------------------------------------------------------------------------- Train steps, trainer
def _steps(split, n, seed=0):
    rng = np.random.default_rng(seed)
    hidden = split.peft_model.config.hidden_size
    return [
        StepInput(
            f"c{i}",
            rng.standard_normal((4, 8, hidden)).astype(np.float32),
            np.ones((4, 8), np.int64),
            rng.integers(0, 2, 4).astype(np.int64),
        )
        for i in range(n)
    ]


def _poison(step):
    return StepInput(step.client_id, (np.sign(step.h) * 3e38).astype(np.float32), step.attention_mask, step.labels)


@pytest.mark.parametrize("personal", [False, True], ids=["sfl-v2", "sfl-v1"])
def test_nonfinite_step_leaves_adapter_and_adamw_untouched(personal):
    tr = TopTrainer(make_split("bert", "seq-cls", cut=2), "seq-cls", lr=0.01, weight_decay=0.01, personal=personal)
    good = _steps(tr.split, 1)[0]
    tr.train_step(good.client_id, good.h, good.attention_mask, good.labels)  # AdamW has moments now
    before = copy.deepcopy(tr.state_dict())
    bad = _poison(good)
    with pytest.raises(ServiceError, match="not finite") as err:
        tr.train_step(bad.client_id, bad.h, bad.attention_mask, bad.labels)
    assert err.value.code == "INVALID_ARGUMENT"
    _assert_same_state(tr.state_dict(), before)
    assert all(p.grad is None for p in tr.params.values())


def test_fused_step_refuses_only_the_bad_member():
    """Fused [c0, bad c1, c2]: c1 is refused; c0 and c2 get exactly the fused step of [c0, c2]."""
    split = make_split("bert", "seq-cls", cut=2)
    a = TopTrainer(split, "seq-cls", lr=0.01, weight_decay=0.01, server_batch=3)
    start = copy.deepcopy(a.state_dict())
    steps = _steps(split, 3)
    got = a._train_fused([steps[0], _poison(steps[1]), steps[2]])
    after_attack = copy.deepcopy(a.state_dict())
    assert isinstance(got[1], ServiceError) and got[1].code == "INVALID_ARGUMENT"
    a.load_state_dict(start)
    want = a._train_fused([steps[0], steps[2]])
    for g, w in zip((got[0], got[2]), want):
        assert np.array_equal(g.grad_h, w.grad_h) and g.loss == w.loss and g.server_batch == w.server_batch == 2
    _assert_same_state(after_attack, a.state_dict())


def test_fused_step_via_batcher_delivers_per_member_refusal():
    import threading

    split = make_split("bert", "seq-cls", cut=2)
    tr = TopTrainer(split, "seq-cls", lr=0.01, server_batch=2, server_batch_wait_s=2.0)
    good, bad = _steps(split, 2)
    bad = _poison(bad)
    out = {}

    def go(s):
        try:
            out[s.client_id] = tr.train_step(s.client_id, s.h, s.attention_mask, s.labels)
        except ServiceError as e:
            out[s.client_id] = e

    threads = [threading.Thread(target=go, args=(s,)) for s in (good, bad)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert isinstance(out["c1"], ServiceError) and np.isfinite(out["c0"].loss)
    assert all(torch.isfinite(p).all() for p in tr.params.values())


# ----------------------------------------------------------------------------- PushAdapter, live
def push_1e30(stub, j, app):
    return _push(stub, j, _factors(j, 1e30))


def push_huge_metrics(stub, j, app):
    """~0.9 MiB of metrics (12k entries): refused, again and again, without the server keeping any of it."""
    metrics = {f"m{i:05d}".ljust(60, "x"): float(i) for i in range(12000)}
    rss0 = rss_bytes()
    outs = [_push(stub, j, _factors(j), metrics=metrics) for _ in range(20)]
    assert rss_bytes() - rss0 < 64 << 20, "server memory grew with refused metrics"
    assert len(set(outs)) == 1
    long_name = _push(stub, j, _factors(j), metrics={"x" * 1000: 1.0})
    assert long_name[0] == C.INVALID_ARGUMENT and "longer than" in long_name[1]
    return outs[0]


def push_before_training(stub, j, app):
    return _push(stub, j, _factors(j), round_idx=app.rounds.round_idx)


PUSH_PROBES = [
    (push_1e30, ("step", 0, 1), C.INVALID_ARGUMENT, "max_abs_value"),
    (push_huge_metrics, ("step", 0, 1), C.INVALID_ARGUMENT, "metrics map has 12000 entries"),
    (push_before_training, ("round", 0, None), C.FAILED_PRECONDITION, "no training step"),
    (push_before_training, ("round", 1, None), C.FAILED_PRECONDITION, "no training step"),
]


@pytest.mark.parametrize("attack,when,code,text", PUSH_PROBES, ids=[f"{p[0].__name__}-r{p[1][1]}" for p in PUSH_PROBES])
def test_hostile_push_is_refused_and_changes_nothing(tmp_path, tmp_path_factory, attack, when, code, text):
    factors, (got, details) = _run(tmp_path, attack, when=when)
    assert got == code and text.lower() in details.lower(), (got, details)
    assert_same_factors(factors, reference(tmp_path_factory))


def test_claimed_num_samples_do_not_weigh(tmp_path):
    """A client claiming 2^64-1 samples gets the same weight as when it tells the truth: its shard's size."""

    class Liar(EdgeClient):
        def setup(self):
            super().setup()
            self.num_samples = 2**64 - 1

    cfg = tiny_cfg(num_clients=2)
    results = {}
    for name, classes in (("honest", None), ("liar", {"mallory": Liar})):
        with serving(cfg, tmp_path / name) as srv:
            out = run_clients(srv.address, ["alice", "mallory"], EDGE_CACHE, classes=classes)
            assert all(isinstance(v, dict) and v["rounds"] == 2 for v in out.values()), out
            results[name] = final_factors(srv.app)
    assert_same_factors(results["liar"], results["honest"])


# ----------------------------------------------------------------------------- aggregation guards
MOD = "base_model.model.enc.layer.0.attn.query"


def _adapter(rng, r=2, d_in=6, d_out=8):
    return {
        lora.a_key(MOD): rng.normal(size=(r, d_in)).astype(np.float32),
        lora.b_key(MOD): np.zeros((d_out, r), np.float32),
    }


def test_aggregate_beyond_the_bound_is_not_committed():
    rng = np.random.default_rng(0)
    init = _adapter(rng)
    st = make_strategy("fedit", max_abs_value=10.0, server_opt={"name": "adam", "lr": 1e3})
    st.initialize(init)
    before = copy.deepcopy(st.state_dict())
    ups = [ClientUpdate(f"c{i}", {k: v + 1.0 for k, v in init.items()}, 8) for i in range(2)]
    with pytest.raises(ValueError, match="not committed"):
        st.aggregate(0, ups)
    _assert_same_state(st.state_dict(), before)
    ok = make_strategy("fedit", max_abs_value=10.0)
    ok.initialize(init)
    assert ok.aggregate(0, ups).metrics["aggregate_max_abs"] <= 10.0


def test_round_keeps_the_previous_global_when_the_aggregate_is_refused():
    rng = np.random.default_rng(1)
    init = _adapter(rng)
    st = make_strategy("fedit", max_abs_value=10.0, server_opt={"name": "adam", "lr": 1e3})
    st.initialize(init)
    rm = RoundManager(st, num_rounds=2, expected_clients=1, deadline_s=30)
    try:
        rm.register("c0")
        a = rm.wait_assignment("c0", 0, timeout=5)
        before = st.global_output()
        rm.submit("c0", a.round_idx, {k: v + 1.0 for k, v in init.items()}, 8.0, {"train_loss": 0.5})
        rec = rm.history[-1]
        assert rec.result is None and "not committed" in rec.refused
        assert rm.last_metrics["aggregate_refused"] == 1.0
        _assert_same_state(st.global_output(), before)
    finally:
        rm.stop()


def test_round_history_is_bounded():
    rng = np.random.default_rng(2)
    init = _adapter(rng)
    st = make_strategy("fedit")
    st.initialize(init)
    n = HISTORY_KEEP + 10
    rm = RoundManager(st, num_rounds=n, expected_clients=1, deadline_s=30)
    try:
        rm.register("c0")
        for r in range(n):
            a = rm.wait_assignment("c0", r, timeout=5)
            rm.submit(
                "c0",
                a.round_idx,
                {k: np.asarray(v) for k, v in a.directive.load_factors.items()},
                8.0,
                {f"m{i}": 1.0 for i in range(64)},
            )
        assert rm.stopped and len(rm.history) == HISTORY_KEEP
    finally:
        rm.stop()


def test_metrics_map_over_the_cap_is_refused():
    rng = np.random.default_rng(3)
    st = make_strategy("fedit")
    st.initialize(_adapter(rng))
    rm = RoundManager(st, num_rounds=1, expected_clients=1, deadline_s=30, max_metrics_entries=4)
    try:
        rm.register("c0")
        a = rm.wait_assignment("c0", 0, timeout=5)
        with pytest.raises(ServiceError, match="at most 4") as err:
            rm.submit("c0", 0, a.directive.load_factors, 8.0, {f"m{i}": 1.0 for i in range(5)})
        assert err.value.code == "INVALID_ARGUMENT" and not rm.reports
    finally:
        rm.stop()


# ----------------------------------------------------------------------------- config
def test_update_clipping_is_on_by_default_and_can_be_switched_off():
    assert tiny_cfg().aggregation.robust == {"clip_norm": DEFAULT_CLIP_NORM}
    assert tiny_cfg(["aggregation.robust.method=median"], num_clients=3).aggregation.robust == {
        "clip_norm": DEFAULT_CLIP_NORM,
        "method": "median",
    }
    assert tiny_cfg(["aggregation.robust.clip_norm=null"]).aggregation.robust == {}
    assert tiny_cfg(["aggregation.robust.clip_norm=2.5"]).aggregation.robust == {"clip_norm": 2.5}


@pytest.mark.parametrize(
    "robust,clients,need",
    [
        ({"method": "median"}, 2, 3),
        ({"method": "trimmed_mean", "trim_ratio": 0.1}, 9, 10),
        ({"method": "trimmed_mean", "trim_ratio": 0.25}, 3, 4),
    ],
)
def test_robust_methods_need_enough_clients_at_config_load(robust, clients, need):
    with pytest.raises(ConfigError, match=f"needs at least {need} clients"):
        tiny_cfg(num_clients=clients, aggregation={"strategy": "fedit", "robust": robust})
    tiny_cfg(num_clients=need, aggregation={"strategy": "fedit", "robust": robust})
    with pytest.raises(ConfigError, match="trim_ratio"):
        tiny_cfg(
            num_clients=4, aggregation={"strategy": "fedit", "robust": {"method": "trimmed_mean", "trim_ratio": 0.0}}
        )


@pytest.mark.parametrize("robust,n", [({"method": "median"}, 2), ({"method": "trimmed_mean", "trim_ratio": 0.25}, 3)])
def test_robust_methods_refuse_too_few_clients_at_aggregation(robust, n):
    rng = np.random.default_rng(4)
    init = _adapter(rng)
    st = make_strategy("fedit", robust=robust)
    st.initialize(init)
    before = copy.deepcopy(st.state_dict())
    with pytest.raises(ValueError, match="needs at least"):
        st.aggregate(0, [ClientUpdate(f"c{i}", init, 8) for i in range(n)])
    _assert_same_state(st.state_dict(), before)


# ----------------------------------------------------------------------------- properties
_ANY_F64 = arrays(np.float64, st.integers(1, 24), elements=st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=300, deadline=None)
@given(_ANY_F64, st.floats(1e-3, 1e38))
def test_checked_float32_accepts_exactly_what_float32_holds_within_the_bound(a, bound):
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = a.astype(np.float32)
    ok = bool(np.isfinite(as32).all() and (np.abs(as32.astype(np.float64)) <= bound).all())  # exact comparison
    try:
        out = checked_float32("x", a, bound)
    except ServiceError as e:
        assert not ok and e.code == "INVALID_ARGUMENT"
    else:
        assert ok and out.dtype == np.float32 and np.array_equal(out, as32)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["median", "trimmed_mean"]), st.floats(0.01, 0.49), st.integers(1, 200))
def test_min_clients_is_the_first_count_where_the_robust_rule_drops_someone(method, trim, k):
    need = min_clients_for(method, trim)
    if method == "median":
        assert need == 3
    else:  # trimmed: drops floor(trim*k) >= 1 from each end and keeps at least one value
        dropped = int(np.floor(trim * k))
        assert (k >= need) == (dropped >= 1 and k >= 3)
        assert k < need or k - 2 * dropped >= 1


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float64, (3, 4), elements=st.floats(-1e6, 1e6)),
    arrays(np.float64, (3, 4), elements=st.floats(-1e6, 1e6)),
    st.floats(1e-3, 1e3),
)
def test_clipped_update_never_exceeds_the_bound_and_honest_ones_are_untouched(new, start, c):
    out, norm = Combiner({"clip_norm": c}).clip({"k": new}, {"k": start})
    got = float(np.linalg.norm(out["k"] - start))
    assert got <= c * (1 + 1e-9) + 1e-9
    if norm <= c:
        assert np.array_equal(out["k"], new)
