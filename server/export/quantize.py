"""int8 frozen base: an fp32 edge bundle rewritten so that its frozen weights are stored as int8 with one scale
per output channel, and every frozen MatMul/Gemm of every graph (forward AND backward) runs quantized.

Its own module because this is an ONNX-to-ONNX pass on a finished bundle (no tracing): the int8 bundle is
derived from the fp32 one, so both come from the same graphs, and only the frozen weights change.

* A weight W reaches a MatMul/Gemm of the exported graphs through Transpose nodes (the Linear's W.T in the
  forward, W itself in the backward's grad-input product). Those chains are resolved to (W, transposed): the
  Transposes are folded away and each weight is quantized ONCE, symmetric int8 with a scale per output channel
  of its forward use (the axis chosen from the forward graphs), and shared by every graph that uses it.
* Each product becomes an integer GEMM (com.microsoft MatMulIntegerToFloat, VNNI where the CPU has it) with A
  quantized at run time, symmetric, one scale per row (token): max|A[row]| / 127 (`activations="row"`, the
  default; one scale per tensor, DynamicQuantizeMatMul, is `activations="tensor"`: faster but 3x the error on
  real text, since a few tokens carry 5-10x larger activations). Q, K and V read the same A: it is quantized
  once. A product whose N axis is the weight's scale axis takes the scales as its B scales; one whose K axis is
  (the backward's grad_y @ W) folds them into A first: grad_y @ (diag(s) Wq) = (grad_y * s) @ Wq. Where B is
  Wq transposed, ORT folds the Transpose into a constant when the session loads.
* An embedding table read by Gather is gathered as int8 and scaled per row: Cast(Gather(Wq)) * Gather(s).
* LoRA factors are graph inputs, never initializers: their products, and all activation-activation products
  (attention), stay fp32, and so do the gradients. Biases and norms stay fp32 (they are small).

`keep` names weights (by parameter name, fnmatch patterns) that stay fp32: outlier-sensitive products.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from splitwave.common.manifest import MANIFEST_FILE, BundleManifest, InitializerEntry, QuantizationInfo
from splitwave.server.export.writer import externalize

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
QUANT_SCHEMES = ("int8",)
#: how the products quantize their activation input A (recorded in the manifest)
ACTIVATIONS = {
    "row": "dynamic symmetric 8-bit, one scale per row (token)",
    "tensor": "dynamic asymmetric uint8, one scale per tensor (DynamicQuantizeMatMul)",
}
WEIGHTS = "symmetric int8, one scale per output channel"


@dataclass(frozen=True)
class _Use:
    """One product of a frozen weight: node.input[1] is W (transposed=False) or W.T (True)."""

    node: onnx.NodeProto
    weight: str
    transposed: bool


def quantize_rows(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis` (2-D w): w ~= q * scale (scale broadcast on axis)."""
    amax = np.abs(w).max(axis=1 - axis)
    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    s = scale[:, None] if axis == 0 else scale[None, :]
    q = np.clip(np.rint(w / s), -127, 127).astype(np.int8)
    return q, scale


def _is_transpose_2d(node: onnx.NodeProto) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm in (None, [1, 0])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _resolve(name: str, producer: dict, frozen: set[str]) -> tuple[str, bool] | None:
    """(weight, transposed) when `name` is a frozen 2-D weight seen through Transpose/Identity nodes."""
    transposed = False
    while name not in frozen:
        node = producer.get(name)
        if node is None:
            return None
        if _is_transpose_2d(node):
            transposed = not transposed
        elif node.op_type != "Identity":
            return None
        name = node.input[0]
    return name, transposed


