"""edge.quantize int8: the int8 bundle derived from the fp32 one (server/export/quantize.py) on the ORT edge.

Tolerances are the measured errors of tiny random models (hidden 32) with some margin: h within 1.1% (relative,
Frobenius) of the fp32 bundle's, LoRA gradients within 2.4%; real text on all-MiniLM-L6-v2 gives 3.7% on h
(benchmarks/results/edge_step.json holds the figures of the real model).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from splitwave.common.config import ConfigError, parse_config
from splitwave.common.manifest import BundleManifest
from splitwave.edge.runtime import BundleError, EdgeRuntime
from splitwave.server.export.quantize import quantize_bundle, quantize_rows, weight_names
from splitwave.server.setup import bundle_dir
from tests.conftest import CACHE

FAMILIES = ["bert", "gpt2", "llama"]
MODES = ["recompute", "saved"]
H_TOL = 0.03  # measured 0.0045 (bert), 0.0089 (gpt2), 0.0106 (llama)
GRAD_TOL = 0.06  # measured at most 0.021 (bert), 0.014 (gpt2), 0.024 (llama)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _batch(hidden: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, size=(4, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    ids[mask == 0] = 0
    return ids, mask, rng.standard_normal((4, 12, hidden)).astype(np.float32)


def test_quantize_rows_is_symmetric_per_channel():
    w = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]], np.float32)
    for axis in (0, 1):
        q, s = quantize_rows(w, axis)
        assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (3,)
        back = q * (s[:, None] if axis == 0 else s[None, :])
        np.testing.assert_allclose(back, w, atol=float(s.max()) / 2 + 1e-7)
        assert np.abs(q).max() == 127  # every nonzero channel spans the whole range
    q, s = quantize_rows(w, 0)
    assert s[1] == 1.0 and not q[1].any()  # an all-zero channel gets scale 1, not 0


def test_int8_bundle_is_much_smaller_and_says_so(edge_bundle):
    fp32, int8 = edge_bundle("bert"), edge_bundle("bert", quantize="int8")
    assert int8.path != fp32.path
    m, q = int8.manifest, int8.manifest.quantization
    assert fp32.manifest.quantization is None and "quantization" not in json.loads(
        (fp32.path / "manifest.json").read_text()
    )
    assert q is not None and q.scheme == "int8" and q.fp32_weights_bytes == fp32.manifest.weights_bytes
    # 96,768 -> 25,728 bytes for tiny BERT: the int8 weights plus one fp32 scale per channel, and the biases
    # and norms that stay fp32 (a larger share in a hidden-32 model than in MiniLM, 0.25x there)
    assert m.weights_bytes <= 0.3 * fp32.manifest.weights_bytes
    assert (int8.path / m.weights_file).stat().st_size == m.weights_bytes
    assert "embeddings.word_embeddings.weight" in q.quantized
    assert "trunk.blocks.0.intermediate.dense.weight" in q.quantized and not q.kept_fp32
    assert m.base_weights == {}  # int8 weights take no fp32 base deltas
    assert "int8" in {e.dtype for e in m.initializers.values()}
    assert BundleManifest.from_json(m.to_json()) == m
    # the rest of the bundle is the fp32 bundle's: same factors, graphs per mode, saved activations
    assert m.factors == fp32.manifest.factors and m.saved_names == fp32.manifest.saved_names
    assert m.graphs == fp32.manifest.graphs


@pytest.mark.parametrize("family", FAMILIES)
def test_only_frozen_products_are_quantized(edge_bundle, family):
    """Every graph of both modes runs its frozen products in int8, and only those: the B of every integer
    product is an int8 initializer (or its transpose); LoRA factors and gradients only meet fp32 ops."""
    b = edge_bundle(family, quantize="int8")
    factors = set(b.manifest.factor_names)
    grads = set(b.manifest.grad_outputs.values())
    int_ops = {"MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QuantizeLinear"}
    for mode in MODES:
        for f in b.manifest.graphs[mode]:
            g = onnx.load(str(b.path / f), load_external_data=False).graph
            ops = [n.op_type for n in g.node]
            assert ops.count("MatMulIntegerToFloat") >= 2 and "Gemm" not in ops, f
            inits = {t.name: t for t in g.initializer}
            float_2d = [n for n, t in inits.items() if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
            assert not [n for n in float_2d if n in b.manifest.initializers], f"{f}: fp32 weights left"
            producer = {o: n for n in g.node for o in n.output}
            for n in g.node:
                if n.op_type == "MatMulIntegerToFloat":
                    w = n.input[1]
                    while w not in inits:
                        assert producer[w].op_type == "Transpose", f
                        w = producer[w].input[0]
                    assert inits[w].data_type == onnx.TensorProto.INT8, f
            touching = [n for n in g.node if factors & set(n.input) or grads & set(n.output)]
            assert touching and not [n.op_type for n in touching if n.op_type in int_ops], f


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_int8_edge_is_close_to_fp32(edge_bundle, family, mode):
    fp32, int8 = edge_bundle(family), edge_bundle(family, quantize="int8")
    r32 = EdgeRuntime(fp32.path, mode=mode, threads=1)
    r8 = EdgeRuntime(int8.path, mode=mode, threads=1)
    ids, mask, gh = _batch(fp32.manifest.hidden_size)
    h32, h8 = r32.forward(ids, mask), r8.forward(ids, mask)
    assert h8.dtype == np.float32 and h8.shape == h32.shape
    assert 0 < _rel(h8, h32) < H_TOL
    g32, g8 = r32.backward(gh), r8.backward(gh)
    assert set(g8) == set(g32)
    for k in g32:
        assert g8[k].dtype == np.float32
        assert _rel(g8[k], g32[k]) < GRAD_TOL, k


def test_keep_fp32_leaves_those_weights_alone(edge_bundle, tmp_path):
    fp32 = edge_bundle("bert")
    names = weight_names({k: p.detach().numpy() for k, p in fp32.split.edge.named_parameters()}, fp32.manifest)
    m = quantize_bundle(fp32.path, tmp_path / "q", keep=["*intermediate.dense*", "*output.dense*"], names=names)
    kept = m.quantization.kept_fp32
    assert "trunk.blocks.1.intermediate.dense.weight" in kept and "trunk.blocks.1.output.dense.weight" in kept
    assert "trunk.blocks.1.attention.output.dense.weight" in kept  # the pattern "*output.dense*" matches it too
    assert not set(kept) & set(m.quantization.quantized)
    assert "trunk.blocks.1.attention.self.key.weight" in m.quantization.quantized
    r32, r8 = EdgeRuntime(fp32.path, mode="saved"), EdgeRuntime(tmp_path / "q", mode="saved")
    ids, mask, gh = _batch(fp32.manifest.hidden_size)
    assert _rel(r8.forward(ids, mask), r32.forward(ids, mask)) < H_TOL
    g32, g8 = r32.backward(gh), r8.backward(gh)
    assert max(_rel(g8[k], g32[k]) for k in g32) < GRAD_TOL
    with pytest.raises(ValueError, match="already quantized"):
        quantize_bundle(tmp_path / "q", tmp_path / "qq")


def test_int8_refuses_base_deltas(edge_bundle):
    b = edge_bundle("bert", quantize="int8")
    rt = EdgeRuntime(b.path, mode="recompute")
    module = next(iter(edge_bundle("bert").manifest.base_weights))
    with pytest.raises(BundleError, match="need an fp32 bundle"):
        rt.set_base_deltas({module: np.zeros((32, 32), np.float32)})


def test_int8_and_fp32_bundles_never_share_a_cache_key():
    ident = {"model": {"family": "bert"}, "seed": 0}
    fp32 = bundle_dir(CACHE, ident, "x")
    int8 = bundle_dir(CACHE, {**ident, "quantize": "int8", "keep_fp32": []}, "x")
    kept = bundle_dir(CACHE, {**ident, "quantize": "int8", "keep_fp32": ["*dense*"]}, "x")
    assert len({fp32, int8, kept}) == 3


def test_config_edge_quantize():
    assert parse_config({}).edge.quantize == "none"
    cfg = parse_config({}, ["edge.quantize=int8", "edge.keep_fp32=['*output.dense*']"])
    assert cfg.edge.quantize == "int8" and cfg.edge.keep_fp32 == ["*output.dense*"]
    with pytest.raises(ConfigError, match="edge.quantize"):
        parse_config({}, ["edge.quantize=int4"])
    with pytest.raises(ConfigError, match="edge_backend"):
        parse_config({}, ["edge.quantize=int8", "training.edge_backend=torch"])


def test_split_training_with_an_int8_edge_learns(tmp_path):
    """The simulation engine (real ORT edges on the int8 bundle, torch server) lowers the loss."""
    from tests.test_sim_engine import _cfg, _run

    cfg = _cfg(edge__quantize="int8", rounds__num_rounds=3, training__optim__lr=0.01)
    recs, edge, _top, res = _run(tmp_path, cfg)
    assert BundleManifest.from_file(res.bundle_dir).quantization is not None
    first, last = recs[0], recs[-1]
    assert last["eval_loss"] < first["pre_eval_loss"]
    assert last["train_loss"] < first["train_loss"]
    assert edge and all(np.isfinite(v).all() for v in edge.values())


@pytest.mark.parametrize("strategy", ["fedex-lora", "flora"])
def test_server_refuses_base_merging_strategies_with_an_int8_edge(tmp_path, strategy):
    from splitwave.server.app import SplitServer
    from tests.test_sim_engine import _cfg

    with pytest.raises(ValueError, match="folds updates into the frozen base weights"):
        SplitServer(_cfg(edge__quantize="int8", aggregation__strategy=strategy), tmp_path, CACHE)
