"""Edge bundle export + ORT runtime == torch autograd (forward, factor grads, AdamW), both modes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from splitwave.edge.optim import AdamW
from splitwave.edge.runtime import BundleError, EdgeRuntime, sha256_file
from splitwave.server.torch_edge import TorchEdge

FAMILIES = ["bert", "gpt2", "llama"]
MODES = ["recompute", "saved"]
# (3, 11) is the traced shape; the others were never seen by the exporter (catches specialization)
SHAPES = [(3, 11), (5, 7), (1, 20), (2, 2)]


def _batch(batch, seq, hidden, seed=0):
    rng = np.random.default_rng(seed + 100 * batch + seq)
    ids = rng.integers(1, 100, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, max(1, seq // 2) :] = 0  # right padding
    ids[mask == 0] = 0
    gh = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    return ids, mask, gh


def _torch_ref(split, ids, mask, gh):
    params = split.edge_factor_params()
    for p in params.values():
        p.requires_grad_(True)
    with torch.enable_grad():
        h = split.edge(torch.from_numpy(ids), torch.from_numpy(mask))
        grads = torch.autograd.grad(h, list(params.values()), torch.from_numpy(gh))
    return h.detach().numpy(), {k: g.numpy() for k, g in zip(params, grads)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_ort_matches_torch(edge_bundle, family, mode):
    b = edge_bundle(family)
    rt = EdgeRuntime(b.path, mode=mode, threads=1)
    for name, v in b.split.edge_factors().items():
        np.testing.assert_array_equal(rt.factors[name], v)
    hidden = b.manifest.hidden_size
    for batch, seq in SHAPES:
        ids, mask, gh = _batch(batch, seq, hidden)
        h_ref, g_ref = _torch_ref(b.split, ids, mask, gh)
        h = rt.forward(ids, mask)
        assert h.dtype == np.float32 and h.shape == (batch, seq, hidden)
        np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=0)
        grads = rt.backward(gh)
        assert set(grads) == set(g_ref)
        for k in g_ref:
            np.testing.assert_allclose(grads[k], g_ref[k], atol=1e-5, rtol=0, err_msg=f"{k} at {batch}x{seq}")


def test_bundle_layout(edge_bundle):
    b = edge_bundle("llama")
    m = b.manifest
    files = {p.name: p.stat().st_size for p in b.path.iterdir()}
    graphs = [g for mode in m.modes for g in m.graphs[mode]]
    assert set(graphs) == {"forward.onnx", "vjp.onnx", "forward_saved.onnx", "backward_saved.onnx"}
    assert sha256_file(b.path / m.weights_file) == m.weights_sha256
    # frozen weights written once: bundle <= 1.1 x frozen edge weight bytes + graph bytes
    factor_ids = {id(p) for p in b.split.edge_factor_params().values()}
    frozen = sum(p.numel() * 4 for p in b.split.edge.parameters() if id(p) not in factor_ids)
    graph_bytes = sum(files[g] for g in graphs)
    assert files[m.weights_file] <= 1.1 * frozen
    assert sum(files.values()) <= 1.1 * frozen + graph_bytes + files["factors.npz"] + files["manifest.json"]
    import onnx

    for g in graphs:  # every graph references the one weights file
        model = onnx.load(str(b.path / g), load_external_data=False)
        locs = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locs == {m.weights_file}
        assert [i.name for i in model.graph.input][:2] == ["input_ids", "attention_mask"] or g == "backward_saved.onnx"
    assert m.factor_names == b.split.edge_factor_names()
    assert m.cut == 2 and m.family == "llama" and m.lora.r == 4 and m.opset >= 17
    json.dumps(m.to_dict())


def test_weights_hash_checked(edge_bundle, tmp_path):
    b = edge_bundle("bert")
    bad = tmp_path / "bundle"
    bad.mkdir()
    for p in b.path.iterdir():
        os.symlink(p, bad / p.name)
    m = dict(b.manifest.to_dict(), weights_sha256="0" * 64)
    (bad / "manifest.json").unlink()
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="sha256"):
        EdgeRuntime(bad)
    with pytest.raises(BundleError, match="modes"):
        EdgeRuntime(b.path.parent / "nope") if False else None
        (bad / "manifest.json").write_text(json.dumps(dict(b.manifest.to_dict(), modes=["recompute"])))
        EdgeRuntime(bad, mode="saved")


def test_adamw_matches_torch():
    rng = np.random.default_rng(0)
    shapes = {"a": (4, 8), "b": (8, 4)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    for kw in ({}, {"lr": 5e-2, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}):
        p_np = {k: v.copy() for k, v in params.items()}
        t = {k: v.detach().clone().requires_grad_(True) for k, v in tparams.items()}
        opt_np, opt_t = AdamW(**kw), torch.optim.AdamW(list(t.values()), **kw)
        for _step in range(5):
            grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            opt_np.step(p_np, grads)
            for k in t:
                t[k].grad = torch.from_numpy(grads[k].copy())
            opt_t.step()
            for k in t:
                np.testing.assert_allclose(p_np[k], t[k].detach().numpy(), atol=1e-6, rtol=0)
        sd = opt_np.state_dict()
        clone = AdamW()
        clone.load_state_dict(sd)
        assert clone.state["a"]["step"] == 5 and clone.lr == opt_np.lr


@pytest.mark.parametrize("mode", MODES)
def test_train_steps_match_torch_edge(edge_bundle, mode, tmp_path):
    """3 full steps (forward, grads, AdamW; lora_A frozen as in FFA-LoRA) ORT == torch reference backend."""
    from tests.conftest import make_split

    b = edge_bundle("gpt2")
    trainable = {k for k in b.manifest.grad_outputs if k.endswith("lora_B.weight")}
    rt = EdgeRuntime(b.path, mode=mode, threads=1, lr=1e-2, trainable=trainable)
    ref = TorchEdge(make_split("gpt2"), lr=1e-2, trainable=trainable)
    for k, v in rt.factors.items():
        np.testing.assert_array_equal(v, ref.factors[k])
    start = {k: v.copy() for k, v in rt.factors.items()}
    for step in range(3):
        ids, mask, gh = _batch(4, 6 + step, 32, seed=step)
        rt.train_step(ids, mask, lambda h: gh)
        ref.train_step(ids, mask, lambda h: gh)
    for k in rt.factors:
        np.testing.assert_allclose(rt.factors[k], ref.factors[k], atol=1e-5, rtol=0)
        if k in trainable:
            assert not np.array_equal(rt.factors[k], start[k])
        else:
            np.testing.assert_array_equal(rt.factors[k], start[k])
    for suffix in ("npz", "safetensors"):
        path = tmp_path / f"f.{suffix}"
        rt.save_factors(path)
        rt2 = EdgeRuntime(b.path, mode=mode)
        rt2.load_factors(path)
        for k in rt.factors:
            np.testing.assert_array_equal(rt2.factors[k], rt.factors[k])


def test_minilm_cut2_forward_matches_torch(tmp_path):
    """Real all-MiniLM-L6-v2, cut 2: ORT forward == torch (1e-4) and relative grad error small (~16 s)."""
    from splitwave.server.export import export_bundle
    from splitwave.server.models import build_model, minilm_path
    from splitwave.server.split import LoraSpec, split_model

    split = split_model(build_model(minilm_path(), "seq-cls"), 2, LoraSpec(r=8, alpha=16), "seq-cls")
    g = torch.Generator().manual_seed(0)
    split.set_edge_factors(
        {k: (0.05 * torch.randn(v.shape, generator=g)).numpy() for k, v in split.edge_factors().items()}
    )
    export_bundle(split, tmp_path, modes=("recompute",), tokenizer_dir=minilm_path())
    rt = EdgeRuntime(tmp_path, mode="recompute")
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(4, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    gh = rng.standard_normal((4, 24, 384)).astype(np.float32)
    h_ref, g_ref = _torch_ref(split, ids, mask, gh)
    np.testing.assert_allclose(rt.forward(ids, mask), h_ref, atol=1e-4, rtol=0)
    grads = rt.backward(gh)
    for k in g_ref:
        assert np.abs(grads[k] - g_ref[k]).max() <= 1e-4 * max(1.0, np.abs(g_ref[k]).max()) * 10
    assert "tokenizer.json" in rt.manifest.tokenizer_files


def test_runtime_options_and_shared_weights(edge_bundle, tmp_path):
    """Spinning/arena options and the shared weight mapping change no numbers; old bundles still load."""
    b = edge_bundle("bert")
    m = b.manifest
    assert m.initializers and set(m.graph_initializers) == {g for mode in m.modes for g in m.graphs[mode]}
    for e in m.initializers.values():
        assert e.offset % 64 == 0 and e.offset + e.length <= m.weights_bytes
    # a bundle written before the "initializers" table: ORT loads the external data itself
    old = tmp_path / "old"
    old.mkdir()
    for p in b.path.iterdir():
        if p.name != "manifest.json":
            os.symlink(p, old / p.name)
    (old / "manifest.json").write_text(
        json.dumps({k: v for k, v in m.to_dict().items() if k not in ("initializers", "graph_initializers")})
    )
    ids, mask, gh = _batch(2, 9, m.hidden_size)
    for mode in MODES:
        ref = EdgeRuntime(b.path, mode=mode, threads=1)
        assert ref._weights.values
        h_ref, g_ref = ref.forward(ids, mask), ref.backward(gh)
        for rt in (
            EdgeRuntime(b.path, mode=mode, threads=1, spinning=True, low_memory=False),
            EdgeRuntime(old, mode=mode, threads=1),
        ):
            np.testing.assert_allclose(rt.forward(ids, mask), h_ref, atol=1e-6, rtol=0)
            grads = rt.backward(gh)
            for k in g_ref:
                np.testing.assert_allclose(grads[k], g_ref[k], atol=1e-6, rtol=0)
        assert not EdgeRuntime(old, mode=mode, threads=1)._weights.values
