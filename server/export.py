"""Export the edge part of a SplitModel as a torch-free ONNX "edge bundle".

The edge bottom is a pure function h = f(lora_factors, input_ids, attention_mask) with the frozen weights as
constants. We trace it (and its vector-Jacobian product) to decomposed ATen graphs with `make_fx` in
symbolic mode, so batch and sequence stay dynamic, and export each graph with the dynamo ONNX exporter:

* recompute mode: forward.onnx (h) and vjp.onnx (factor grads; recomputes the forward: low memory);
* saved mode: the joint forward+backward graph is split by AOTAutograd's min-cut partitioner into
  forward_saved.onnx (h + saved activations) and backward_saved.onnx (saved + grad_h -> factor grads).

Frozen weights are deduplicated by content across all graphs and written once to `weights.bin` as ONNX
external data, under content-derived names so a runtime can share one copy between sessions.
See shared/specs/edge_training.md for why this form (plain autograd inside make_fx, not torch.func.vjp).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import sympy
import torch
from torch import nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from splitwave.common.manifest import (
    FORMAT,
    BaseWeightPlace,
    BundleManifest,
    FactorSpec,
    InitializerEntry,
    LoraInfo,
)
from splitwave.server.split import SplitModel

log = logging.getLogger(__name__)

#: opset 20 has a Gelu operator: the exporter emits one node that ORT runs as one kernel, where opset 18 gets
#: the Div/Erf/Add/Mul/Mul formula (which ORT's Gelu fusion did not match: 5 elementwise passes per GELU)
OPSET = 20
WEIGHTS_FILE = "weights.bin"
FACTORS_FILE = "factors.npz"
MODES = ("recompute", "saved")
GRAPHS = {"recompute": ("forward.onnx", "vjp.onnx"), "saved": ("forward_saved.onnx", "backward_saved.onnx")}
#: initializers smaller than this stay inside the graph (shape constants, scalars)
_EXTERNAL_MIN_BYTES = 1024
_ALIGN = 64
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "tokenizer.model",
)


def grad_name(key: str) -> str:
    """ONNX output name of the gradient of factor `key`."""
    return f"grad.{key}"


def _decompositions() -> dict:
    table = dict(core_aten_decompositions())

    def empty_permuted(size, physical_layout, **kw):  # the ONNX exporter cannot lower empty_permuted
        return torch.zeros(size, dtype=kw.get("dtype"), device=kw.get("device"))

    table[torch.ops.aten.empty_permuted.default] = empty_permuted
    return table


class _EdgeFn:
    """h = f(factors, input_ids, attention_mask) with the frozen edge weights as closure constants."""

    def __init__(self, split: SplitModel):
        self.split = split
        self.names = split.edge_factor_names()
        self.local = [split.edge_param_name(k) for k in self.names]

    def __call__(self, fs, input_ids, attention_mask):
        return torch.func.functional_call(self.split.edge, dict(zip(self.local, fs)), (input_ids, attention_mask))

    def vjp(self, fs, input_ids, attention_mask, grad_h):
        # plain autograd (not torch.func.vjp): keeps the symbolic trace dynamic in batch/seq
        lp = [t.detach().requires_grad_(True) for t in fs]
        with torch.enable_grad():
            out = self(lp, input_ids, attention_mask)
            return list(torch.autograd.grad(out, lp, grad_h))

    def joint(self, primals, tangents):
        """AOTAutograd-style joint graph (names primals_*/tangents_* matter to the partitioner)."""
        n = len(self.names)
        lp = [t.detach().requires_grad_(True) for t in primals[:n]]
        with torch.enable_grad():
            out = self(lp, primals[n], primals[n + 1])
            grads = torch.autograd.grad(out, lp, tangents[0])
        return [out, *grads]


def _make_wrapper(call, arg_names: list[str]) -> nn.Module:
    """nn.Module with explicit named forward arguments (torch.export's dynamic_shapes need names)."""
    params = ", ".join(arg_names)
    ns: dict = {}
    exec(f"def forward(self, {params}):\n    return self._call({params})\n", ns)  # noqa: S102
    cls = type("EdgeGraph", (nn.Module,), {"forward": ns["forward"]})
    mod = cls()
    object.__setattr__(mod, "_call", call)
    return mod


def _to_onnx(call, arg_names, input_names, output_names, example, dynamic, optimize=False) -> onnx.ModelProto:
    wrapper = _make_wrapper(call, arg_names)
    prog = torch.onnx.export(
        wrapper,
        tuple(example),
        dynamo=True,
        opset_version=OPSET,
        dynamic_shapes=dynamic,
        input_names=input_names,
        output_names=output_names,
        optimize=optimize,
        verbose=False,
    )
    return prog.model_proto


class _SymEval:
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


def _trace_saved(fn: _EdgeFn, fs, ids, mask, gh):
    """Partition the joint graph into fw (-> h + saved) and bw (saved + grad_h -> grads)."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    table = _decompositions()
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
_VIEW_OPS = {
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


def _op_name(node) -> str:
    return getattr(getattr(node.target, "_overloadpacket", None), "__name__", "") if node.op == "call_function" else ""


def _view_chain(node):
    """(base, [view nodes from base up to node]); the base is never a graph input."""
    chain = []
    while (
        _op_name(node) in _VIEW_OPS
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0].op != "placeholder"
        and isinstance(node.args[0].meta.get("val"), torch.Tensor)
    ):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _shape_expr(val, concrete) -> list:
    return [sympy.sympify(d.node.expr if isinstance(d, torch.SymInt) else int(d)).xreplace(concrete) for d in val.shape]


def _saved_callables(fn: _EdgeFn, fw, bw, n_factors):
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
    sym_eval = _SymEval(sym_b, sym_s, concrete)

    is_sym = [not isinstance(a.meta.get("val"), torch.Tensor) for a in fw_out[1:]]
    bw_sym = [n for n in bw_ph if not isinstance(n.meta.get("val"), torch.Tensor)]
    assert len(bw_sym) == sum(is_sym), (len(bw_sym), sum(is_sym))
    saved_nodes = [a for a, sym in zip(fw_out[1:], is_sym) if not sym]
    bases, rebuild = [], []  # rebuild[i] = (index of base, view chain) for the i-th saved tensor
    for node in saved_nodes:
        base, chain = _view_chain(node)
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
        shape = _shape_expr(base.meta["val"], concrete)
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
            if _op_name(node) in ("clone", "alias") or (
                _op_name(node) == "expand"
                and _shape_expr(node.meta["val"], concrete) == _shape_expr(node.args[0].meta["val"], concrete)
            ):
                continue  # value-identical: no op in the backward graph
            # with the clones skipped a view may meet a strided tensor: reshape (the same ONNX Reshape)
            target = torch.ops.aten.reshape.default if _op_name(node) in ("view", "_unsafe_view") else node.target
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


def _peel_output_reshapes(fwd: onnx.ModelProto, bwd: onnx.ModelProto) -> int:
    """Hand saved activations to the backward in the layout the forward computed them in.

    A saved output made by a Reshape (e.g. a Gemm's [B*S, N] result shown as [B, S, N]) is a copy in ORT: a
    graph output never aliases another tensor. The forward now outputs the Reshape's input under the same
    name and the backward reshapes it back, taking batch and seq from grad_h (a reshape of an input aliases
    it). Returns how many outputs were peeled.
    """
    from onnx import helper

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


def _externalize(models: dict[str, onnx.ModelProto], out_dir: Path) -> tuple[int, str, dict, dict]:
    """Write all large initializers once (dedup by content) to weights.bin; save the graphs referencing it.

    Also returns the table {name: offset/length/dtype/shape} and {graph file: [names]} (manifest keys
    "initializers" / "graph_initializers"): the runtime maps weights.bin once and hands the same buffers to
    every session, instead of each session mapping (and paging in) its own copy.
    """
    offsets: dict[str, tuple[int, int, str]] = {}
    table: dict[str, dict] = {}
    per_graph: dict[str, list[str]] = {}
    wpath = out_dir / WEIGHTS_FILE
    h = hashlib.sha256()
    pos = 0
    with open(wpath, "wb") as wf:
        for fname, model in models.items():
            renames = {}
            for t in model.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    raise RuntimeError("unexpected external initializer from the exporter")
                raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
                if len(raw) < _EXTERNAL_MIN_BYTES:
                    continue
                digest = hashlib.sha256(raw + str(t.data_type).encode() + str(list(t.dims)).encode()).hexdigest()
                if digest not in offsets:
                    pad = (-pos) % _ALIGN
                    if pad:
                        wf.write(b"\0" * pad)
                        h.update(b"\0" * pad)
                        pos += pad
                    wf.write(raw)
                    h.update(raw)
                    offsets[digest] = (pos, len(raw), f"w_{digest[:16]}")
                    pos += len(raw)
                off, length, canon = offsets[digest]
                renames[t.name] = canon
                table[canon] = {
                    "offset": off,
                    "length": length,
                    "shape": [int(d) for d in t.dims],
                    "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).name,
                }
                if canon not in per_graph.setdefault(fname, []):
                    per_graph[fname].append(canon)
                t.ClearField("raw_data")
                for f in ("float_data", "int32_data", "int64_data", "double_data"):
                    t.ClearField(f)
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(off)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
            _rename_initializers(model, renames)
            onnx.save_model(model, str(out_dir / fname))
    return pos, h.hexdigest(), table, per_graph


def _rename_initializers(model: onnx.ModelProto, renames: dict[str, str]) -> None:
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


def _example_inputs(split: SplitModel, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    vocab = split.peft_model.base_model.model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    hidden = split.peft_model.base_model.model.config.hidden_size
    gh = torch.randn(batch, seq, hidden, generator=g)
    return ids, mask, gh


def export_bundle(
    split: SplitModel,
    out_dir,
    modes=MODES,
    model_id: str | None = None,
    tokenizer_dir=None,
    trace_shape: tuple[int, int] = (3, 11),
) -> BundleManifest:
    """Write the edge bundle for `split` into `out_dir` and return its manifest (also manifest.json).

    trace_shape is the example (batch, seq) used for tracing; the graphs are dynamic in both, but tracing
    at sizes distinct from every model dimension avoids accidental specialization.
    """
    modes = tuple(modes)
    bad = set(modes) - set(MODES)
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for p in split.peft_model.parameters():
        p.requires_grad_(False)
    try:
        manifest = _export(split, out, modes, model_id, tokenizer_dir, trace_shape)
    finally:
        for p in [*split.edge_factor_params().values(), *split.server_factor_params().values()]:
            p.requires_grad_(True)
    manifest.export_seconds["total"] = round(time.perf_counter() - t_all, 2)
    manifest.write(out)
    log.info("exported bundle to %s in %.1f s", out, manifest.export_seconds["total"])
    return manifest


def _export(split, out: Path, modes, model_id, tokenizer_dir, trace_shape) -> BundleManifest:
    fn = _EdgeFn(split)
    names = fn.names
    params = split.edge_factor_params()
    fs = [params[k].detach().clone() for k in names]
    ids, mask, gh = _example_inputs(split, *trace_shape)
    n = len(names)
    argn = [f"f{i}" for i in range(n)]
    bdim, sdim = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=8192)
    tok_dyn = {0: bdim, 1: sdim}
    table = _decompositions()
    models: dict[str, onnx.ModelProto] = {}
    times: dict[str, float] = {}

    def timed(label, thunk):
        t0 = time.perf_counter()
        r = thunk()
        times[label] = round(time.perf_counter() - t0, 2)
        log.info("export %s: %.1f s", label, times[label])
        return r

    if "recompute" in modes:

        def fwd():
            gm = make_fx(fn, decomposition_table=table, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
                fs, ids, mask
            )
            dyn = {"input_ids": tok_dyn, "attention_mask": tok_dyn, **{a: None for a in argn}}
            return _to_onnx(
                lambda input_ids, attention_mask, *f: gm(list(f), input_ids, attention_mask),
                ["input_ids", "attention_mask", *argn],
                ["input_ids", "attention_mask", *names],
                ["h"],
                [ids, mask, *fs],
                dyn,
            )

        def vjp():
            gm = make_fx(
                lambda fs, ids, mask, gh: fn.vjp(fs, ids, mask, gh),
                decomposition_table=table,
                tracing_mode="symbolic",
                _allow_non_fake_inputs=True,
            )(fs, ids, mask, gh)
            dyn = {
                "input_ids": tok_dyn,
                "attention_mask": tok_dyn,
                **{a: None for a in argn},
                "grad_h": {0: bdim, 1: sdim},
            }
            return _to_onnx(
                lambda input_ids, attention_mask, *rest: tuple(
                    gm(list(rest[:-1]), input_ids, attention_mask, rest[-1])
                ),
                ["input_ids", "attention_mask", *argn, "grad_h"],
                ["input_ids", "attention_mask", *names, "grad_h"],
                [grad_name(k) for k in names],
                [ids, mask, *fs, gh],
                dyn,
            )

        models["forward.onnx"] = timed("forward.onnx", fwd)
        models["vjp.onnx"] = timed("vjp.onnx", vjp)

    saved_names: list[str] = []
    if "saved" in modes:
        fw, bw = timed("partition", lambda: _trace_saved(fn, fs, ids, mask, gh))
        fw_call, bw_call, saved_raw, saved_dyn = _saved_callables(fn, fw, bw, n)
        saved_names = [f"saved.{i}" for i in range(len(saved_raw))]
        with torch.no_grad():
            fw_example = fw_call(*fs, ids, mask)
        saved_example = list(fw_example[1:])

        def fwd_saved():
            dyn = {"input_ids": tok_dyn, "attention_mask": tok_dyn, **{a: None for a in argn}}
            return _to_onnx(
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
                a: ({**{i: bdim for i in range(pa)}, **{pa + j: sdim for j in range(pc)}} or None)
                for a, (pa, pc, _k) in zip(sargs, saved_dyn)
            }
            dyn["grad_h"] = {0: bdim, 1: sdim}
            return _to_onnx(
                lambda *a: bw_call(*a),
                [*sargs, "grad_h"],
                [*saved_names, "grad_h"],
                [grad_name(k) for k in names],
                [*saved_example, gh],
                dyn,
            )

        models["forward_saved.onnx"] = timed("forward_saved.onnx", fwd_saved)
        models["backward_saved.onnx"] = timed("backward_saved.onnx", bwd_saved)
        n_peeled = _peel_output_reshapes(models["forward_saved.onnx"], models["backward_saved.onnx"])
        log.info("saved activations handed over unreshaped: %d of %d", n_peeled, len(saved_names))

    t0 = time.perf_counter()
    wbytes, wsha, init_table, graph_inits = _externalize(models, out)
    base_weights = _base_weights(split, init_table)
    times["write"] = round(time.perf_counter() - t0, 2)
    factors = split.edge_factors()
    np.savez(out / FACTORS_FILE, **factors)
    tok_files = []
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / f
            if src.is_file():
                shutil.copy2(src, out / f)
                tok_files.append(f)
    cfg = split.peft_model.base_model.model.config
    return BundleManifest(
        format=FORMAT,
        model_id=model_id or getattr(cfg, "_name_or_path", "") or f"tiny-{split.family}",
        family=split.family,
        task=split.task,
        cut=split.cut,
        n_blocks=split.n_blocks,
        hidden_size=int(cfg.hidden_size),
        lora=LoraInfo(**(split.lora.to_dict() | {"targets": split.lora.targets or _default_targets(split.family)})),
        factors=[FactorSpec(k, tuple(factors[k].shape), "float32") for k in names],
        factors_file=FACTORS_FILE,
        weights_file=WEIGHTS_FILE,
        weights_bytes=wbytes,
        weights_sha256=wsha,
        initializers={
            k: InitializerEntry(e["offset"], e["length"], tuple(e["shape"]), e["dtype"]) for k, e in init_table.items()
        },
        graph_initializers=graph_inits,
        base_weights={m: [BaseWeightPlace(**p) for p in places] for m, places in base_weights.items()},
        opset=OPSET,
        modes=list(modes),
        graphs={m: GRAPHS[m] for m in modes},
        inputs=["input_ids", "attention_mask"],
        output="h",
        grad_outputs={k: grad_name(k) for k in names},
        saved_names=saved_names,
        tokenizer_files=tok_files,
        export_seconds=times,
    )


def _base_weights(split: SplitModel, table: dict) -> dict[str, list[dict]]:
    """module -> where its frozen weight lives in weights.bin ([{"initializer", "transposed"}], torch layout).

    Found by content (initializer names are content digests), so an edge can fold base-weight deltas
    (FedEx-LoRA, FLoRA) into exactly these initializers without a new export.
    """
    modules = dict(split.peft_model.named_modules())
    out = {}
    for key in split.edge_factor_names():
        if not key.endswith(".lora_A.weight"):
            continue
        m = key[: -len(".lora_A.weight")]
        w = modules[m].base_layer.weight.detach().to(torch.float32).numpy()
        hits = []
        for arr, transposed in ((np.ascontiguousarray(w), False), (np.ascontiguousarray(w.T), True)):
            digest = hashlib.sha256(
                arr.tobytes() + str(onnx.TensorProto.FLOAT).encode() + str(list(arr.shape)).encode()
            ).hexdigest()
            name = f"w_{digest[:16]}"
            if name in table:
                hits.append({"initializer": name, "transposed": transposed})
        out[m] = hits
    return out


def _default_targets(family):
    from splitwave.server.split import DEFAULT_TARGETS

    return list(DEFAULT_TARGETS[family])