def _uses(model: onnx.ModelProto, frozen: set[str]) -> tuple[list[_Use], list[onnx.NodeProto], set[str]]:
    """The quantizable products and embedding Gathers of frozen weights, and the weights used some other way."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    products, gathers, other = [], [], set()
    claimed: set[int] = set()
    for node in g.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2:
            r = _resolve(node.input[1], producer, frozen)
            a = _attrs(node)
            plain_gemm = node.op_type == "MatMul" or (
                a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)
            )
            if r is not None and plain_gemm:
                w, transposed = r
                products.append(_Use(node, w, transposed ^ bool(a.get("transB", 0))))
                claimed.add(id(node))
        elif node.op_type == "Gather" and node.input[0] in frozen and _attrs(node).get("axis", 0) == 0:
            gathers.append(node)
            claimed.add(id(node))
    # a frozen weight also read by anything else (not through a resolved Transpose chain) keeps its fp32 copy
    chain_nodes = set()
    for u in products:
        name = u.node.input[1]
        while name not in frozen:
            n = producer[name]
            chain_nodes.add(id(n))
            name = n.input[0]
    for node in g.node:
        if id(node) in claimed or id(node) in chain_nodes:
            continue
        other.update(i for i in node.input if i in frozen)
    return products, gathers, other


def weight_axis(uses: Iterable[_Use], weight: str) -> int | None:
    """The output-channel axis of `weight` in its products (the first one found): 0 for W.T (a Linear), 1 for W."""
    for u in uses:
        if u.weight == weight:
            return 0 if u.transposed else 1
    return None


class _Rewriter:
    """Rewrites one graph's frozen products and gathers onto the shared int8 weights.

    activations "row": A is quantized with one scale per row (token), symmetric; "tensor": one per tensor.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        quant: Mapping[str, tuple[str, str, int]],
        shapes: Mapping[str, tuple[int, ...]],
        activations: str,
    ):
        self.model, self.g, self.quant, self.shapes, self.activations = model, model.graph, quant, shapes, activations
        self.new_inits: dict[str, onnx.TensorProto] = {}
        self.count = 0
        self.rank = _ranks(model)
        self.quantized_a: dict[tuple[str, str], tuple[str, str]] = {}  # (A, K-scales) -> (A as uint8, row scales)

    def name(self, base: str) -> str:
        self.count += 1
        return f"q8.{self.count}.{base}"

    def const(self, name: str, value: np.ndarray) -> str:
        """A small constant shared by every rewritten product of the graph."""
        if name not in self.new_inits:
            self.new_inits[name] = numpy_helper.from_array(value, name)
        return name

    def product(self, u: _Use) -> list[onnx.NodeProto]:
        q, s, axis = self.quant[u.weight]
        node = u.node
        a_in, out = node.input[0], node.output[0]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else ""
        nodes = []
        b = q
        if u.transposed:  # a Transpose of an initializer: ORT folds it into a constant when the session loads
            b = self.name("wT")
            nodes.append(helper.make_node("Transpose", [q], [b], perm=[1, 0]))
        n_axis = 0 if u.transposed else 1  # the axis of the stored weight that is N of this product
        one = self.const("q8.one", np.array(1.0, dtype=np.float32))
        fold = axis != n_axis  # the weight's scales run along K: they multiply A's columns instead
        b_scale = one if fold else s
        if self.activations == "tensor":
            if fold:
                scaled = self.name("a")
                nodes.append(helper.make_node("Mul", [a_in, s], [scaled]))
                a_in = scaled
            inputs = [a_in, b, b_scale, "", bias] if bias else [a_in, b, b_scale]
            nodes.append(helper.make_node("DynamicQuantizeMatMul", inputs, [out], domain=MS_DOMAIN))
            return nodes
        flat = self.rank.get(a_in) != 2
        key = (a_in, s if fold else "")
        if key not in self.quantized_a:  # Q, K and V read the same A: quantized once
            nodes += self.quantize_rows(u, a_in, s if fold else "", flat)
        a_q, sa2 = self.quantized_a[key]
        zp = self.const("q8.zp", np.array(128, dtype=np.uint8))
        y0 = self.name("y0")
        # a_scale [M, 1]: ORT broadcasts it per row (it would scale a fused bias too: the bias is added after)
        nodes.append(helper.make_node("MatMulIntegerToFloat", [a_q, b, sa2, b_scale, zp], [y0], domain=MS_DOMAIN))
        y = y0
        if bias:
            y = self.name("y1") if flat else out
            nodes.append(helper.make_node("Add", [y0, bias], [y]))
        if flat:  # back to A's leading dims
            lead, shape_out = self.name("lead"), self.name("shape")
            n = self.const(f"q8.n.{self.n_of(u)}", np.array([self.n_of(u)], np.int64))
            nodes += [
                helper.make_node("Shape", [node.input[0]], [lead], start=0, end=-1),
                helper.make_node("Concat", [lead, n], [shape_out], axis=0),
                helper.make_node("Reshape", [y, shape_out], [out]),
            ]
        else:
            nodes[-1].output[0] = out
        return nodes

    def quantize_rows(self, u: _Use, a_in: str, fold: str, flat: bool) -> list[onnx.NodeProto]:
        """A (times the weight's K-axis scales `fold`, if any) as uint8 with one symmetric scale per row:
        sa = max|A[row]| / 127, A / sa rounded around 128 by one QuantizeLinear along axis 0 (A made 2-D)."""
        key = (a_in, fold)
        nodes = []
        if flat:  # [..., K] -> [M, K]; the product is reshaped back
            a2, k = self.name("a2d"), self.k_of(u)
            shape = self.const(f"q8.shape.{k}", np.array([-1, k], np.int64))
            nodes.append(helper.make_node("Reshape", [a_in, shape], [a2]))
            a_in = a2
        if fold:
            scaled = self.name("a")
            nodes.append(helper.make_node("Mul", [a_in, fold], [scaled]))
            a_in = scaled
        mx, mn, nmn, amax, sa, shp, zpv, a_q, sa2 = (
            self.name(x) for x in ("max", "min", "negmin", "amax", "sa", "shape", "zp", "aq", "sa2")
        )
        last = self.const("q8.last", np.array([-1], np.int64))
        nodes += [
            helper.make_node("ReduceMax", [a_in, last], [mx], keepdims=0),
            helper.make_node("ReduceMin", [a_in, last], [mn], keepdims=0),
            helper.make_node("Neg", [mn], [nmn]),
            helper.make_node("Max", [mx, nmn, self.const("q8.tiny", np.array(1e-30, np.float32))], [amax]),
            helper.make_node("Mul", [amax, self.const("q8.inv127", np.array(1 / 127, np.float32))], [sa]),
            helper.make_node("Shape", [sa], [shp]),
            helper.make_node(
                "ConstantOfShape", [shp], [zpv], value=helper.make_tensor("zp", onnx.TensorProto.UINT8, [1], [128])
            ),
            helper.make_node("QuantizeLinear", [a_in, sa, zpv], [a_q], axis=0),
            helper.make_node("Unsqueeze", [sa, self.const("q8.axis1", np.array([1], np.int64))], [sa2]),
        ]
        self.quantized_a[key] = (a_q, sa2)
        return nodes

    def k_of(self, u: _Use) -> int:
        rows, cols = self.shapes[u.weight]
        return cols if u.transposed else rows

    def n_of(self, u: _Use) -> int:
        rows, cols = self.shapes[u.weight]
        return rows if u.transposed else cols

    def gather(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        q, s, axis = self.quant[node.input[0]]
        rows, cast, scale = self.name("rows"), self.name("cast"), self.name("scale")
        nodes = [
            helper.make_node("Gather", [q, node.input[1]], [rows], axis=0),
            helper.make_node("Cast", [rows], [cast], to=onnx.TensorProto.FLOAT),
        ]
        if axis == 0:  # a scale per row: gather the rows' scales too, as [..., 1]
            col = s + ".col"
            nodes.append(helper.make_node("Gather", [col, node.input[1]], [scale], axis=0))
            nodes.append(helper.make_node("Mul", [cast, scale], [node.output[0]]))
        else:
            nodes.append(helper.make_node("Mul", [cast, s], [node.output[0]]))
        return nodes

    def run(self, products: list[_Use], gathers: list[onnx.NodeProto]) -> None:
        replace_at = {id(u.node): self.product(u) for u in products if u.weight in self.quant}
        replace_at.update({id(n): self.gather(n) for n in gathers if n.input[0] in self.quant})
        nodes = []
        for n in self.g.node:
            nodes.extend(replace_at.get(id(n), [n]))
        del self.g.node[:]
        self.g.node.extend(nodes)
        if replace_at and not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor ONNX shape inference can tell (the exporter's graphs carry symbolic shapes)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def _prune(g: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (the folded Transposes, the fp32 Gathers) and unused initializers."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    used = {i for n in g.node for i in n.input} | outputs
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    vi = [v for v in g.value_info if v.name in used or v.name in {o for n in g.node for o in n.output}]
    del g.value_info[:]
    g.value_info.extend(vi)


def weight_names(params: Mapping[str, np.ndarray], manifest: BundleManifest) -> dict[str, str]:
    """{initializer of the bundle: parameter name}, matched by content in either layout (as base_weights is).

    `params`: the edge's frozen parameters as fp32 arrays (e.g. from the torch split); names make `keep`
    patterns and the manifest's record readable.
    """
    out = {}
    for pname, w in params.items():
        w = np.asarray(w, dtype=np.float32)
        for arr in (w, w.T) if w.ndim == 2 else (w,):
            arr = np.ascontiguousarray(arr)
            digest = hashlib.sha256(
                arr.tobytes() + str(onnx.TensorProto.FLOAT).encode() + str(list(arr.shape)).encode()
            ).hexdigest()
            name = f"w_{digest[:16]}"
            if name in manifest.initializers:
                out.setdefault(name, pname)
    return out


def quantize_bundle(
    src: str | Path,
    out: str | Path,
    scheme: str = "int8",
    keep: Iterable[str] = (),
    names: Mapping[str, str] | None = None,
    activations: str = "row",
) -> BundleManifest:
    """Write the int8 version of the fp32 bundle `src` into `out`; returns its manifest (also manifest.json).

    keep: fnmatch patterns of parameter names (via `names`) or initializer names whose weights stay fp32.
    """
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"scheme must be one of {QUANT_SCHEMES}, got {scheme!r}")
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    man = BundleManifest.from_file(src)
    if man.quantization is not None:
        raise ValueError(f"{src} is already quantized ({man.quantization.scheme})")
    names = dict(names or {})
    keep = list(keep)
    mm = np.memmap(src / man.weights_file, dtype=np.uint8, mode="r")

    def array(name: str) -> np.ndarray:
        e = man.initializers[name]
        return np.asarray(mm[e.offset : e.offset + e.length].view(np.dtype(e.dtype)).reshape(e.shape))

    files = [f for mode in man.modes for f in man.graphs[mode]]
    models = {f: onnx.load(str(src / f), load_external_data=False) for f in files}
    frozen = {n for n, e in man.initializers.items() if e.dtype == "float32" and len(e.shape) == 2}
    kept = {
        n for n in frozen if any(fnmatch.fnmatchcase(names.get(n, n), p) or fnmatch.fnmatchcase(n, p) for p in keep)
    }
    found = {f: _uses(m, frozen - kept) for f, m in models.items()}
    fwd_files = [man.graphs[mode][0] for mode in man.modes]
    ordered = [u for f in [*fwd_files, *files] for u in found[f][0]]
    quant: dict[str, tuple[str, str, int]] = {}
    q_inits: dict[str, list[onnx.TensorProto]] = {}
    wanted = {u.weight for f in files for u in found[f][0]} | {n.input[0] for f in files for n in found[f][1]}
    for w in sorted(wanted):
        axis = weight_axis(ordered, w)
        axis = 0 if axis is None else axis  # gathered only: a scale per row
        q, s = quantize_rows(array(w), axis)
        qn, sn = f"{w}.int8", f"{w}.scale"
        inits = [numpy_helper.from_array(q, qn), numpy_helper.from_array(s, sn)]
        if axis == 0:
            inits.append(numpy_helper.from_array(s[:, None].copy(), sn + ".col"))
        quant[w] = (qn, sn, axis)
        q_inits[w] = inits
    for f, model in models.items():
        products, gathers, other = found[f]
        rw = _Rewriter(model, quant, {w: man.initializers[w].shape for w in quant}, activations)
        rw.run(products, gathers)
        g = model.graph
        inlined = []
        for t in g.initializer:  # bring the fp32 weights back inline (externalize writes the new weights.bin)
            if t.data_location == onnx.TensorProto.EXTERNAL:
                inlined.append(numpy_helper.from_array(array(t.name), t.name))
            else:
                inlined.append(t)
        del g.initializer[:]
        g.initializer.extend(inlined)
        g.initializer.extend(rw.new_inits.values())
        used = {i for n in g.node for i in n.input}
        g.initializer.extend(t for w in quant for t in q_inits[w] if t.name in used)
        _prune(g)
        still = sorted(other & set(quant))
        if still:
            log.warning("%s: %d quantized weights are also read in fp32 elsewhere: %s", f, len(still), still[:3])
    fp32_left = sorted(
        {names.get(t.name, t.name) for m in models.values() for t in m.graph.initializer if t.name in frozen}
    )
    out.mkdir(parents=True, exist_ok=True)
    wbytes, wsha, table, per_graph = externalize(models, out)
    for f in [man.factors_file, *man.tokenizer_files]:
        shutil.copy2(src / f, out / f)
    info = QuantizationInfo(
        scheme=scheme,
        weights=WEIGHTS,
        activations=ACTIVATIONS[activations],
        quantized=sorted(names.get(w, w) for w in quant),
        kept_fp32=fp32_left,
        fp32_weights_bytes=man.weights_bytes,
    )
    new = replace(
        man,
        weights_bytes=wbytes,
        weights_sha256=wsha,
        initializers={
            k: InitializerEntry(e["offset"], e["length"], tuple(e["shape"]), e["dtype"]) for k, e in table.items()
        },
        graph_initializers=per_graph,
        base_weights={},  # int8 weights take no fp32 deltas (FedEx-LoRA/FLoRA need an fp32 bundle)
        export_seconds={**man.export_seconds, "quantize": round(time.perf_counter() - t0, 2)},
        quantization=info,
    )
    new.write(out / MANIFEST_FILE)
    log.info(
        "int8 bundle %s: weights %d -> %d bytes (%.2fx), %d weights quantized, %d kept fp32",
        out,
        man.weights_bytes,
        wbytes,
        wbytes / max(man.weights_bytes, 1),
        len(quant),
        len(fp32_left),
    )
    return new
