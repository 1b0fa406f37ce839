"""ONNX graph passes on the exported graphs: hand saved activations over unreshaped, and give initializers
content-derived names.

Its own module because these rewrite ONNX protos only (no torch): what they do to a graph can be read and
tested apart from how the graph was traced.
"""

from __future__ import annotations

import onnx
from onnx import helper


def peel_output_reshapes(fwd: onnx.ModelProto, bwd: onnx.ModelProto) -> int:
    """Hand saved activations to the backward in the layout the forward computed them in.

    A saved output made by a Reshape (e.g. a Gemm's [B*S, N] result shown as [B, S, N]) is a copy in ORT: a
    graph output never aliases another tensor. The forward now outputs the Reshape's input under the same
    name and the backward reshapes it back, taking batch and seq from grad_h (a reshape of an input aliases
    it). Returns how many outputs were peeled.
    """
    producer = {o: n for n in fwd.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in fwd.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in fwd.graph.output}
    bw_inputs = {i.name: i for i in bwd.graph.input}
    peeled, renamed = [], set()
    for out in fwd.graph.output:
        node = producer.get(out.name)
        if not out.name.startswith("saved.") or node is None or node.op_type != "Reshape" or out.name not in bw_inputs:
            continue
        src = node.input[0]
        dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        if (
            src not in producer
            or src in graph_outputs
            or len(consumers.get(out.name, []))
            or any(isinstance(d, str) and d not in ("batch", "seq") for d in dims)
            or not dims
        ):
            continue
        for n in fwd.graph.node:  # the source tensor takes the output's name
            n.output[:] = [out.name if o == src else o for o in n.output]
            n.input[:] = [out.name if i == src else i for i in n.input]
        fwd.graph.node.remove(node)
        out.type.tensor_type.ClearField("shape")
        peeled.append((out.name, dims))
        renamed.add(src)
    if not peeled:
        return 0
    vi = [v for v in fwd.graph.value_info if v.name not in renamed | {name for name, _ in peeled}]
    del fwd.graph.value_info[:]
    fwd.graph.value_info.extend(vi)

    new_nodes = [
        helper.make_node("Shape", ["grad_h"], ["peel.B"], start=0, end=1),
        helper.make_node("Shape", ["grad_h"], ["peel.S"], start=1, end=2),
    ]
    for name, dims in peeled:
        canon = name + ".canonical"
        for n in bwd.graph.node:
            n.input[:] = [canon if i == name else i for i in n.input]
        parts = []
        for j, d in enumerate(dims):
            if d == "batch":
                parts.append("peel.B")
            elif d == "seq":
                parts.append("peel.S")
            else:
                const = f"{name}.dim{j}"
                new_nodes.append(
                    helper.make_node(
                        "Constant", [], [const], value=helper.make_tensor(const, onnx.TensorProto.INT64, [1], [int(d)])
                    )
                )
                parts.append(const)
        new_nodes.append(helper.make_node("Concat", parts, [name + ".shape"], axis=0))
        new_nodes.append(helper.make_node("Reshape", [name, name + ".shape"], [canon]))
        bw_inputs[name].type.tensor_type.ClearField("shape")
    nodes = new_nodes + list(bwd.graph.node)
    del bwd.graph.node[:]
    bwd.graph.node.extend(nodes)
    return len(peeled)


def rename_initializers(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Content-derived initializer names: the same weight has the same name in every graph of the bundle."""
    if not renames:
        return
    g = model.graph
    seen = set()
    keep = []
    for t in g.initializer:
        if t.name in renames:
            t.name = renames[t.name]
        if t.name in seen:  # two identical weights inside one graph: keep one
            continue
        seen.add(t.name)
        keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    for vi in list(g.value_info):
        if vi.name in renames:
            vi.name = renames[vi.name]

    def fix(graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    fix(attr.g)
                for sub in attr.graphs:
                    fix(sub)

    fix(g)
    for o in g.output:
        if o.name in renames:
            raise RuntimeError(f"graph output {o.name} is an initializer")
