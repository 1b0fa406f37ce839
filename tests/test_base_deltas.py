"""Base-weight deltas (FedEx-LoRA, FLoRA) folded into the ONNX edge equal the same fold in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitwave.edge.runtime import EdgeRuntime
from splitwave.server.torch_edge import TorchEdge


@pytest.mark.parametrize(
    "family,mode",
    # the GPT-2 case takes ~50 s on 2 cores: slow suite (the default suite stays under 15 min)
    [("bert", "saved"), ("bert", "recompute"), pytest.param("gpt2", "saved", marks=pytest.mark.slow)],
)
def test_folded_base_delta_matches_torch(edge_bundle, family, mode):
    b = edge_bundle(family)
    split = b.split
    rt = EdgeRuntime(b.path, mode=mode)
    modules = dict(split.peft_model.named_modules())
    rng = np.random.default_rng(0)
    deltas = {}
    for key in rt.factor_names:
        if key.endswith(".lora_A.weight"):
            m = key[: -len(".lora_A.weight")]
            w = modules[m].base_layer.weight
            deltas[m] = (0.05 * rng.standard_normal(tuple(w.shape))).astype(np.float32)
    assert rt.manifest.base_weights and all(rt.manifest.base_weights[m] for m in deltas)
    ids = rng.integers(10, 100, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 5:] = 0
    gh = rng.standard_normal((3, 9, rt.manifest.hidden_size)).astype(np.float32)
    h0 = rt.forward(ids, mask)
    rt.set_base_deltas(deltas)
    h1 = rt.forward(ids, mask)
    g1 = rt.backward(gh)
    originals = {m: modules[m].base_layer.weight.detach().clone() for m in deltas}
    try:
        with torch.no_grad():
            for m, d in deltas.items():
                modules[m].base_layer.weight.add_(torch.from_numpy(d))
        edge = TorchEdge(split)
        want = edge.forward(ids, mask)
        want_g = edge.backward(gh)
    finally:
        with torch.no_grad():
            for m, w in originals.items():
                modules[m].base_layer.weight.copy_(w)
    assert np.abs(h1 - h0).max() > 1e-3  # the fold changed the output
    assert np.abs(h1 - want).max() < 1e-5
    assert max(float(np.abs(g1[k] - want_g[k]).max()) for k in g1) < 1e-5
