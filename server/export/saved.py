"""Saved-activation mode: the joint forward+backward graph of the edge, split by AOTAutograd's min-cut
partitioner into forward_saved.onnx (h + saved activations) and backward_saved.onnx (saved + grad_h -> factor
grads), with the partitioner's symbolic sizes recomputed from (batch, seq) inside the backward.

Its own module because this partition (which tensors cross from forward to backward, in which canonical
shapes) is the one intricate part of the export; recompute mode (trace.py) needs none of it.
"""

from __future__ import annotations

import logging

import onnx
import sympy
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from splitwave.server.export.trace import EdgeFn, Tracing, decompositions, grad_name, to_onnx

log = logging.getLogger(__name__)


class SymEval:
    """Evaluate the partitioner's saved SymInts from (batch, seq) at runtime inside the backward export."""

    def __init__(self, sym_batch, sym_seq, concrete: dict):
        self.b, self.s, self.concrete = sym_batch, sym_seq, concrete

    def __call__(self, expr, batch, seq):
        expr = sympy.sympify(expr).xreplace(self.concrete)
        return self._ev(expr, {self.b: batch, self.s: seq})

    def _ev(self, e, env):
        if e in env:
            return env[e]
        if e.is_Integer:
            return int(e)
        args = [self._ev(a, env) for a in e.args]
        name = type(e).__name__
        if isinstance(e, sympy.Add):
            out = args[0]
            for a in args[1:]:
                out = out + a
            return out
        if isinstance(e, sympy.Mul):
            out = args[0]
            for a in args[1:]:
                out = out * a
            return out
        if name in ("FloorDiv",):
            return args[0] // args[1]
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and int(e.exp) > 0:
            out = args[0]
            for _ in range(int(e.exp) - 1):
                out = out * args[0]
            return out
        raise NotImplementedError(f"cannot evaluate saved symbolic size {e}")


def partition_joint(fn: EdgeFn, fs, ids, mask, gh):
    """Partition the joint graph into fw (-> h + saved) and bw (saved + grad_h -> grads)."""
    # lazy: torch's private functorch partitioner pulls in inductor's config; only saved mode needs it
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    table = decompositions()
    joint = make_fx(
        lambda primals, tangents: fn.joint(primals, tangents),
        decomposition_table=table,
        tracing_mode="symbolic",
        _allow_non_fake_inputs=True,
    )([*fs, ids, mask], [gh])
    fw, bw = min_cut_rematerialization_partition(joint, None, compiler="inductor", num_fwd_outputs=1)
    return fw, bw


#: ops that only re-view (or copy unchanged) one tensor: a saved tensor made by a chain of them is saved as the
#: chain's base and the chain is replayed inside the backward graph
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "permute",
    "transpose",
    "t",
    "expand",
    "clone",
    "alias",
    "unsqueeze",
    "squeeze",
}


def op_name(node) -> str:
    return getattr(getattr(node.target, "_overloadpacket", None), "__name__", "") if node.op == "call_function" else ""


def view_chain(node):
    """(base, [view nodes from base up to node]); the base is never a graph input."""
    chain = []
    while (
        op_name(node) in VIEW_OPS
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0].op != "placeholder"
        and isinstance(node.args[0].meta.get("val"), torch.Tensor)
    ):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def shape_expr(val, concrete) -> list:
    return [sympy.sympify(d.node.expr if isinstance(d, torch.SymInt) else int(d)).xreplace(concrete) for d in val.shape]


