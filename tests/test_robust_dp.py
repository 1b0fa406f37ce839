"""Robust aggregation (clipping, median, trimmed mean), Gaussian-mechanism DP and RDP accounting."""

import math

import numpy as np
import pytest

from splitwave.common import lora
from splitwave.server.aggregation import (
    ClientUpdate,
    compute_epsilon,
    make_strategy,
    rdp_subsampled_gaussian,
    rdp_to_epsilon,
)
from splitwave.server.aggregation import lora_math as lm

MOD = "base_model.model.enc.layer.0.attn.query"
D_OUT, D_IN, R = 8, 6, 2


def init_adapter(rng):
    return {lora.a_key(MOD): rng.normal(size=(R, D_IN)), lora.b_key(MOD): np.zeros((D_OUT, R))}


def honest_round(rng, init, n=9, noise=0.05):
    """Clients that all move B by a common direction plus small noise (FFA-style, A frozen)."""
    direction = rng.normal(size=(D_OUT, R))
    ups = [
        ClientUpdate(
            f"c{k}", {lora.b_key(MOD): init[lora.b_key(MOD)] + direction + noise * rng.normal(size=(D_OUT, R))}, 10
        )
        for k in range(n)
    ]
    return ups, direction


def poison(ups, factor=100.0):
    bad = ups[0].factors[lora.b_key(MOD)] * factor
    return [ClientUpdate("evil", {lora.b_key(MOD): bad}, ups[0].num_samples)] + ups[1:]


def aggregate_b(init, ups, **kw):
    st = make_strategy("ffa-lora", dtype="float64", **kw)
    st.initialize(init)
    return st.aggregate(0, ups).global_factors[lora.b_key(MOD)], st


def test_median_shrugs_off_a_scaled_poisoned_update_that_wrecks_fedavg():
    rng = np.random.default_rng(0)
    init = init_adapter(rng)
    ups, direction = honest_round(rng, init)
    clean, _ = aggregate_b(init, ups)
    attacked_mean, _ = aggregate_b(init, poison(ups))
    attacked_median, _ = aggregate_b(init, poison(ups), robust={"method": "median"})
    attacked_trim, _ = aggregate_b(init, poison(ups), robust={"method": "trimmed_mean", "trim_ratio": 0.2})
    scale = np.linalg.norm(direction)
    assert np.linalg.norm(attacked_mean - clean) > 5 * scale  # FedAvg is wrecked
    assert np.linalg.norm(attacked_median - clean) < 0.1 * scale  # median barely moves
    assert np.linalg.norm(attacked_trim - clean) < 0.1 * scale


def test_norm_clipping_bounds_each_clients_influence():
    rng = np.random.default_rng(1)
    init = init_adapter(rng)
    ups, _ = honest_round(rng, init, n=4)
    C = 0.5
    got, st = aggregate_b(init, poison(ups), robust={"clip_norm": C})
    p = lm.sample_weights([u.num_samples for u in ups])
    expect = init[lora.b_key(MOD)].copy()
    for pk, u in zip(p, poison(ups)):
        d = u.factors[lora.b_key(MOD)] - init[lora.b_key(MOD)]
        expect += pk * d * min(1.0, C / np.linalg.norm(d))
    np.testing.assert_allclose(got, expect, atol=1e-12)


def test_clipping_is_relative_to_the_rounds_start_not_zero():
    rng = np.random.default_rng(2)
    init = init_adapter(rng)
    st = make_strategy("fedit", dtype="float64", robust={"clip_norm": 1e-3})
    st.initialize(init)
    same = ClientUpdate("c0", {k: v.copy() for k, v in init.items()}, 1)  # no change => nothing to clip
    res = st.aggregate(0, [same])
    assert res.metrics["update_norm_max"] == 0.0 and res.metrics["clipped_clients"] == 0.0
    for k, v in init.items():
        np.testing.assert_array_equal(res.global_factors[k], v)


def test_gaussian_mechanism_is_seeded_calibrated_and_accounted():
    rng = np.random.default_rng(3)
    init = {lora.a_key(MOD): rng.normal(size=(R, 400)), lora.b_key(MOD): np.zeros((500, R))}
    K, z, C = 5, 2.0, 0.1
    ups = [ClientUpdate(f"c{k}", {lora.b_key(MOD): np.zeros((500, R))}, 1 + k) for k in range(K)]  # zero updates
    dp = {"noise_multiplier": z, "clip_norm": C, "seed": 7, "delta": 1e-5, "sampling_rate": 1.0}

    def run(seed):
        st = make_strategy("ffa-lora", dtype="float64", dp={**dp, "seed": seed})
        st.initialize(init)
        return [st.aggregate(t, ups) for t in range(3)]

    a, b, c = run(7), run(7), run(8)
    noise = a[0].global_factors[lora.b_key(MOD)]
    np.testing.assert_array_equal(noise, b[0].global_factors[lora.b_key(MOD)])
    assert not np.array_equal(noise, c[0].global_factors[lora.b_key(MOD)])
    assert np.std(noise) == pytest.approx(z * C / K, rel=0.1)  # N(0, (zC)^2) on the sum, / K
    eps = [r.metrics["dp_epsilon"] for r in a]
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(compute_epsilon(z, 1.0, 3, 1e-5), rel=1e-12)


def test_dp_uses_uniform_weights_and_clips():
    rng = np.random.default_rng(4)
    init = init_adapter(rng)
    ups, _ = honest_round(rng, init, n=3)
    ups = [ClientUpdate(u.client_id, u.factors, 10**k) for k, u in enumerate(ups)]
    got, _ = aggregate_b(init, ups, dp={"noise_multiplier": 1e-12, "clip_norm": 1e3})
    want = np.mean([u.factors[lora.b_key(MOD)] for u in ups], axis=0)
    np.testing.assert_allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------- accountant
