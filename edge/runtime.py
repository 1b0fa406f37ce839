"""Torch-free edge training runtime: ONNX Runtime graphs of the edge bundle + numpy AdamW on LoRA factors.

Two modes (see shared/specs/edge_training.md):
* "recompute": forward.onnx gives h; backward runs vjp.onnx, which recomputes the forward inside
  (nothing kept between the two calls but the inputs: lowest memory);
* "saved": forward_saved.onnx also returns the activations the backward needs; backward_saved.onnx
  consumes them (no recompute: fastest full step).
Only numpy and onnxruntime are imported here (a test enforces it).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import ArrayLike

from splitwave.common.backend import BackendSettings
from splitwave.common.factors import load_factors, save_factors
from splitwave.common.manifest import MANIFEST_FILE, BundleManifest
from splitwave.edge.optim import AdamW

log = logging.getLogger(__name__)

MODES = ("recompute", "saved")


class BundleError(RuntimeError):
    """The bundle on disk is incomplete or does not match its manifest."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


_ENV_ARENA = False


def _env_arena() -> None:
    """Register, once per process, the CPU arena that sessions with session.use_env_allocators share."""
    global _ENV_ARENA
    if not _ENV_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # arena_extend_strategy 1 = kSameAsRequested: grow by what a request needs, not in doubling chunks
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        _ENV_ARENA = True