def saved_callables(fn: EdgeFn, fw, bw, n_factors):
    """Wrap the partitioned graphs: fw returns (h, *saved tensors); bw recomputes its SymInts from grad_h.

    What crosses from forward to backward is the set of distinct *bases* of the partitioner's saved tensors:
    a saved tensor that is a view chain (view/permute/expand/clone...) of another activation is rebuilt in
    the backward from that activation. Saving the chain's end made ORT materialize it (a transposed copy of
    K, a cloned copy of the softmax already saved, reshape copies), since a graph output cannot alias.
    """
    fw_ph = [n for n in fw.graph.nodes if n.op == "placeholder"]
    fw_out_node = next(n for n in fw.graph.nodes if n.op == "output")
    fw_out = list(fw_out_node.args[0])
    bw_ph = [n for n in bw.graph.nodes if n.op == "placeholder"]
    ids_val = fw_ph[n_factors].meta["val"]
    sym_b, sym_s = ids_val.shape[0].node.expr, ids_val.shape[1].node.expr
    mask_s = fw_ph[n_factors + 1].meta["val"].shape[1].node.expr
    concrete = {}
    # the factor shapes are static per bundle: take them from the real factors
    real = [p.shape for p in fn.split.edge_factor_params().values()]
    for ph, shape in zip(fw_ph[:n_factors], real):
        for d, c in zip(ph.meta["val"].shape, shape):
            if isinstance(d, torch.SymInt):
                e = d.node.expr
                if isinstance(e, sympy.Symbol):
                    concrete[e] = sympy.Integer(int(c))
    if mask_s != sym_s:  # input_ids and attention_mask share the sequence length
        concrete[mask_s] = sym_s
    sym_eval = SymEval(sym_b, sym_s, concrete)

    is_sym = [not isinstance(a.meta.get("val"), torch.Tensor) for a in fw_out[1:]]
    bw_sym = [n for n in bw_ph if not isinstance(n.meta.get("val"), torch.Tensor)]
    assert len(bw_sym) == sum(is_sym), (len(bw_sym), sum(is_sym))
    saved_nodes = [a for a, sym in zip(fw_out[1:], is_sym) if not sym]
    bases, rebuild = [], []  # rebuild[i] = (index of base, view chain) for the i-th saved tensor
    for node in saved_nodes:
        base, chain = view_chain(node)
        if base not in bases:
            bases.append(base)
        rebuild.append((bases.index(base), chain))
    fw.graph.erase_node(fw_out_node)
    with fw.graph.inserting_after(list(fw.graph.nodes)[-1]):
        fw.graph.output((fw_out[0], *bases))
    fw.graph.eliminate_dead_code()
    fw.recompile()

    # Bases travel in a canonical shape [B]*a + [S]*c + [k] (numel = k * B^a * S^c), so the backward export
    # can declare every dim as batch/seq (torch.export cannot express dims like B*S).
    base_shapes, canon = [], []
    for base in bases:
        shape = shape_expr(base.meta["val"], concrete)
        numel = sympy.expand(sympy.Mul(*shape)) if shape else sympy.Integer(1)
        poly = sympy.Poly(numel, sym_b, sym_s)
        if len(poly.terms()) != 1:
            raise NotImplementedError(f"saved tensor of shape {shape} is not a monomial in batch/seq")
        (pa, pc), k = poly.terms()[0]
        base_shapes.append(shape)
        canon.append((int(pa), int(pc), int(k)))

    def runtime_arg(a, b, s):
        if isinstance(a, torch.fx.Node):
            v = a.meta["val"]
            return sym_eval(v.node.expr, b, s) if isinstance(v, torch.SymInt) else v
        if isinstance(a, (list, tuple)):
            return type(a)(runtime_arg(x, b, s) for x in a)
        if isinstance(a, torch.SymInt):
            return sym_eval(a.node.expr, b, s)
        return a

    def replay(t, chain, b, s):
        for node in chain:
            if op_name(node) in ("clone", "alias") or (
                op_name(node) == "expand"
                and shape_expr(node.meta["val"], concrete) == shape_expr(node.args[0].meta["val"], concrete)
            ):
                continue  # value-identical: no op in the backward graph
            # with the clones skipped a view may meet a strided tensor: reshape (the same ONNX Reshape)
            target = torch.ops.aten.reshape.default if op_name(node) in ("view", "_unsafe_view") else node.target
            t = target(t, *runtime_arg(node.args[1:], b, s), **runtime_arg(dict(node.kwargs), b, s))
        return t

    def is_canonical(shape, pa, pc, k):
        want = [sym_b] * pa + [sym_s] * pc + [sympy.Integer(k)]
        return [sympy.expand(d) for d in shape] == want or (k == 1 and shape == want[:-1])

    def fw_call(*args):
        outs = fw(*args)
        b, s = args[n_factors].shape[0], args[n_factors].shape[1]
        return tuple(
            [outs[0]]
            + [
                t if is_canonical(shp, pa, pc, k) else t.reshape([b] * pa + [s] * pc + [k])
                for t, shp, (pa, pc, k) in zip(outs[1:], base_shapes, canon)
            ]
        )

    def bw_call(*args):  # args: bases (canonical shapes)..., grad_h
        grad_h = args[-1]
        b, s = grad_h.shape[0], grad_h.shape[1]
        syms = [
            sym_eval(n.meta["val"].node.expr, b, s) if isinstance(n.meta["val"], torch.SymInt) else n.meta["val"]
            for n in bw_sym
        ]
        based = [t.reshape([sym_eval(d, b, s) for d in shp]) for t, shp in zip(args[:-1], base_shapes)]
        tensors = [replay(based[i], chain, b, s) for i, chain in rebuild]
        it_t = iter([*tensors, grad_h])
        it_s = iter(syms)
        full = [next(it_s) if not isinstance(n.meta.get("val"), torch.Tensor) else next(it_t) for n in bw_ph]
        return tuple(bw(*full))

    return fw_call, bw_call, [b.name for b in bases], canon


def trace_saved(t: Tracing) -> tuple[dict[str, onnx.ModelProto], list[str]]:
    """Saved mode's two graphs ({file: model}) and the names of the saved activations between them."""
    fn, fs, ids, mask, gh, names, argn, tok_dyn = t.fn, t.fs, t.ids, t.mask, t.gh, t.names, t.argn, t.tok_dyn
    fw, bw = t.timed("partition", lambda: partition_joint(fn, fs, ids, mask, gh))
    fw_call, bw_call, saved_raw, saved_dyn = saved_callables(fn, fw, bw, len(names))
    saved_names = [f"saved.{i}" for i in range(len(saved_raw))]
    with torch.no_grad():
        fw_example = fw_call(*fs, ids, mask)
    saved_example = list(fw_example[1:])

    def fwd_saved():
        dyn = {"input_ids": tok_dyn, "attention_mask": tok_dyn, **{a: None for a in argn}}
        return to_onnx(
            lambda input_ids, attention_mask, *f: fw_call(*f, input_ids, attention_mask),
            ["input_ids", "attention_mask", *argn],
            ["input_ids", "attention_mask", *names],
            ["h", *saved_names],
            [ids, mask, *fs],
            dyn,
        )

    def bwd_saved():
        sargs = [f"s{i}" for i in range(len(saved_names))]
        dyn = {
            a: ({**{i: t.bdim for i in range(pa)}, **{pa + j: t.sdim for j in range(pc)}} or None)
            for a, (pa, pc, _k) in zip(sargs, saved_dyn)
        }
        dyn["grad_h"] = {0: t.bdim, 1: t.sdim}
        return to_onnx(
            lambda *a: bw_call(*a),
            [*sargs, "grad_h"],
            [*saved_names, "grad_h"],
            [grad_name(k) for k in names],
            [*saved_example, gh],
            dyn,
        )

    models = {"forward_saved.onnx": t.timed("forward_saved.onnx", fwd_saved)}
    models["backward_saved.onnx"] = t.timed("backward_saved.onnx", bwd_saved)
    return models, saved_names
