"""Aggregation strategies checked against the math of shared/specs/aggregation.md (§1-10, §17)."""

import numpy as np
import pytest

from splitwave.common import lora
from splitwave.server.aggregation import STRATEGIES, ClientUpdate, load_state, make_strategy, save_state
from splitwave.server.aggregation import lora_math as lm

MODS = ("base_model.model.enc.layer.0.attn.query", "base_model.model.enc.layer.1.attn.value")
D_OUT, D_IN, R, ALPHA = 12, 10, 3, 6.0
S = ALPHA / R


def adapter(rng, r=R, b_zero=False, mods=MODS, scale=1.0):
    out = {}
    for m in mods:
        out[lora.a_key(m)] = scale * rng.normal(size=(r, D_IN))
        out[lora.b_key(m)] = np.zeros((D_OUT, r)) if b_zero else scale * rng.normal(size=(D_OUT, r))
    return out


def make(name, **kw):
    kw.setdefault("dtype", "float64")
    kw.setdefault("lora_alpha", ALPHA)
    return make_strategy(name, **kw)


def updates(rng, n=3, r=R, **kw):
    return [ClientUpdate(f"c{k}", adapter(rng, r, **kw), num_samples=10 * (k + 1)) for k in range(n)]


def directed_updates(st, t, rng, ranks=(R, R, R)):
    """Random uploads that follow each client's directive (upload keys, rank)."""
    out = []
    for k, r in enumerate(ranks):
        cid = f"c{k}"
        d = st.configure_round(t, [cid])[cid]
        f = adapter(rng, r)
        out.append(
            ClientUpdate(
                cid,
                {key: f[key] if key in f else rng.normal(size=d.load_factors[key].shape) for key in d.upload_keys},
                2 + k,
            )
        )
    return out


def weights(ups):
    return lm.sample_weights([u.num_samples for u in ups])


def AB(f, m):
    return f[lora.a_key(m)], f[lora.b_key(m)]


