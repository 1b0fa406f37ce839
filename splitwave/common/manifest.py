"""The edge bundle's manifest (manifest.json) as one typed, validated record.

The exporter writes it, the server serves it (and sends it in every JoinReply), edges read it from disk and from
the wire: a manifest is input from elsewhere, so `from_dict` checks every key it reads and fails with the key
and where the manifest came from. `to_dict` gives back the same keys in the same order, so manifest.json keeps
its bytes (bundles are cached by content) and keys a newer exporter adds survive a read-modify-write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

FORMAT = "splitwave-edge-bundle/1"
MANIFEST_FILE = "manifest.json"


class ManifestError(ValueError):
    """A bundle manifest this code cannot use; the message names where it came from and the bad key."""


class _Obj:
    """Typed reads from one JSON object of a manifest; a failure names the key's path and the manifest's origin."""

    def __init__(self, value: object, path: str, origin: str):
        if not isinstance(value, dict):
            raise ManifestError(f"{origin}: {path or 'the manifest'} must be a JSON object, got {_show(value)}")
        self.d: dict[str, Any] = value
        self.path, self.origin = path, origin

    def __contains__(self, key: str) -> bool:
        return key in self.d

    def keys(self) -> Iterator[str]:
        return iter(self.d)

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, want: str) -> NoReturn:
        raise ManifestError(f"{self.origin}: {self.where(key)!r} must be {want}, got {_show(self.d[key])}")

    def get(self, key: str) -> Any:
        if key not in self.d:
            raise ManifestError(f"{self.origin}: key {self.where(key)!r} is missing")
        return self.d[key]

    def obj(self, key: str) -> _Obj:
        return _Obj(self.get(key), self.where(key), self.origin)

    def objs(self, key: str) -> list[_Obj]:
        v = self.get(key)
        if not isinstance(v, list):
            self.fail(key, "a list")
        return [_Obj(x, f"{self.where(key)}[{i}]", self.origin) for i, x in enumerate(v)]

    def integer(self, key: str) -> int:
        v = self.get(key)
        if not _is_int(v):
            self.fail(key, "an integer")
        return int(v)

    def opt_integer(self, key: str) -> int | None:
        return None if self.get(key) is None else self.integer(key)

    def number(self, key: str) -> float:
        v = self.get(key)
        if not (_is_int(v) or isinstance(v, float)):
            self.fail(key, "a number")
        return v  # as written (an int stays an int): the manifest is written back byte for byte

    def opt_number(self, key: str) -> float | None:
        return None if self.get(key) is None else self.number(key)

    def text(self, key: str) -> str:
        v = self.get(key)
        if not isinstance(v, str):
            self.fail(key, "a string")
        return v

    def flag(self, key: str) -> bool:
        v = self.get(key)
        if not isinstance(v, bool):
            self.fail(key, "true or false")
        return v

    def texts(self, key: str) -> list[str]:
        v = self.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.fail(key, "a list of strings")
        return list(v)

    def shape(self, key: str) -> tuple[int, ...]:
        v = self.get(key)
        if not isinstance(v, list) or not all(_is_int(x) and x >= 0 for x in v):
            self.fail(key, "a list of sizes (integers >= 0)")
        return tuple(int(x) for x in v)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


@dataclass(frozen=True)
class FactorSpec:
    """One LoRA factor the edge graphs take as an input (and the edge trains)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def _read(cls, o: _Obj) -> FactorSpec:
        return cls(name=o.text("name"), shape=o.shape("shape"), dtype=o.text("dtype"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class LoraInfo:
    """The LoRA hyper-parameters the bundle's graphs were exported with (rank r, scaling alpha / r)."""

    r: int
    alpha: float
    targets: list[str] = field(default_factory=list)
    dropout: float = 0.0
    rslora: bool = False

    @classmethod
    def _read(cls, o: _Obj) -> LoraInfo:
        return cls(
            r=o.integer("r"),
            alpha=o.number("alpha"),
            targets=o.texts("targets") if "targets" in o else [],
            dropout=o.number("dropout") if "dropout" in o else 0.0,
            rslora=o.flag("rslora") if "rslora" in o else False,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "dropout": self.dropout,
            "rslora": self.rslora,
        }


@dataclass(frozen=True)
class InitializerEntry:
    """Where one frozen weight lies in the weights file (the runtime maps it once for every session)."""

    offset: int
    length: int
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def _read(cls, o: _Obj) -> InitializerEntry:
        return cls(
            offset=o.integer("offset"), length=o.integer("length"), shape=o.shape("shape"), dtype=o.text("dtype")
        )

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class BaseWeightPlace:
    """An initializer holding a LoRA module's frozen weight (transposed: stored as W.T), for base deltas."""

    initializer: str
    transposed: bool

    @classmethod
    def _read(cls, o: _Obj) -> BaseWeightPlace:
        return cls(initializer=o.text("initializer"), transposed=o.flag("transposed"))

    def to_dict(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "transposed": self.transposed}


@dataclass(frozen=True)
class BundleSource:
    """What built the model (the server adds it): enough for the torch reference backend to rebuild it."""

    family: str
    tiny: bool
    num_labels: int
    seed: int
    vocab_size: int | None = None
    init_std: float | None = None
    tie_embeddings: bool | None = None  # tiny causal LMs: embedding and LM head one matrix (None: the family's)

    @classmethod
    def _read(cls, o: _Obj) -> BundleSource:
        return cls(
            family=o.text("family"),
            tiny=o.flag("tiny"),
            num_labels=o.integer("num_labels"),
            seed=o.integer("seed"),
            vocab_size=o.opt_integer("vocab_size") if "vocab_size" in o else None,
            init_std=o.opt_number("init_std") if "init_std" in o else None,
            tie_embeddings=o.flag("tie_embeddings")
            if "tie_embeddings" in o and o.get("tie_embeddings") is not None
            else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "tiny": self.tiny,
            "num_labels": self.num_labels,
            "seed": self.seed,
            "vocab_size": self.vocab_size,
            "init_std": self.init_std,
            **({"tie_embeddings": self.tie_embeddings} if self.tie_embeddings is not None else {}),
        }


@dataclass(frozen=True)
class QuantizationInfo:
    """How an int8 bundle's frozen weights are stored (server/export/quantize.py); absent: all fp32.

    LoRA factors, their gradients, biases and norms are fp32 in every bundle; `kept_fp32` names the 2-D frozen
    weights left in fp32 (outlier-sensitive products, or weights no quantized op reads).
    """

    scheme: str  # "int8"
    weights: str  # e.g. "symmetric int8, one scale per output channel"
    activations: str  # what the quantized products do with their activation input
    quantized: list[str] = field(default_factory=list)
    kept_fp32: list[str] = field(default_factory=list)
    fp32_weights_bytes: int = 0  # weights.bin of the fp32 bundle it was made from

    @classmethod
    def _read(cls, o: _Obj) -> QuantizationInfo:
        return cls(
            scheme=o.text("scheme"),
            weights=o.text("weights"),
            activations=o.text("activations"),
            quantized=o.texts("quantized"),
            kept_fp32=o.texts("kept_fp32"),
            fp32_weights_bytes=o.integer("fp32_weights_bytes"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "weights": self.weights,
            "activations": self.activations,
            "quantized": list(self.quantized),
            "kept_fp32": list(self.kept_fp32),
            "fp32_weights_bytes": self.fp32_weights_bytes,
        }


# manifest.json's keys in the order the exporter writes them (to_dict keeps it); "source" is the server's
_KEYS = (
    "format",
    "model_id",
    "family",
    "task",
    "cut",
    "n_blocks",
    "hidden_size",
    "lora",
    "factors",
    "factors_file",
    "weights_file",
    "weights_bytes",
    "weights_sha256",
    "initializers",
    "graph_initializers",
    "base_weights",
    "opset",
    "modes",
    "graphs",
    "inputs",
    "output",
    "grad_outputs",
    "saved_names",
    "tokenizer_files",
    "export_seconds",
    "quantization",
    "source",
)


@dataclass(frozen=True, kw_only=True)
class BundleManifest:
    """manifest.json of an edge bundle: the graphs per training mode, the factors, the weights file and its hash.

    Optional keys are the ones older bundles lack (shared initializers, base-weight places) or that only some
    bundles have (tokenizer files, the server's `source` record). `extra` keeps keys this code does not know.
    """

    format: str = FORMAT
    model_id: str
    family: str
    task: str
    cut: int
    n_blocks: int
    hidden_size: int
    lora: LoraInfo
    factors: list[FactorSpec]
    factors_file: str
    weights_file: str
    weights_bytes: int
    weights_sha256: str
    initializers: dict[str, InitializerEntry] = field(default_factory=dict)
    graph_initializers: dict[str, list[str]] = field(default_factory=dict)
    base_weights: dict[str, list[BaseWeightPlace]] = field(default_factory=dict)
    opset: int
    modes: list[str]
    graphs: dict[str, tuple[str, str]]  # mode -> (forward graph file, backward graph file)
    inputs: list[str]
    output: str
    grad_outputs: dict[str, str]  # factor name -> the backward graph's output of its gradient
    saved_names: list[str] = field(default_factory=list)
    tokenizer_files: list[str] = field(default_factory=list)
    export_seconds: dict[str, float] = field(default_factory=dict)
    quantization: QuantizationInfo | None = None  # None: fp32 frozen weights
    source: BundleSource | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def factor_names(self) -> list[str]:
        return [f.name for f in self.factors]

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f.name: f.shape for f in self.factors}

    # -- reading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: object, origin: str = "bundle manifest") -> BundleManifest:
        """Validate and type a parsed manifest; `origin` (a file, a peer) goes into every error message."""
        o = _Obj(data, "", origin)
        fmt = o.text("format")
        if fmt != FORMAT:
            raise ManifestError(f"{origin}: format {fmt!r} is not {FORMAT!r} (a bundle of another SplitWave version)")

        def table(key: str) -> _Obj:
            return o.obj(key) if key in o else _Obj({}, key, origin)

        inits = table("initializers")
        per_graph = table("graph_initializers")
        bases = table("base_weights")
        graphs_obj, grads_obj, times = o.obj("graphs"), o.obj("grad_outputs"), table("export_seconds")
        graphs: dict[str, tuple[str, str]] = {}
        for mode in graphs_obj.keys():
            files = graphs_obj.texts(mode)
            if len(files) != 2:
                graphs_obj.fail(mode, "[forward graph file, backward graph file]")
            graphs[mode] = (files[0], files[1])
        m = cls(
            format=fmt,
            model_id=o.text("model_id"),
            family=o.text("family"),
            task=o.text("task"),
            cut=o.integer("cut"),
            n_blocks=o.integer("n_blocks"),
            hidden_size=o.integer("hidden_size"),
            lora=LoraInfo._read(o.obj("lora")),
            factors=[FactorSpec._read(f) for f in o.objs("factors")],
            factors_file=o.text("factors_file"),
            weights_file=o.text("weights_file"),
            weights_bytes=o.integer("weights_bytes"),
            weights_sha256=o.text("weights_sha256"),
            initializers={k: InitializerEntry._read(inits.obj(k)) for k in inits.keys()},
            graph_initializers={k: per_graph.texts(k) for k in per_graph.keys()},
            base_weights={k: [BaseWeightPlace._read(p) for p in bases.objs(k)] for k in bases.keys()},
            opset=o.integer("opset"),
            modes=o.texts("modes"),
            graphs=graphs,
            inputs=o.texts("inputs"),
            output=o.text("output"),
            grad_outputs={k: grads_obj.text(k) for k in grads_obj.keys()},
            saved_names=o.texts("saved_names") if "saved_names" in o else [],
            tokenizer_files=o.texts("tokenizer_files") if "tokenizer_files" in o else [],
            export_seconds={k: times.number(k) for k in times.keys()},
            quantization=QuantizationInfo._read(o.obj("quantization")) if "quantization" in o else None,
            source=BundleSource._read(o.obj("source")) if "source" in o else None,
            extra={k: v for k, v in o.d.items() if k not in _KEYS},
        )
        m._check(origin)
        return m

    def _check(self, origin: str) -> None:
        """What the keys must agree on (a runtime would otherwise fail later with a bare KeyError)."""
        names = self.factor_names
        if len(set(names)) != len(names):
            raise ManifestError(f"{origin}: 'factors' names a factor twice")
        for mode in self.modes:
            if mode not in self.graphs:
                raise ManifestError(f"{origin}: mode {mode!r} is listed in 'modes' but has no entry in 'graphs'")
        for name in names:
            if name not in self.grad_outputs:
                raise ManifestError(f"{origin}: 'grad_outputs' lacks the factor {name!r}")
        for graph, inits in self.graph_initializers.items():
            for init in inits:
                if init not in self.initializers:
                    raise ManifestError(
                        f"{origin}: 'graph_initializers.{graph}' names {init!r}, which 'initializers' lacks"
                    )

    @classmethod
    def from_json(cls, text: str | bytes, origin: str = "bundle manifest") -> BundleManifest:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"{origin}: not valid JSON ({e})") from None
        return cls.from_dict(data, origin)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BundleManifest:
        """manifest.json at `path` (or in the bundle folder `path`)."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_FILE
        try:
            text = p.read_text()
        except OSError as e:
            raise ManifestError(f"cannot read the bundle manifest {p}: {e.strerror or e}") from None
        return cls.from_json(text, f"bundle manifest {p}")

    # -- writing -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON object of manifest.json: the same keys, in the exporter's order, then any unknown ones."""
        d: dict[str, Any] = {
            "format": self.format,
            "model_id": self.model_id,
            "family": self.family,
            "task": self.task,
            "cut": self.cut,
            "n_blocks": self.n_blocks,
            "hidden_size": self.hidden_size,
            "lora": self.lora.to_dict(),
            "factors": [f.to_dict() for f in self.factors],
            "factors_file": self.factors_file,
            "weights_file": self.weights_file,
            "weights_bytes": self.weights_bytes,
            "weights_sha256": self.weights_sha256,
            "initializers": {k: e.to_dict() for k, e in self.initializers.items()},
            "graph_initializers": {k: list(v) for k, v in self.graph_initializers.items()},
            "base_weights": {k: [p.to_dict() for p in v] for k, v in self.base_weights.items()},
            "opset": self.opset,
            "modes": list(self.modes),
            "graphs": {k: list(v) for k, v in self.graphs.items()},
            "inputs": list(self.inputs),
            "output": self.output,
            "grad_outputs": dict(self.grad_outputs),
            "saved_names": list(self.saved_names),
            "tokenizer_files": list(self.tokenizer_files),
            "export_seconds": dict(self.export_seconds),
        }
        if self.quantization is not None:
            d["quantization"] = self.quantization.to_dict()
        if self.source is not None:
            d["source"] = self.source.to_dict()
        d.update((k, v) for k, v in self.extra.items() if k not in d)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """manifest.json's text (indent 2); indent=None: the compact form sent in a JoinReply."""
        return json.dumps(self.to_dict(), indent=indent)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write manifest.json at `path` (or into the bundle folder `path`); returns the file."""
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_FILE
        p.write_text(self.to_json())
        return p
