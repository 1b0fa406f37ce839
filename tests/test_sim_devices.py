"""Simulated client devices: draws from the seed only, class factors, mixes/lists/spreads honoured,
availability (online / next_online agree, for any time), and the sim config's validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from splitwave.common.config import ConfigError, dump_config, load_config, parse_config
from splitwave.common.device_classes import DEVICE_CLASSES
from splitwave.sim import devices as D

ROOT = Path(__file__).resolve().parents[1]
HOST_GFLOPS = 100.0


@pytest.fixture(autouse=True)
def fixed_host(monkeypatch):
    """A host of 100 GFLOP/s: class factors become exact numbers and no test calibrates by accident."""
    monkeypatch.setattr(D, "host_gflops", lambda threads=1, cache_dir=None: HOST_GFLOPS)


def cfg(sim: dict | None = None, n: int = 8, seed: int = 0):
    return parse_config({"num_clients": n, "seed": seed, "sim": sim or {}})


def factors(c) -> list[float]:
    return [d.edge_factor for d in D.build_devices(c)]


# ------------------------------------------------------------------------------------------- draws
def test_default_is_the_host_always_online():
    devs = D.build_devices(cfg())
    assert [d.edge_factor for d in devs] == [1.0] * 8 and {d.name for d in devs} == {"host"}
    assert all(d.online(t) and d.next_online(t) == t for d in devs for t in (0.0, 5.5, 1e9))
    assert not any(d.drops_out(r) for d in devs for r in range(20))


def test_a_class_for_all_gets_host_over_class_throughput():
    for name, c in DEVICE_CLASSES.items():
        assert factors(cfg({"devices": name}, n=3)) == [HOST_GFLOPS / c.gflops] * 3
    assert DEVICE_CLASSES["phone"].gflops < DEVICE_CLASSES["laptop"].gflops < DEVICE_CLASSES["gpu-server"].gflops
    assert all(c.source and c.device for c in DEVICE_CLASSES.values())


def test_draws_are_deterministic_from_the_seed_and_per_client():
    sim = {
        "devices": {"mix": {"phone": 3, "rpi4": 1, "laptop": 1}, "lognormal_sigma": 0.3},
        "availability": {"dropout": 0.3, "mean_on_s": 50, "mean_off_s": 20},
    }
    a, b = D.build_devices(cfg(sim, n=50)), D.build_devices(cfg(sim, n=50))
    assert [d.to_dict() for d in a] == [d.to_dict() for d in b]
    assert [[d.online(t) for t in np.linspace(0, 500, 101)] for d in a] == [
        [d.online(t) for t in np.linspace(0, 500, 101)] for d in b
    ]
    assert [[d.drops_out(r) for r in range(10)] for d in a] == [[d.drops_out(r) for r in range(10)] for d in b]
    other = D.build_devices(cfg(sim, n=50, seed=1))
    assert [d.edge_factor for d in other] != [d.edge_factor for d in a]
    # client k's device does not depend on how many clients there are
    more = D.build_devices(cfg(sim, n=80))
    assert [d.to_dict() for d in more[:50]] == [d.to_dict() for d in a]


def test_the_mix_weights_are_honoured():
    devs = D.build_devices(cfg({"devices": {"mix": {"phone": 3, "rpi4": 1}}}, n=4000))
    share = sum(d.name == "phone" for d in devs) / len(devs)
    assert abs(share - 0.75) < 0.03
    # the order the YAML lists the classes in does not change the draw
    again = D.build_devices(cfg({"devices": {"mix": {"rpi4": 1, "phone": 3}}}, n=4000))
    assert [d.name for d in again] == [d.name for d in devs]


def test_per_client_entries_cycle_and_mix_names_with_factors():
    devs = D.build_devices(cfg({"devices": ["phone", 2.5, "host"]}, n=7))
    assert [d.name for d in devs] == ["phone", "factor", "host"] * 2 + ["phone"]
    assert [d.edge_factor for d in devs][:3] == [HOST_GFLOPS / 16.0, 2.5, 1.0]


def test_an_explicit_factor_needs_no_calibration(monkeypatch):
    monkeypatch.setattr(D, "host_gflops", lambda *a, **k: pytest.fail("calibrated for an explicit factor"))
    assert factors(cfg({"devices": 3.0, "server_device": 0.25}, n=4)) == [3.0] * 4
    assert D.server_factor(cfg({"server_device": 0.25})) == 0.25
    assert D.server_factor(cfg()) == 1.0


def test_the_lognormal_spread_is_centred_on_the_class():
    devs = D.build_devices(cfg({"devices": {"class": "rpi5", "lognormal_sigma": 0.4}}, n=4000))
    ratio = np.log([d.edge_factor / d.base_factor for d in devs])
    assert abs(np.median(ratio)) < 0.03 and abs(ratio.std() - 0.4) < 0.03
    assert all(d.base_factor == HOST_GFLOPS / 15.1 for d in devs)


def test_server_factor_of_a_gpu_server():
    assert D.server_factor(cfg({"server_device": "gpu-server"})) == HOST_GFLOPS / 13400.0


def test_host_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real host_gflops
    first = D.host_gflops(1, tmp_path)
    assert 0.1 < first < 1e5
    monkeypatch.setattr(D, "measure_gflops", lambda threads: pytest.fail("measured again"))
    assert D.host_gflops(1, tmp_path) == first
    assert D.class_factor("phone", 1, tmp_path) == first / 16.0


# ------------------------------------------------------------------------------------------- availability
def test_windows_once_and_offline_after_the_last():
    (d,) = D.build_devices(cfg({"availability": {"intervals": [[10, 20], [30, 40]]}}, n=1))
    assert [d.online(t) for t in (0, 10, 19.99, 20, 25, 30, 39.9, 40, 100)] == [
        False, True, True, False, False, True, True, False, False,
    ]  # fmt: skip
    assert [d.next_online(t) for t in (0, 15, 20, 35, 40)] == [10, 15, 30, 35, math.inf]


def test_periodic_windows_with_a_random_offset_per_client():
    av = {"intervals": [[0, 10]], "period_s": 100, "offset_s": "random"}
    devs = D.build_devices(cfg({"availability": av}, n=20))
    offsets = [d.to_dict()["windows_offset_s"] for d in devs]
    assert len(set(offsets)) == 20 and all(0 <= o < 100 for o in offsets)
    for d, o in zip(devs, offsets):
        assert d.online(o + 5) and d.online(o + 1005) and not d.online(o + 50)
        assert d.next_online(o + 50) == pytest.approx(o + 100)


def test_the_markov_process_spends_the_right_share_online():
    (d,) = D.build_devices(cfg({"availability": {"mean_on_s": 30, "mean_off_s": 10}}, n=1))
    ts = np.arange(0, 200_000, 7.0)
    share = np.mean([d.online(t) for t in ts])
    assert abs(share - 0.75) < 0.03


def test_dropout_is_a_coin_per_client_and_round():
    devs = D.build_devices(cfg({"availability": {"dropout": 0.2}}, n=200))
    outs = np.array([[d.drops_out(r) for r in range(50)] for d in devs])
    assert abs(outs.mean() - 0.2) < 0.02
    assert outs.any(axis=0).all() and not outs.all(axis=1).any()  # not the same clients every round


AVAIL = st.fixed_dictionaries(
    {},
    optional={
        "markov": st.tuples(st.floats(0.5, 1e4), st.floats(0.5, 1e4)),
        "windows": st.tuples(
            st.lists(st.floats(0, 1), min_size=2, max_size=8, unique=True).map(sorted),
            st.floats(1e-2, 1e5),
            st.one_of(st.just("random"), st.floats(-1e5, 1e5)),
        ),
    },
)


def _availability(spec: dict) -> dict:
    out: dict = {}
    if "markov" in spec:
        out["mean_on_s"], out["mean_off_s"] = spec["markov"]
    if "windows" in spec:
        cuts, period, offset = spec["windows"]
        pts = [c * period for c in cuts]
        out["intervals"] = [[pts[i], pts[i + 1]] for i in range(0, len(pts) - 1, 2)]
        out["period_s"], out["offset_s"] = period, offset
    return out


@settings(max_examples=200, deadline=None)
@given(AVAIL, st.lists(st.floats(-1e3, 1e6), min_size=1, max_size=6), st.integers(0, 3))
def test_next_online_is_the_first_online_time_from_t(spec, ts, client):
    av = _availability(spec)
    c = cfg({"availability": av}, n=client + 1)
    d = D.build_devices(c)[client]
    for t in ts:  # in the order hypothesis gives: the lazily drawn process must not care
        nxt = d.next_online(t)
        assert nxt >= t
        assert math.isinf(nxt) or d.online(nxt)
        assert (nxt == t) == d.online(t)
    twin = D.build_devices(c)[client]  # the same answers when asked in another order
    for t in sorted(ts, reverse=True):
        assert twin.online(t) == d.online(t) and twin.next_online(t) == d.next_online(t)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.5, 100), st.floats(0.5, 100), st.floats(0, 1e5))
def test_markov_offline_until_next_online(on, off, t):
    (d,) = D.build_devices(cfg({"availability": {"mean_on_s": on, "mean_off_s": off}}, n=1))
    nxt = d.next_online(t)
    assert d.online(nxt)
    if nxt > t:  # offline all the way from t to nxt
        assert not any(d.online(float(x)) for x in np.linspace(t, nxt, 20, endpoint=False))


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "sim, says",
    [
        ({"devices": "phon"}, "unknown device class 'phon'; did you mean 'phone'?"),
        ({"devices": {"class": "phone", "mix": {"rpi4": 1}}}, "give one of class, mix, per_client"),
        ({"devices": {"mix": {"phone": -1}}}, "mix.phone: a weight must be"),
        ({"devices": {"mix": {"phone": 0}}}, "the weights sum to 0"),
        ({"devices": [2.0, 0]}, "per_client[1]: a speed factor must be a finite number > 0"),
        ({"devices": {"lognormal_sigma": -0.1}}, "lognormal_sigma"),
        ({"devices": {"klass": "phone"}}, "did you mean sim.devices.class?"),
        ({"server_device": "tpu"}, "server_device: unknown device class 'tpu'"),
        ({"server_device": 0}, "server_device: a speed factor must be"),
        ({"executor": "spark"}, "sim.executor"),
        ({"workers": -1}, "sim.workers"),
        ({"server_workers": 0}, "sim.server_workers"),
        ({"ray_address": "auto"}, "ray_address is for executor 'ray'"),
        ({"cost_model": "guess"}, "sim.cost_model"),
        ({"availability": {"dropout": 1.0}}, "sim.availability.dropout"),
        ({"availability": {"mean_on_s": 10}}, "mean_on_s and mean_off_s go together"),
        ({"availability": {"intervals": [[5, 3]]}}, "intervals[0]: need finite start < end"),
        ({"availability": {"intervals": [[0, 5], [4, 8]]}}, "must be sorted and must not overlap"),
        ({"availability": {"intervals": [[0, 50]], "period_s": 40}}, "must lie within [0, 40]"),
        ({"availability": {"intervals": [[0, 5]], "offset_s": "random"}}, '"random" draws a shift'),
        ({"availability": {"period_s": 40}}, "give intervals too"),
    ],
)
def test_bad_sim_configs_name_the_field(sim, says):
    with pytest.raises(ConfigError) as e:
        cfg(sim)
    assert says in str(e.value)


def test_sim_config_round_trips_through_yaml():
    c = cfg(
        {
            "executor": "ray",
            "ray_address": "auto",
            "workers": 2,
            "devices": {"class": "rpi4", "lognormal_sigma": 0.2},
            "server_device": "gpu-server",
            "availability": {"intervals": [[0, 10]], "period_s": 20, "offset_s": "random", "dropout": 0.1},
        }
    )
    again = parse_config(yaml.safe_load(dump_config(c)))
    assert again == c and again.sim.devices.class_ == "rpi4"
    assert "class: rpi4" in dump_config(c)
    assert parse_config({}, ["sim.devices.class=laptop"]).sim.devices.class_ == "laptop"


def test_cell_1000_config_loads():
    c = load_config(ROOT / "configs" / "cell-1000.yaml")
    assert c.num_clients == 1000 and c.model.family == "minilm" and c.data.dataset == "sst2"
    assert c.data.partition == "dirichlet" and c.rounds.fraction == 0.05 and c.channel.mode == "virtual"
    assert len(c.channel.per_client) >= 3 and c.sim.devices.mix and c.sim.server_device == "gpu-server"
    devs = D.build_devices(c)
    assert len(devs) == 1000 and len({d.name for d in devs}) == len(c.sim.devices.mix)
