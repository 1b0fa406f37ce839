"""Split composition == unsplit PeftModel, for every cut of every family (tiny configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from splitwave.server.models import build_model, tiny_config
from splitwave.server.split import LoraSpec, split_loss, split_model
from tests.conftest import make_split

CASES = [("bert", "seq-cls"), ("gpt2", "seq-cls"), ("llama", "seq-cls"), ("gpt2", "causal-lm"), ("llama", "causal-lm")]


def _batch(batch=3, seq=9, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 3 :] = 0  # right padding
    mask[2, 2:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family,task", CASES)
def test_composition_equals_unsplit_every_cut(family, task):
    n = tiny_config(family, task).num_hidden_layers
    ids, mask = _batch()
    for cut in range(1, n):
        split = make_split(family, task, cut)
        with torch.no_grad():
            ref = split.peft_model(input_ids=ids, attention_mask=mask).logits
            out = split.server(split.edge(ids, mask), mask)
        assert out.shape == ref.shape
        if task == "causal-lm":
            ref, out = ref[mask.bool()], out[mask.bool()]
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (family, task, cut, (out - ref).abs().max())


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_factor_names_are_peft_saved_keys(family):
    split = make_split(family, "seq-cls", 2)
    lora_keys = {k for k in get_peft_model_state_dict(split.peft_model) if ".lora_" in k}
    edge, server = set(split.edge_factor_names()), set(split.server_factor_names())
    assert edge and server and not edge & server
    assert edge | server == lora_keys
    for k in edge:  # blocks below the cut only
        assert any(f".{i}." in k for i in range(2))
    f = split.edge_factors()
    name = next(iter(f))
    assert f[name].dtype == np.float32
    split.set_edge_factors({name: np.zeros_like(f[name])})
    assert np.all(split.edge_factors()[name] == 0)
    with pytest.raises(ValueError):
        split.set_edge_factors({name: np.zeros((1, 1), np.float32)})


@pytest.mark.parametrize("cut", [0, 4, -1, 10])
def test_invalid_cut(cut):
    with pytest.raises(ValueError, match="cut"):
        split_model(build_model("bert"), cut, LoraSpec(r=2, alpha=4))


def test_lora_spec_targets_and_rslora():
    split = split_model(
        build_model("llama"), 1, LoraSpec(r=2, alpha=4, targets=["q_proj", "k_proj", "o_proj"], rslora=True)
    )
    names = split.edge_factor_names()
    assert any("k_proj" in k for k in names) and any("o_proj" in k for k in names)
    assert not any("v_proj" in k for k in names)
    layer = split.peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(4 / 2**0.5)


@pytest.mark.parametrize("family,task", [("gpt2", "causal-lm"), ("bert", "seq-cls")])
def test_loss_matches_hf(family, task):
    split = make_split(family, task, 2)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100) if task == "causal-lm" else torch.tensor([0, 1, 1])
    with torch.no_grad():
        ref = split.peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        ours = split.loss(split(ids, mask), labels)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(split_loss(split(ids, mask), labels, task), ref, atol=1e-6)


def test_split_training_equals_centralized():
    """Gradients through edge+server equal gradients of the unsplit PeftModel."""
    split = make_split("llama", "seq-cls", 2)
    ids, mask = _batch()
    labels = torch.tensor([1, 0, 1])
    params = {**split.edge_factor_params(), **split.server_factor_params()}
    ref = torch.autograd.grad(
        split.peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss, list(params.values())
    )
    h = split.edge(ids, mask)
    hd = h.detach().requires_grad_(True)
    loss = split.loss(split.server(hd, mask), labels)
    srv = torch.autograd.grad(loss, [hd, *split.server_factor_params().values()])
    edge = torch.autograd.grad(h, list(split.edge_factor_params().values()), srv[0])
    ours = [*edge, *srv[1:]]
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_bert_top_on_valid_tokens_equals_padded(cut):
    """The BERT server top computes only the valid tokens of a padded batch: the same logits, grad_h (0 on
    padding) and adapter gradients as the padded forward, nonzero LoRA B so every factor has a gradient."""
    split = make_split("bert", "seq-cls", cut)
    g = torch.Generator().manual_seed(cut)
    for p in split.server_factor_params().values():
        p.data = 0.1 * torch.randn(p.shape, generator=g)
    mask = torch.ones(5, 11, dtype=torch.long)
    for r, n in enumerate([11, 3, 1, 7, 9]):
        mask[r, n:] = 0
    mask[3, 4] = 0  # a hole inside a row is masked as a key too
    h0 = torch.randn(5, 11, split.server.trunk.blocks[0].attention.self.query.in_features, generator=g)
    labels = torch.tensor([0, 1, 1, 0, 1])
    assert split.server.unpads(mask) and split.server.unpads(mask.numpy())
    assert not split.server.unpads(torch.ones_like(mask))  # nothing to drop: the padded path
    assert not split.server.unpads(torch.cat([mask[:, 1:], mask[:, :1]], 1))  # a row without its [CLS]

    def run(unpadded: bool):
        split.peft_model.zero_grad(set_to_none=True)
        h = h0.clone().requires_grad_(True)
        logits = split.server(h, mask) if unpadded else split.server.forward_padded(h, mask)
        split_loss(logits, labels, "seq-cls").backward()
        grads = {k: p.grad.clone() for k, p in split.server_factor_params().items()}
        return logits.detach(), h.grad, grads

    out_u, gh_u, g_u = run(True)
    out_p, gh_p, g_p = run(False)
    assert torch.allclose(out_u, out_p, atol=1e-6, rtol=0), (out_u - out_p).abs().max()
    assert torch.allclose(gh_u, gh_p, atol=1e-7, rtol=1e-5), (gh_u - gh_p).abs().max()
    assert torch.all(gh_u[mask == 0] == 0) and torch.all(gh_p[mask == 0] == 0)
    assert set(g_u) == set(g_p) and all(g_p[k].abs().sum() > 0 for k in g_p)
    for k in g_p:
        assert torch.allclose(g_u[k], g_p[k], atol=1e-6, rtol=1e-5), (k, (g_u[k] - g_p[k]).abs().max())