def assert_state_equal(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


# ----------------------------------------------------------------------------- §1 FedIT
def test_fedit_error_is_cross_covariance_identity():
    rng = np.random.default_rng(0)
    st = make("fedit")
    st.initialize(adapter(rng, b_zero=True))
    ups = updates(rng, n=4)
    res = st.aggregate(0, ups)
    p = weights(ups)
    err_sq = 0.0
    for m in MODS:
        A_bar, B_bar = AB(res.global_factors, m)
        As, Bs = zip(*(AB(u.factors, m) for u in ups))
        np.testing.assert_allclose(A_bar, sum(pk * A for pk, A in zip(p, As)))
        gap = lm.product_sum(As, Bs, p) - B_bar @ A_bar
        cov = sum(pk * (B - B_bar) @ (A - A_bar) for pk, A, B in zip(p, As, Bs))
        np.testing.assert_allclose(gap, cov, atol=1e-12)
        assert np.linalg.norm(gap) > 1e-3  # the error is real, not vacuous
        err_sq += np.sum((S * gap) ** 2)
    assert res.metrics["agg_error_fro"] == pytest.approx(np.sqrt(err_sq), rel=1e-9)
    assert res.base_deltas == {}


# ----------------------------------------------------------------------------- §2 FFA-LoRA
def test_ffa_lora_is_exact_and_checks_frozen_a():
    rng = np.random.default_rng(1)
    init = adapter(rng, b_zero=True)
    st = make("ffa-lora")
    st.initialize(init)
    d = st.configure_round(0, ["c0", "c1"])["c0"]
    assert d.trainable == ("B",) and all(k.endswith("lora_B.weight") for k in d.upload_keys)
    ups = []
    for k in range(3):
        f = {lora.b_key(m): rng.normal(size=(D_OUT, R)) for m in MODS}
        if k == 0:  # uploading the frozen A is allowed if bit-identical
            f.update({lora.a_key(m): init[lora.a_key(m)].copy() for m in MODS})
        ups.append(ClientUpdate(f"c{k}", f, 5 + k))
    res = st.aggregate(0, ups)
    p = weights(ups)
    for m in MODS:
        A0 = init[lora.a_key(m)]
        A, B = AB(res.global_factors, m)
        np.testing.assert_array_equal(A, A0)
        ideal = sum(pk * S * u.factors[lora.b_key(m)] @ A0 for pk, u in zip(p, ups))
        np.testing.assert_allclose(S * B @ A, ideal, atol=1e-12)
    assert res.metrics["agg_error_fro"] < 1e-10
    bad = dict(ups[0].factors)
    bad[lora.a_key(MODS[0])] = bad[lora.a_key(MODS[0])] + 1e-6
    with pytest.raises(ValueError, match="frozen factor"):
        st.aggregate(1, [ClientUpdate("c0", bad, 5)])


# ----------------------------------------------------------------------------- §3 RoLoRA
def test_rolora_alternates_starting_with_b_and_both_phases_are_exact():
    rng = np.random.default_rng(2)
    st = make("rolora")
    st.initialize(adapter(rng, b_zero=True))
    for t, phase in enumerate(["B", "A", "B"]):
        d = st.configure_round(t, ["c0"])["c0"]
        assert d.trainable == (phase,) and d.extra["phase"] == phase
        start = d.load_factors
        ups = []
        for k in range(3):
            f = {
                lora.b_key(m) if phase == "B" else lora.a_key(m): rng.normal(
                    size=(D_OUT, R) if phase == "B" else (R, D_IN)
                )
                for m in MODS
            }
            ups.append(ClientUpdate(f"c{k}", f, 3 + 4 * k))
        with pytest.raises(ValueError):  # uploading the frozen factor changed is refused
            wrong = {**ups[0].factors, **{lora.a_key(m) if phase == "B" else lora.b_key(m): np.ones(1) for m in MODS}}
            st.aggregate(t, [ClientUpdate("c0", wrong, 1)])
        res = st.aggregate(t, ups)
        p = weights(ups)
        for m in MODS:
            A, B = AB(res.global_factors, m)
            full = [{**start, **u.factors} for u in ups]
            ideal = lm.product_sum(*zip(*(AB(f, m) for f in full)), p)
            np.testing.assert_allclose(B @ A, ideal, atol=1e-12)
            frozen = lora.a_key(m) if phase == "B" else lora.b_key(m)
            np.testing.assert_array_equal(res.global_factors[frozen], start[frozen])
        assert res.metrics["agg_error_fro"] < 1e-10


# ----------------------------------------------------------------------------- §4 FedEx-LoRA
def test_fedex_folded_residual_is_exact_and_factored():
    rng = np.random.default_rng(3)
    st = make("fedex-lora", fan_in_fan_out=["*.layer.1.*"])  # pretend layer 1 is a GPT-2 Conv1D
    st.initialize(adapter(rng, b_zero=True))
    W0 = {m: rng.normal(size=(D_OUT, D_IN)) for m in MODS}
    ups = updates(rng, n=4)
    res = st.aggregate(0, ups)
    p = weights(ups)
    assert res.transposed == frozenset({MODS[1]}) and res.base_version == 1
    for m in MODS:
        A, B = AB(res.global_factors, m)
        delta = res.base_deltas[m].T if m in res.transposed else res.base_deltas[m]
        ideal = W0[m] + S * lm.product_sum(*zip(*(AB(u.factors, m) for u in ups)), p)
        np.testing.assert_allclose(W0[m] + delta + S * B @ A, ideal, atol=1e-12)
        Bf, Af = res.base_delta_factors[m]
        np.testing.assert_allclose(Bf @ Af, delta, atol=1e-12)
        assert Bf.shape[1] == 4 * R + R
    assert res.metrics["agg_error_fro"] < 1e-10
    assert st.configure_round(1, ["x"])["x"].base_version == 1


# ----------------------------------------------------------------------------- §5 FLoRA
def test_flora_stacking_equals_weighted_sum_with_heterogeneous_ranks_and_scalings():
    rng = np.random.default_rng(4)
    st = make("flora")
    st.initialize(adapter(rng, b_zero=True))
    d = st.configure_round(0, ["c0"])["c0"]
    assert d.reinit_lora and d.load_factors is None
    ranks, alphas = [1, 3, 5], [2.0, 6.0, 16.0]
    ups = [
        ClientUpdate(f"c{k}", adapter(rng, r), 7 * (k + 1), lora_alpha=a) for k, (r, a) in enumerate(zip(ranks, alphas))
    ]
    res = st.aggregate(0, ups)
    p = weights(ups)
    assert res.global_factors is None
    for m in MODS:
        ideal = sum(
            pk * (a / r) * u.factors[lora.b_key(m)] @ u.factors[lora.a_key(m)]
            for pk, a, r, u in zip(p, alphas, ranks, ups)
        )
        np.testing.assert_allclose(res.base_deltas[m], ideal, atol=1e-12)
        Bf, Af = res.base_delta_factors[m]
        assert Bf.shape == (D_OUT, sum(ranks)) and Af.shape == (sum(ranks), D_IN)
    assert res.metrics["agg_error_fro"] < 1e-10


# ----------------------------------------------------------------------------- §7 FlexLoRA
def test_flexlora_full_rank_reproduces_mean_product_and_truncates_optimally():
    rng = np.random.default_rng(5)
    st = make("flexlora", client_ranks={"big": 6, "small": 2})
    st.initialize(adapter(rng, r=6, b_zero=True))
    ups = [
        ClientUpdate("c0", adapter(rng, 2), 3, lora_alpha=4.0),
        ClientUpdate("c1", adapter(rng, 3), 5, lora_alpha=ALPHA),
    ]
    res = st.aggregate(0, ups)
    p = weights(ups)
    dirs = st.configure_round(1, ["big", "small"])
    for m in MODS:
        dW = sum(
            pk
            * (u.lora_alpha / u.factors[lora.a_key(m)].shape[0])
            * u.factors[lora.b_key(m)]
            @ u.factors[lora.a_key(m)]
            for pk, u in zip(p, ups)
        )
        A, B = AB(dirs["big"].load_factors, m)  # rank 6 >= rank(dW) = 5
        assert A.shape == (6, D_IN) and B.shape == (D_OUT, 6)
        np.testing.assert_allclose((ALPHA / 6) * B @ A, dW, atol=1e-10)
        A2, B2 = AB(dirs["small"].load_factors, m)
        sv = np.linalg.svd(dW, compute_uv=False)
        assert np.linalg.norm(dW - (ALPHA / 2) * B2 @ A2) == pytest.approx(np.sqrt(np.sum(sv[2:] ** 2)), rel=1e-8)
        np.testing.assert_allclose(A2 @ A2.T, np.eye(2), atol=1e-10)  # orthonormal rows
    assert res.client_factors["c0"][lora.a_key(MODS[0])].shape == (2, D_IN)


# ----------------------------------------------------------------------------- §8-9 HetLoRA / RBLA
@pytest.mark.parametrize("name", ["rbla", "zero-padding"])
def test_padding_strategies_with_equal_ranks_equal_fedavg(name):
    rng = np.random.default_rng(6)
    init = adapter(rng, b_zero=True)
    ups = updates(rng, n=3)
    ref, st = make("fedit"), make(name)
    ref.initialize(init)
    st.initialize(init)
    want = ref.aggregate(0, ups).global_factors
    got = st.aggregate(0, ups).client_factors
    for cid in ("c0", "c2"):
        for k in want:
            np.testing.assert_allclose(got[cid][k], want[k], atol=1e-12)


def test_rbla_masked_vs_zero_padding_with_heterogeneous_ranks():
    rng = np.random.default_rng(7)
    init = adapter(rng, r=4, b_zero=True)
    ranks, n = [1, 2, 4], [10, 20, 30]
    ups = [ClientUpdate(f"c{k}", adapter(rng, r), n[k]) for k, r in enumerate(ranks)]
    p = weights(ups)
    m = MODS[0]
    As = [u.factors[lora.a_key(m)] for u in ups]
    for name, masked in (("rbla", True), ("zero-padding", False)):
        st = make(name, lora_alpha=4.0, use_rslora=False)
        st.initialize(init)
        res = st.aggregate(0, ups)
        for cid, r in zip(["c0", "c1", "c2"], ranks):  # truncation back to each client's rank
            A, B = AB(res.client_factors[cid], m)
            assert A.shape == (r, D_IN) and B.shape == (D_OUT, r)
        A = res.client_factors["c2"][lora.a_key(m)]
        # slot 1 is owned by c1 and c2 only; slot 3 by c2 only
        w1 = p[1:] / p[1:].sum() if masked else p[1:]
        np.testing.assert_allclose(A[1], w1[0] * As[1][1] + w1[1] * As[2][1], atol=1e-12)
        np.testing.assert_allclose(A[3], As[2][3] * (1.0 if masked else p[2]), atol=1e-12)
        # B is averaged in ΔW units (s_k * B_k) and handed back divided by the receiver's s
        B = res.client_factors["c0"][lora.b_key(m)]
        s = [4.0 / r for r in ranks]
        Bs = [u.factors[lora.b_key(m)] for u in ups]
        np.testing.assert_allclose(B[:, 0] * s[0], sum(pk * sk * Bk[:, 0] for pk, sk, Bk in zip(p, s, Bs)), atol=1e-12)


def test_hetlora_norm_weighting_and_self_prune_directive():
    rng = np.random.default_rng(8)
    st = make("hetlora", prune_gamma=0.5, prune_lambda=0.1)
    st.initialize(adapter(rng, r=4, b_zero=True))
    assert st.configure_round(0, ["a"])["a"].extra == {"self_prune": {"gamma": 0.5, "lambda": 0.1}}
    ups = [ClientUpdate("c0", adapter(rng, 2, scale=1.0), 1), ClientUpdate("c1", adapter(rng, 2, scale=3.0), 1000)]
    res = st.aggregate(0, ups)
    m = MODS[0]
    nrm = [np.linalg.norm(AB(u.factors, m)[1] @ AB(u.factors, m)[0]) for u in ups]
    w = np.array(nrm) / sum(nrm)
    want = w[0] * ups[0].factors[lora.a_key(m)] + w[1] * ups[1].factors[lora.a_key(m)]
    np.testing.assert_allclose(res.client_factors["c0"][lora.a_key(m)], want, atol=1e-12)
    with pytest.raises(ValueError, match="rank 5"):  # above the server's r_max
        st.aggregate(1, [ClientUpdate("c0", adapter(rng, 5), 1)])


# ----------------------------------------------------------------------------- §10 FedSA-LoRA
def test_fedsa_averages_a_and_keeps_b_per_client():
    rng = np.random.default_rng(9)
    init = adapter(rng, b_zero=True)
    init["base_model.model.classifier.weight"] = np.zeros((2, 4))
    st = make("fedsa-lora", keep_local_on_server=True)
    st.initialize(init)
    ups = []
    for k in range(3):
        f = adapter(rng)
        f["base_model.model.classifier.weight"] = np.full((2, 4), float(k))
        ups.append(ClientUpdate(f"c{k}", f, 1 + k))
    res = st.aggregate(0, ups)
    p = weights(ups)
    for m in MODS:
        np.testing.assert_allclose(
            res.global_factors[lora.a_key(m)], sum(pk * u.factors[lora.a_key(m)] for pk, u in zip(p, ups))
        )
        assert lora.b_key(m) not in res.global_factors
        for u in ups:
            np.testing.assert_array_equal(res.client_factors[u.client_id][lora.b_key(m)], u.factors[lora.b_key(m)])
    view = st.configure_round(1, ["c2", "new"])
    np.testing.assert_array_equal(view["c2"].load_factors["base_model.model.classifier.weight"], np.full((2, 4), 2.0))
    np.testing.assert_array_equal(view["new"].load_factors[lora.b_key(MODS[0])], np.zeros((D_OUT, R)))
    lean = make("fedsa-lora")
    lean.initialize(init)
    assert all(k.endswith("lora_A.weight") for k in lean.configure_round(0, ["c0"])["c0"].upload_keys)
    with pytest.raises(ValueError, match="unexpected"):
        lean.aggregate(0, ups[:1])


# ----------------------------------------------------------------------------- server optimizers
def test_server_opt_avgm_without_momentum_is_plain_and_adam_differs():
    rng = np.random.default_rng(10)
    init = adapter(rng, b_zero=True)
    ups = updates(rng)
    plain, avgm, adam = (
        make("fedit"),
        make("fedit", server_opt={"name": "avgm", "momentum": 0.0, "lr": 1.0}),
        make("fedit", server_opt={"name": "adam", "lr": 0.1, "betas": (0.9, 0.99), "tau": 1e-3}),
    )
    outs = []
    for st in (plain, avgm, adam):
        st.initialize(init)
        outs.append(st.aggregate(0, ups).global_factors)
    for k in outs[0]:
        np.testing.assert_allclose(outs[1][k], outs[0][k], atol=1e-12)
    k = lora.b_key(MODS[0])  # FedAdam's first step (no bias correction, Reddi et al.)
    delta = outs[0][k] - init[k]
    want = init[k] + 0.1 * (0.1 * delta) / (np.sqrt(0.01 * delta**2) + 1e-3)
    np.testing.assert_allclose(outs[2][k], want, atol=1e-12)


# ----------------------------------------------------------------------------- state survives save/restore
CASES = [(n, {}) for n in STRATEGIES] + [
    ("fedit", {"server_opt": {"name": "yogi"}}),
    ("rbla", {"server_opt": {"name": "avgm"}}),
    ("ffa-lora", {"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0, "seed": 3}}),
    ("fedsa-lora", {"keep_local_on_server": True}),
    ("fedex-lora", {"robust": {"method": "median"}}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'+'.join(kw) or 'plain'}" for n, kw in CASES])
def test_state_survives_save_restore(tmp_path, name, kw):
    rng = np.random.default_rng(11)
    hetero = name in ("flora", "flexlora", "hetlora", "rbla", "zero-padding")
    init = adapter(rng, r=4 if hetero else R, b_zero=True)

    ranks = (2, 3, 4) if hetero else (R, R, R)

    twin = make(name, **kw)
    twin.initialize(init)
    twin.aggregate(0, directed_updates(twin, 0, np.random.default_rng(100), ranks))
    save_state(twin, tmp_path / "s.npz")
    restored = make(name, **kw)
    load_state(restored, tmp_path / "s.npz")
    assert_state_equal(restored.state_dict(), twin.state_dict())
    ups = directed_updates(twin, 1, np.random.default_rng(101), ranks)
    a, b = twin.aggregate(1, ups), restored.aggregate(1, ups)
    for field in ("global_factors", "client_factors", "base_deltas", "metrics"):
        assert_state_equal(getattr(a, field) or {}, getattr(b, field) or {})
    assert_state_equal(restored.state_dict(), twin.state_dict())


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("fedit", {"lr": 1.0}, "lr"),
        ("nope", {}, "unknown strategy"),
        ("fedit", {"lora_alpha": -1}, "lora_alpha"),
        ("fedit", {"robust": {"method": "mode"}}, "robust.method"),
        ("fedit", {"robust": {"clip": 1}}, "clip"),
        ("fedit", {"robust": {"method": "trimmed_mean", "trim_ratio": 0.5}}, "trim_ratio"),
        ("fedit", {"server_opt": {"name": "adam", "beta": 0.9}}, "beta"),
        ("fedit", {"server_opt": {"name": "sgdx"}}, "server_opt.name"),
        ("fedit", {"server_opt": {"name": "adam", "tau": 0}}, "tau"),
        ("fedit", {"dp": {"noise_multiplier": 1.0}}, "dp.clip_norm"),
        ("fedit", {"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "robust": {"method": "median"}}, "dp requires"),
        ("fedex-lora", {"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}}, "dp"),
        ("fedex-lora", {"server_opt": {"name": "adam"}}, "server_opt"),
        ("flora", {"robust": {"method": "median"}}, "robust.method"),
        ("fedit", {"client_ranks": {"a": 2}}, "client_ranks"),
        ("hetlora", {"client_ranks": {"a": 0}}, "client_ranks"),
        ("hetlora", {"weighting": "magic"}, "weighting"),
        ("rolora", {"start_phase": "C"}, "start_phase"),
        ("flexlora", {"max_rank": 0}, "max_rank"),
    ],
)
def test_bad_params_raise_clear_value_error(name, kw, match):
    with pytest.raises(ValueError, match=match):
        make_strategy(name, **kw)


def _mutations(good):
    k_a, k_b = lora.a_key(MODS[0]), lora.b_key(MODS[0])
    has_a, has_b = k_a in good, k_b in good
    k_any = k_a if has_a else k_b
    yield "missing", {k: v for k, v in good.items() if k != k_any}
    yield "unexpected", {**good, "base_model.model.other.lora_A.weight": np.zeros((R, D_IN))}
    yield "finite", {**good, k_any: np.full(good[k_any].shape, np.nan)}
    if has_a:
        yield r"expected \[r, 10\]", {**good, k_a: np.zeros((R, D_IN + 1))}
    if has_b:
        yield r"expected \[r, 10\] / \[12, r\]", {**good, k_b: np.zeros((D_OUT + 1, R))}
    if has_a and has_b:
        yield "rank 11", {**good, k_a: np.zeros((11, D_IN)), k_b: np.zeros((D_OUT, 11))}
        yield r"A\(3, 10\) B\(12, 2\)", {**good, k_b: np.zeros((D_OUT, R - 1))}


@pytest.mark.parametrize("name", STRATEGIES)
def test_bad_client_raises_and_leaves_state_unchanged(name):
    rng = np.random.default_rng(12)
    st = make(name, robust={"clip_norm": 5.0})
    st.initialize(adapter(rng, b_zero=True))
    st.aggregate(0, directed_updates(st, 0, rng))  # some non-trivial state first
    before = st.state_dict()
    good = directed_updates(st, 1, rng)[0].factors
    for match, bad in _mutations(good):
        with pytest.raises(ValueError, match=match):
            # the good client comes first, so a half-done round must be rolled back
            st.aggregate(1, [ClientUpdate("ok", good, 1), ClientUpdate("bad", bad, 1)])
        assert_state_equal(st.state_dict(), before)
    with pytest.raises(ValueError, match="num_samples"):
        st.aggregate(1, [ClientUpdate("ok", good, 0)])
    with pytest.raises(ValueError, match="duplicate"):
        st.aggregate(1, [ClientUpdate("ok", good, 1), ClientUpdate("ok", good, 1)])
    assert_state_equal(st.state_dict(), before)
    st.aggregate(1, [ClientUpdate("ok", good, 1)])  # and it still works afterwards


def test_aggregate_before_initialize_and_mixed_alpha_errors():
    rng = np.random.default_rng(13)
    st = make("fedit")
    with pytest.raises(RuntimeError, match="initialize"):
        st.aggregate(0, updates(rng))
    st.initialize(adapter(rng, b_zero=True))
    ups = updates(rng)
    ups[1] = ClientUpdate("c1", ups[1].factors, 3, lora_alpha=99.0)
    with pytest.raises(ValueError, match="scalings"):
        st.aggregate(0, ups)


# ----------------------------------------------------------------------------- instances and outputs
def test_two_scopes_share_nothing_and_default_output_is_float32():
    rng = np.random.default_rng(14)
    init = adapter(rng, b_zero=True)
    edge, top = make_strategy("fedit", scope="edge"), make_strategy("fedit", scope="top:c0")
    edge.initialize(init)
    top.initialize({k: v * 2 for k, v in init.items()})
    res = edge.aggregate(0, updates(rng))
    assert all(v.dtype == np.float32 for v in res.global_factors.values())
    np.testing.assert_array_equal(top.global_A[MODS[0]], (2 * init[lora.a_key(MODS[0])]).astype(np.float32))
    assert top.rounds_done == 0 and edge.rounds_done == 1
    assert res.metrics["uplink_bytes"] > 0 and res.metrics["downlink_bytes"] > 0