@pytest.mark.parametrize("z", [0.5, 1.0, 3.0])
def test_rdp_of_full_batch_gaussian_is_alpha_over_two_z_squared(z):
    for a in (2, 5, 32):
        assert rdp_subsampled_gaussian(1.0, z, a) == pytest.approx(a / (2 * z * z), rel=1e-12)


def test_epsilon_for_q1_matches_closed_form_optimum():
    # eps(alpha) = T*alpha/(2 z^2) + log(1/delta)/(alpha-1); continuous optimum at
    # alpha* = 1 + z*sqrt(2 log(1/delta)/T), eps* = T/(2 z^2) + sqrt(2 T log(1/delta))/z.
    z, T, delta = 5.0, 4, 1e-5
    L = math.log(1 / delta)
    eps = compute_epsilon(z, 1.0, T, delta, orders=range(2, 200))
    brute = min(T * a / (2 * z * z) + L / (a - 1) for a in range(2, 200))
    assert eps == pytest.approx(brute, rel=1e-12)
    cont = T / (2 * z * z) + math.sqrt(2 * T * L) / z
    assert cont <= eps <= cont * 1.01


@pytest.mark.parametrize("q,z,alpha", [(0.1, 1.0, 2), (0.05, 0.8, 3), (0.3, 2.0, 8)])
def test_subsampled_rdp_matches_numerical_renyi_divergence(q, z, alpha):
    """Independent check: RDP = 1/(a-1) log E_{x~N(0,z^2)}[(mu(x)/mu0(x))^a] for the mixture
    mu = (1-q) N(0, z^2) + q N(1, z^2), computed by quadrature (Mironov et al. 2019, Sec. 3)."""
    x = np.linspace(-40, 40, 400001)
    mu0 = np.exp(-(x**2) / (2 * z * z))
    ratio = (1 - q) + q * np.exp((2 * x - 1) / (2 * z * z))
    integral = np.trapezoid(mu0 * ratio**alpha, x) / (z * math.sqrt(2 * math.pi))
    assert rdp_subsampled_gaussian(q, z, alpha) == pytest.approx(math.log(integral) / (alpha - 1), rel=1e-6)


def test_epsilon_monotone_and_subsampling_amplifies():
    base = compute_epsilon(1.1, 0.01, 1000, 1e-5)
    assert compute_epsilon(1.1, 0.02, 1000, 1e-5) > base
    assert compute_epsilon(1.1, 0.01, 2000, 1e-5) > base
    assert compute_epsilon(1.5, 0.01, 1000, 1e-5) < base
    assert compute_epsilon(1.1, 0.01, 1000, 1e-5, tight=True) < base  # Balle et al. conversion is tighter
    assert base < compute_epsilon(1.1, 1.0, 1000, 1e-5)


def test_accountant_rejects_bad_inputs():
    with pytest.raises(ValueError, match="sampling_rate"):
        rdp_subsampled_gaussian(0.0, 1.0, 2)
    with pytest.raises(ValueError, match="order"):
        rdp_subsampled_gaussian(0.5, 1.0, 1.5)
    with pytest.raises(ValueError, match="delta"):
        rdp_to_epsilon([2], [0.1], 0.0)
    with pytest.raises(ValueError, match="dp.sampling_rate"):
        make_strategy("fedit", dp={"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 2})


def test_dp_clips_each_update_before_the_uniform_mean():
    rng = np.random.default_rng(5)
    init = init_adapter(rng)
    ups, _ = honest_round(rng, init, n=3)
    C = 0.01
    got, _ = aggregate_b(init, ups, dp={"noise_multiplier": 1e-12, "clip_norm": C})
    deltas = [u.factors[lora.b_key(MOD)] - init[lora.b_key(MOD)] for u in ups]
    want = init[lora.b_key(MOD)] + np.mean([d * C / np.linalg.norm(d) for d in deltas], axis=0)
    np.testing.assert_allclose(got, want, atol=1e-9)


@pytest.mark.parametrize(
    "robust", [{"method": "median", "clip_norm": 1.0}, {"method": "trimmed_mean", "trim_ratio": 0.25}]
)
@pytest.mark.parametrize(
    "name", ["fedit", "ffa-lora", "rolora", "fedex-lora", "flexlora", "fedsa-lora", "hetlora", "rbla"]
)
def test_robust_methods_compose_with_every_strategy(name, robust):
    rng = np.random.default_rng(6)
    hetero = name in ("flexlora", "hetlora", "rbla")
    ranks = (2, 3, 4, 4) if hetero else (R, R, R, R)
    st = make_strategy(name, robust=robust)
    r0 = 4 if hetero else R
    st.initialize({lora.a_key(MOD): rng.normal(size=(r0, D_IN)), lora.b_key(MOD): np.zeros((D_OUT, r0))})
    for t in range(2):
        ups = []
        for k, r in enumerate(ranks):  # random uploads following each client's directive
            d = st.configure_round(t, [f"c{k}"])[f"c{k}"]
            shape = {lora.a_key(MOD): (r, D_IN), lora.b_key(MOD): (D_OUT, r)}
            ups.append(ClientUpdate(f"c{k}", {key: rng.normal(size=shape[key]) for key in d.upload_keys}, 1 + k))
        # the last client is poisoned: x100 on everything it uploads
        ups[-1] = ClientUpdate(ups[-1].client_id, {k: 100 * v for k, v in ups[-1].factors.items()}, 1)
        res = st.aggregate(t, ups)
        outs = [res.global_factors or {}, *res.client_factors.values(), res.base_deltas]
        assert all(np.all(np.isfinite(v)) and np.max(np.abs(v)) < 1e3 for f in outs for v in f.values())
