"""Tracing the edge bottom: the pure function h = f(factors, input_ids, attention_mask) and its VJP, traced
with `make_fx` in symbolic mode (batch and sequence stay dynamic) and lowered by the dynamo ONNX exporter.

Its own module because everything torch-specific about getting an ONNX graph out of the split model lives
here; the saved-activation partition (saved.py), the ONNX passes (passes.py) and the bundle files
(writer.py) only see its results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from splitwave.server.split import SplitModel

log = logging.getLogger(__name__)

#: opset 20 has a Gelu operator: the exporter emits one node that ORT runs as one kernel, where opset 18 gets
#: the Div/Erf/Add/Mul/Mul formula (which ORT's Gelu fusion did not match: 5 elementwise passes per GELU)
OPSET = 20


def grad_name(key: str) -> str:
    """ONNX output name of the gradient of factor `key`."""
    return f"grad.{key}"


def decompositions() -> dict:
    table = dict(core_aten_decompositions())

    def empty_permuted(size, physical_layout, **kw):  # the ONNX exporter cannot lower empty_permuted
        return torch.zeros(size, dtype=kw.get("dtype"), device=kw.get("device"))

    table[torch.ops.aten.empty_permuted.default] = empty_permuted
    return table


class EdgeFn:
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


def make_wrapper(call, arg_names: list[str]) -> nn.Module:
    """nn.Module with explicit named forward arguments (torch.export's dynamic_shapes need names)."""
    params = ", ".join(arg_names)
    ns: dict = {}
    exec(f"def forward(self, {params}):\n    return self._call({params})\n", ns)  # noqa: S102
    cls = type("EdgeGraph", (nn.Module,), {"forward": ns["forward"]})
    mod = cls()
    object.__setattr__(mod, "_call", call)
    return mod


def to_onnx(call, arg_names, input_names, output_names, example, dynamic, optimize=False) -> onnx.ModelProto:
    wrapper = make_wrapper(call, arg_names)
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


def example_inputs(split: SplitModel, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    vocab = split.peft_model.base_model.model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    hidden = split.peft_model.base_model.model.config.hidden_size
    gh = torch.randn(batch, seq, hidden, generator=g)
    return ids, mask, gh


@dataclass
class Tracing:
    """What every graph of one export is traced from: the edge function, the factors, example inputs at the
    trace shape, the dynamic batch/seq dims, and the time each step took (manifest "export_seconds")."""

    fn: EdgeFn
    fs: list
    ids: torch.Tensor
    mask: torch.Tensor
    gh: torch.Tensor
    times: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.names = self.fn.names
        self.argn = [f"f{i}" for i in range(len(self.names))]
        self.bdim = torch.export.Dim("batch", min=1, max=4096)
        self.sdim = torch.export.Dim("seq", min=2, max=8192)
        self.tok_dyn = {0: self.bdim, 1: self.sdim}
        self.table = decompositions()

    @classmethod
    def of(cls, split: SplitModel, trace_shape: tuple[int, int]) -> Tracing:
        fn = EdgeFn(split)
        params = split.edge_factor_params()
        fs = [params[k].detach().clone() for k in fn.names]
        ids, mask, gh = example_inputs(split, *trace_shape)
        return cls(fn, fs, ids, mask, gh)

    def timed(self, label, thunk):
        t0 = time.perf_counter()
        r = thunk()
        self.times[label] = round(time.perf_counter() - t0, 2)
        log.info("export %s: %.1f s", label, self.times[label])
        return r


def trace_recompute(t: Tracing) -> dict[str, onnx.ModelProto]:
    """Recompute mode: forward.onnx (h) and vjp.onnx (factor grads; recomputes the forward: low memory)."""
    fn, fs, ids, mask, gh, names, argn, tok_dyn = t.fn, t.fs, t.ids, t.mask, t.gh, t.names, t.argn, t.tok_dyn

    def fwd():
        gm = make_fx(fn, decomposition_table=t.table, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
            fs, ids, mask
        )
        dyn = {"input_ids": tok_dyn, "attention_mask": tok_dyn, **{a: None for a in argn}}
        return to_onnx(
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
            decomposition_table=t.table,
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )(fs, ids, mask, gh)
        dyn = {
            "input_ids": tok_dyn,
            "attention_mask": tok_dyn,
            **{a: None for a in argn},
            "grad_h": {0: t.bdim, 1: t.sdim},
        }
        return to_onnx(
            lambda input_ids, attention_mask, *rest: tuple(gm(list(rest[:-1]), input_ids, attention_mask, rest[-1])),
            ["input_ids", "attention_mask", *argn, "grad_h"],
            ["input_ids", "attention_mask", *names, "grad_h"],
            [grad_name(k) for k in names],
            [ids, mask, *fs, gh],
            dyn,
        )

    models = {"forward.onnx": t.timed("forward.onnx", fwd)}
    models["vjp.onnx"] = t.timed("vjp.onnx", vjp)
    return models
