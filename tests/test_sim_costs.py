"""Compute cost models of the simulation engine: the measured table is measured once and then read, the
same numbers come back however loaded the machine is, costs grow with batch and sequence length, and the
FLOP model lands within an order of magnitude of the measured one on a tiny model."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitwave.common.config import parse_config
from splitwave.common.manifest import BundleManifest
from splitwave.sim import costs as C

TINY = {
    "model": {"family": "bert", "cut": 2},
    "lora": {"r": 4, "alpha": 8},  # the conftest bundle's
    "data": {"max_seq_len": 16},
    "training": {"batch_size": 4},
}
SHAPES = list(itertools.product((1, 2, 3, 4, 6, 9), (1, 7, 8, 9, 15, 16, 17, 30)))


def tiny(**sim):
    return parse_config({**TINY, "sim": sim})


@pytest.fixture(scope="module")
def setup(edge_bundle, tmp_path_factory):
    """(bundle dir, cache dir, measured model, flops model): one measurement for the whole module."""
    bundle = edge_bundle("bert").path
    cache = tmp_path_factory.mktemp("sim-cache")
    return (
        bundle,
        cache,
        C.build_cost_model(tiny(), bundle, cache),
        C.build_cost_model(tiny(cost_model="flops"), bundle, cache),
    )


def values(m: C.CostModel) -> list[float]:
    """Every method at a spread of shapes (inside, between and beyond the measured grid)."""
    out = [m.edge_optimizer_s()]
    for b, s in SHAPES:
        out += [m.edge_forward_s(b, s), m.edge_backward_s(b, s), m.server_eval_s(b, s)]
        out += [m.server_step_s(b, s, k) for k in (1, 2, 3)]
    return out + [m.aggregate_s(n) for n in range(0, 60, 7)]


@pytest.mark.parametrize("kind", ["measured", "flops"])
def test_costs_are_positive_and_grow_with_batch_and_sequence(setup, kind):
    m = setup[2] if kind == "measured" else setup[3]
    assert m.kind == kind and m.edge_optimizer_s() > 0
    for fn in (m.edge_forward_s, m.edge_backward_s, m.server_step_s, m.server_eval_s):
        for b, s in itertools.product(range(1, 10), range(1, 40)):
            v = fn(b, s)
            assert v > 0
            assert fn(b + 1, s) >= v and fn(b, s + 1) >= v, (fn.__name__, b, s)
    assert m.server_step_s(4, 16, fused=2) >= m.server_step_s(4, 16) and m.server_step_s(4, 16, 2) == m.server_step_s(
        8, 16
    )
    # a server that computes only the valid tokens (a BERT top): full rows cost as before, fewer tokens less
    for b, s in itertools.product(range(1, 10), range(8, 40, 8)):
        full = m.server_step_s(b, s)
        assert m.server_step_s(b, s, tokens=b * s) == pytest.approx(full, rel=1e-12)
        assert m.server_step_s(b, s, tokens=b * s + 7) == pytest.approx(full, rel=1e-12)  # never above full rows
        costs = [m.server_step_s(b, s, tokens=n) for n in range(b, b * s + 1)]
        assert all(0 < c <= full * (1 + 1e-12) for c in costs) and costs == sorted(costs)
    agg = [m.aggregate_s(n) for n in range(0, 60)]
    assert agg == sorted(agg) and agg[1] > 0


def test_sequence_lengths_are_bucketed(setup):
    m = setup[2]
    assert len({m.edge_forward_s(4, s) for s in range(9, 17)}) == 1
    assert C.bucket(1) == C.bucket(8) == 8 and C.bucket(9) == 16 and C.seq_grid(48) == [8, 16, 32, 48]


def test_a_cached_table_gives_identical_values_without_measuring(setup, monkeypatch):
    bundle, cache, measured, flops = setup
    monkeypatch.setattr(C, "measure_table", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(C, "measure_torch_ops", lambda *a: pytest.fail("calibrated again"))
    again = C.build_cost_model(tiny(), bundle, cache)
    assert values(again) == values(measured)
    assert values(C.build_cost_model(tiny(cost_model="flops"), bundle, cache)) == values(flops)
    # what the table depends on is in its key: another batch size is another table
    manifest = BundleManifest.from_file(bundle)
    other = parse_config({**TINY, "training": {"batch_size": 8}})
    assert C.table_spec(other, manifest) != C.table_spec(tiny(), manifest)


def test_a_loaded_machine_does_not_change_the_numbers(setup, monkeypatch):
    bundle, cache, measured, flops = setup
    monkeypatch.setattr(C, "measure_table", lambda *a: pytest.fail("measured again"))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert all(p.poll() is None for p in busy)
        assert values(C.build_cost_model(tiny(), bundle, cache)) == values(measured)
        assert values(C.build_cost_model(tiny(cost_model="flops"), bundle, cache)) == values(flops)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_the_flop_model_is_within_an_order_of_magnitude_of_measured(setup):
    _, _, measured, flops = setup
    for name in ("edge_forward_s", "edge_backward_s", "server_step_s", "server_eval_s"):
        for b, s in ((1, 8), (4, 16)):
            ratio = getattr(measured, name)(b, s) / getattr(flops, name)(b, s)
            assert 0.1 < ratio < 10, (name, b, s, ratio)
    assert 0.1 < measured.edge_optimizer_s() / flops.edge_optimizer_s() < 10
    assert flops.to_dict()["edge_graph_ops"][1] > flops.to_dict()["edge_graph_ops"][0] > 0


def test_plan_profiles_a_cut_with_the_same_timing_code():
    from splitwave.plan import profile_cut

    prof = profile_cut(parse_config(TINY), 1, reps=2)
    assert prof["cut"] == 1 and prof["t_edge_bwd"] > prof["t_edge_fwd"] > 0 and prof["t_server"] > 0
    assert prof["act_bytes"] > 0 and prof["grad_bytes"] > 0


@settings(max_examples=300, deadline=None)
@given(
    full=st.floats(1e-6, 1e3),
    half=st.floats(0.0, 2e3),
    shares=st.lists(st.floats(0.0, 2.0), min_size=2, max_size=6),
)
def test_valid_share_cost_is_bounded_and_monotone(full, half, shares):
    """A step on valid tokens costs between a tenth of the full-row step and the full-row step, never less for
    more valid tokens; full rows cost exactly the full-row time, half-valid rows the (capped) half time."""
    costs = [C.valid_share_cost(full, half, x) for x in sorted(shares)]
    assert all(0.1 * full <= c <= full for c in costs) and costs == sorted(costs)
    assert C.valid_share_cost(full, half, 1.0) == full
    assert C.valid_share_cost(full, half, 0.5) == pytest.approx(max(0.1 * full, min(half, full)), rel=1e-9)
