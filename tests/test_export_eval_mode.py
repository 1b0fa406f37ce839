"""The edge bundle is the model in eval mode: no dropout in the exported graphs, even for a model with dropout.

torch.onnx.export warns "Exporting a model while it is in training mode" on every export: that flag is the one
of the thin wrapper module the exporter is handed (a fresh nn.Module is in training mode), not of the model.
The graph inside the wrapper was traced by make_fx from the split model, whose modules `split_model` puts in
eval mode, so dropout is already decided (off) before the exporter sees it. This test pins that down with
dropout p = 0.1 (MiniLM's own figure): the ONNX graphs have no random op, and the same trace with the model in
training mode would have them (so the check can fail).
"""

from __future__ import annotations

import onnx
from torch import nn

RANDOM_OPS = (
    "Dropout",
    "RandomUniform",
    "RandomUniformLike",
    "RandomNormal",
    "RandomNormalLike",
    "Bernoulli",
    "Multinomial",
)


def _split_with_dropout(p: float = 0.1):
    from splitwave.server.models import build_model
    from splitwave.server.split import LoraSpec, split_model

    model = build_model("bert", "seq-cls", seed=0)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    model.config.attention_probs_dropout_prob = model.config.hidden_dropout_prob = p
    return split_model(model, 2, LoraSpec(r=4, alpha=8), "seq-cls")


def _random_aten_ops(split) -> list[str]:
    from torch.fx.experimental.proxy_tensor import make_fx

    from splitwave.server.export.trace import EdgeFn, example_inputs

    fn = EdgeFn(split)
    params = split.edge_factor_params()
    fs = [params[k].detach().clone() for k in fn.names]
    ids, mask, _ = example_inputs(split, 3, 11)
    gm = make_fx(fn, _allow_non_fake_inputs=True)(fs, ids, mask)
    return [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_function" and any(w in str(n.target) for w in ("dropout", "bernoulli", "rand"))
    ]


def test_exported_graphs_have_no_dropout(tmp_path):
    from splitwave.server.export import export_bundle

    split = _split_with_dropout()
    assert split.edge.trunk.blocks[0].output.dropout.p == 0.1
    export_bundle(split, tmp_path, modes=("recompute",))
    for graph in ("forward.onnx", "vjp.onnx"):
        ops = {n.op_type for n in onnx.load(str(tmp_path / graph), load_external_data=False).graph.node}
        assert not ops & set(RANDOM_OPS), (graph, ops & set(RANDOM_OPS))
    assert _random_aten_ops(split) == []  # what was exported: the eval-mode trace
    split.peft_model.train()
    try:
        assert _random_aten_ops(split), "a training-mode trace should contain dropout (the check would miss it)"
    finally:
        split.peft_model.eval()