def session_options(
    threads: int | None = None, opt_level: str = "all", spinning: bool = True, low_memory: bool = True
) -> ort.SessionOptions:
    """ORT options for the edge graphs (numbers: MiniLM cut 2, 2 threads, quiet machine).

    spinning=True: intra-op threads busy-wait between the kernels of one run (no wake-up cost per kernel)
    and stop the moment the run returns (`session.force_spinning_stop`). Plain ORT spinning keeps a pool
    spinning after its run, so the forward session's pool steals a core from the backward that runs next and
    from the server or whatever else shares the device (full step, saved / recompute at batch 16 x 64:
    134 -> 90 ms / 170 -> 124 ms with spinning off). Spin-while-running on top of that, batch 16 x 40 saved:
    forward + backward 47 -> 43 ms. spinning=False: workers always sleep between kernels.
    low_memory=True: every session of the process allocates from ONE process-wide CPU arena that grows by
    what is requested, and memory patterns are off. By default each session keeps its own arena, grown in
    doubling chunks and sized for that session's peak (forward + backward arenas retained side by side).
    Measured, recompute / saved: step peak 272 -> 116 MB / 246 -> 131 MB, step time 125 -> 121-127 ms /
    91-94 -> 90 ms. (Arena off with patterns off gave 125 / 148 MB but was 8-10% slower: freed
    activations go back to the OS and fault in again every step.)
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if low_memory:
        _env_arena()
        so.add_session_config_entry("session.use_env_allocators", "1")
        so.enable_mem_pattern = False
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


class _SharedWeights:
    """One read-only mapping of weights.bin whose slices are given to every session as its initializers.

    Left to itself, each ORT session maps the external data on its own, so pages both graphs touch (the
    embedding table, above all) are resident twice (measured: MiniLM cut 2 recompute, peak RSS 314 -> 294 MB).
    Bundles without the manifest's "initializers" table fall back to ORT's own loading.
    """

    def __init__(self, wpath: Path, manifest: BundleManifest):
        self.table = manifest.initializers
        self.per_graph = manifest.graph_initializers
        self.values: dict[str, ort.OrtValue] = {}
        self._arrays: dict[str, np.ndarray] = {}  # the OrtValues borrow these buffers: keep them alive
        if not self.table:
            return
        mm = np.memmap(wpath, dtype=np.uint8, mode="r")
        for name, e in self.table.items():
            off, n = e.offset, e.length
            if off + n > mm.shape[0]:
                raise BundleError(f"initializer {name} lies past the end of {wpath.name}")
            a = mm[off : off + n].view(np.dtype(e.dtype)).reshape(e.shape)
            self._arrays[name] = a
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(a)

    def add_to(
        self, so: ort.SessionOptions, graph_file: str, overrides: Mapping[str, ort.OrtValue] | None = None
    ) -> None:
        for name in self.per_graph.get(graph_file, []):
            so.add_initializer(name, (overrides or {}).get(name, self.values[name]))

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            raise BundleError(f"bundle has no initializer {name!r}")
        return self._arrays[name]


class EdgeRuntime:
    """Forward/backward of the edge bottom with ORT; AdamW step on the LoRA factors in numpy.

    `trainable` (a set of factor names, default all) restricts which factors the optimizer updates, e.g.
    FFA-LoRA freezes every lora_A; backward still returns every gradient. `low_memory` and `spinning` are
    passed to `session_options`.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        mode: str = "recompute",
        threads: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        trainable: set[str] | None = None,
        verify: bool = True,
        opt_level: str = "all",
        spinning: bool = True,
        low_memory: bool = True,
    ):
        self.bundle_dir = Path(bundle_dir)
        mpath = self.bundle_dir / MANIFEST_FILE
        if not mpath.is_file():
            raise BundleError(f"no {MANIFEST_FILE} in {self.bundle_dir}")
        self.manifest = BundleManifest.from_file(mpath)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in self.manifest.modes:
            raise BundleError(f"bundle has modes {self.manifest.modes}, not {mode!r}")
        self.mode = mode
        wpath = self.bundle_dir / self.manifest.weights_file
        if verify:
            if not wpath.is_file():
                raise BundleError(f"missing weights file {wpath}")
            got = sha256_file(wpath)
            if got != self.manifest.weights_sha256:
                raise BundleError(
                    f"weights sha256 mismatch for {wpath}: manifest {self.manifest.weights_sha256}, file {got}"
                )
        self.factor_names = self.manifest.factor_names
        self._shapes = self.manifest.factor_shapes()
        self.factors: dict[str, np.ndarray] = {}
        self.set_factors(load_factors(self.bundle_dir / self.manifest.factors_file))
        self.trainable = set(self.factor_names) if trainable is None else set(trainable)
        unknown = self.trainable - set(self.factor_names)
        if unknown:
            raise KeyError(f"unknown trainable factor names: {sorted(unknown)[:3]}")
        self.optimizer = AdamW(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        low = bool(low_memory)
        self._weights = _SharedWeights(wpath, self.manifest)
        self._session_args = (threads, opt_level, spinning, low)
        self._overrides: dict[str, ort.OrtValue] = {}  # folded base weights (FedEx-LoRA, FLoRA)
        self._override_arrays: list[np.ndarray] = []
        self._build_sessions()
        self._grad_outputs = [self.manifest.grad_outputs[k] for k in self.factor_names]
        self._saved_names = list(self.manifest.saved_names)
        self._last: dict[str, Any] | None = None

    @classmethod
    def from_settings(cls, bundle_dir: str | os.PathLike[str], settings: BackendSettings) -> EdgeRuntime:
        """The backend for a bundle under the run's settings (a `BackendFactory`: the edge client's default)."""
        return cls(
            bundle_dir,
            mode=settings.mode,
            threads=settings.threads,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            betas=settings.betas,
            eps=settings.eps,
        )

    def _build_sessions(self) -> None:
        threads, opt_level, spinning, low = self._session_args
        fwd_file, bwd_file = self.manifest.graphs[self.mode]

        def session(fname: str) -> ort.InferenceSession:
            so = session_options(threads, opt_level, spinning=spinning, low_memory=low)
            self._weights.add_to(so, fname, self._overrides)
            # ORT folds constants from the model's own copy of an initializer, not from the one given with
            # add_initializer (measured: stale transposed weights in the VJP graph); with folded base weights
            # the folding pass must go
            extra = {"disabled_optimizers": ["ConstantFolding"]} if self._overrides else {}
            return ort.InferenceSession(str(self.bundle_dir / fname), so, providers=["CPUExecutionProvider"], **extra)

        self._fwd = session(fwd_file)
        self._bwd = session(bwd_file)

    def set_base_deltas(self, deltas: Mapping[str, np.ndarray]) -> None:
        """Frozen weight of each LoRA module := bundle weight + delta (torch layout; the running sum the server
        sends for FedEx-LoRA/FLoRA). Rebuilds the two sessions with the changed initializers."""
        table = self.manifest.base_weights
        if self.manifest.quantization is not None:
            raise BundleError(
                f"this bundle's frozen weights are {self.manifest.quantization.scheme}: base-weight deltas "
                "(FedEx-LoRA, FLoRA) need an fp32 bundle (edge.quantize: none)"
            )
        if not self._weights.table:
            raise BundleError("this bundle predates shared initializers: re-export it to fold base deltas")
        overrides: dict[str, ort.OrtValue] = {}
        arrays: list[np.ndarray] = []
        for module, delta in deltas.items():
            places = table.get(module)
            if not places:
                raise BundleError(f"bundle does not locate the frozen weight of {module!r}; cannot fold its delta")
            d = np.asarray(delta, dtype=np.float32)
            for e in places:
                base = self._weights.array(e.initializer)
                add = d.T if e.transposed else d
                if add.shape != base.shape:
                    raise ValueError(f"base delta {module}: shape {d.shape} does not fit weight {base.shape}")
                new = np.ascontiguousarray(base + add, dtype=base.dtype)
                arrays.append(new)
                overrides[e.initializer] = ort.OrtValue.ortvalue_from_numpy(new)
        self._overrides, self._override_arrays = overrides, arrays
        self._last = None
        self._build_sessions()

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments (a re-initialized adapter starts a new optimization)."""
        self.optimizer.state = {}

    def optimizer_state(self) -> dict[str, Any]:
        """A snapshot of the AdamW state (AdamW.state_dict copies the moments)."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Back to a snapshot (AdamW.load_state_dict copies it, so the snapshot stays usable)."""
        self.optimizer.load_state_dict(state)

    # ---- factors -------------------------------------------------------------------------------------
    def set_factors(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace some or all factors (copies; shapes checked against the manifest)."""
        for k, v in values.items():
            if k not in self._shapes:
                raise KeyError(f"unknown factor {k!r}")
            a = np.array(v, dtype=np.float32, copy=True, order="C")
            if a.shape != self._shapes[k]:
                raise ValueError(f"{k}: shape {a.shape} != manifest {self._shapes[k]}")
            self.factors[k] = a
        missing = set(self._shapes) - set(self.factors)
        if missing:
            raise KeyError(f"factors missing: {sorted(missing)[:3]}")

    def save_factors(self, path: str | os.PathLike[str]) -> None:
        save_factors(self.factors, path)

    def load_factors(self, path: str | os.PathLike[str]) -> None:
        self.set_factors(load_factors(path))

    # ---- compute -------------------------------------------------------------------------------------
    def _feeds(self, input_ids: ArrayLike, attention_mask: ArrayLike) -> dict[str, np.ndarray]:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal 2-D shapes")
        return {"input_ids": ids, "attention_mask": mask, **self.factors}

    def forward(self, input_ids: ArrayLike, attention_mask: ArrayLike) -> np.ndarray:
        """h for this batch; keeps what backward needs (the inputs, or the saved activations)."""
        feeds = self._feeds(input_ids, attention_mask)
        if self.mode == "recompute":
            (h,) = self._fwd.run(["h"], feeds)
            self._last = {"feeds": feeds}
        else:
            outs = self._fwd.run(["h", *self._saved_names], feeds)
            h = outs[0]
            self._last = {"saved": dict(zip(self._saved_names, outs[1:])), "shape": h.shape}
        return h

    def backward(self, grad_h: ArrayLike) -> dict[str, np.ndarray]:
        """dL/d(factor) for every factor, for the inputs of the last forward."""
        if self._last is None:
            raise RuntimeError("backward() called before forward()")
        gh = np.ascontiguousarray(grad_h, dtype=np.float32)
        if self.mode == "recompute":
            feeds = dict(self._last["feeds"])
            feeds["grad_h"] = gh
        else:
            if gh.shape != tuple(self._last["shape"]):
                raise ValueError(f"grad_h shape {gh.shape} != h shape {self._last['shape']}")
            feeds = dict(self._last["saved"])
            feeds["grad_h"] = gh
        outs = self._bwd.run(self._grad_outputs, feeds)
        self._last = None  # release saved activations
        return dict(zip(self.factor_names, outs))

    def take_pending(self) -> dict | None:
        """What backward() needs of the last forward() (inputs, or saved activations), taken out of the runtime:
        a runtime shared by several clients keeps it per client between their forward and backward."""
        last, self._last = self._last, None
        return last

    def put_pending(self, pending: dict | None) -> None:
        """Give back what `take_pending` took, before that client's backward()."""
        self._last = pending

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """AdamW on the trainable factors (others get no step and no optimizer state)."""
        self.optimizer.step(self.factors, {k: g for k, g in grads.items() if k in self.trainable})

    def train_step(
        self, input_ids: ArrayLike, attention_mask: ArrayLike, grad_fn: Callable[[np.ndarray], ArrayLike]
    ) -> dict[str, np.ndarray]:
        """forward -> grad_fn(h) (e.g. the server round trip) -> backward -> step; returns the grads."""
        h = self.forward(input_ids, attention_mask)
        grads = self.backward(grad_fn(h))
        self.step(grads)
        return grads
