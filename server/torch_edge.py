"""Reference edge backend running the torch edge module (an `EdgeBackend`, like edge.runtime.EdgeRuntime).

Imports torch: picked by the experiment layer (`splitwave edge --backend torch`), tests and benchmarks, and
handed to the edge client as a factory (`torch_backend`); the torch-free edge never imports it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from splitwave.common.backend import BackendSettings, EdgeBackend
from splitwave.common.factors import load_factors, save_factors
from splitwave.common.manifest import BundleManifest
from splitwave.server.models import build_model, minilm_path
from splitwave.server.split import LoraSpec, SplitModel, split_model


class TorchEdge:
    """forward/backward/step of the edge part in torch eager with torch.optim.AdamW.

    Built from a SplitModel (shares its modules: stepping here changes the split's edge factors), or from
    model args (family_or_path, task, cut, lora) via server.split.
    """

    def __init__(
        self,
        split: SplitModel | None = None,
        *,
        family_or_path: str | None = None,
        task: str = "seq-cls",
        cut: int | None = None,
        lora: LoraSpec | None = None,
        seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        trainable: set[str] | None = None,
        threads: int | None = None,
    ):
        if split is None:
            if family_or_path is None or cut is None:
                raise ValueError("TorchEdge needs a split, or family_or_path and cut to build one")
            split = split_model(build_model(family_or_path, task, seed=seed), cut, lora or LoraSpec(), task)
        if threads:
            torch.set_num_threads(int(threads))
        self.split = split
        self.module = split.edge
        self.factor_names = split.edge_factor_names()
        self._params = split.edge_factor_params()
        for p in split.peft_model.parameters():
            p.requires_grad_(False)
        for p in self._params.values():
            p.requires_grad_(True)
        self.trainable = set(self.factor_names) if trainable is None else set(trainable)
        self.optimizer = torch.optim.AdamW(
            [self._params[k] for k in self.factor_names if k in self.trainable],
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )
        self.manifest: BundleManifest | None = None  # the bundle's, when built by from_bundle
        self._base_original: dict[str, torch.Tensor] = {}  # frozen weights before the first base delta
        self._last: torch.Tensor | None = None

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike[str], **kw: Any) -> TorchEdge:
        """The reference backend for a bundle: rebuild the same model from the bundle's `source` record."""
        m = BundleManifest.from_file(bundle_dir)
        src = m.source
        if src is None:
            raise ValueError("bundle manifest has no 'source' record: cannot rebuild the torch reference edge")
        lora = LoraSpec(
            r=m.lora.r, alpha=m.lora.alpha, targets=m.lora.targets, dropout=m.lora.dropout, rslora=m.lora.rslora
        )
        family = minilm_path() if src.family == "minilm" else src.family
        split = split_model(
            build_model(
                family,
                m.task,
                src.num_labels,
                seed=src.seed,
                vocab_size=src.vocab_size,
                init_std=src.init_std,
            ),
            m.cut,
            lora,
            m.task,
        )
        edge = cls(split, **kw)
        edge.set_factors(load_factors(Path(bundle_dir) / m.factors_file))
        edge.manifest = m
        return edge

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments (a re-initialized adapter starts a new optimization)."""
        self.optimizer.state.clear()

    def optimizer_state(self) -> dict[str, Any]:
        """A snapshot of the AdamW state (state_dict() shares the moment tensors: deep-copied)."""
        return copy.deepcopy(self.optimizer.state_dict())

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Back to a snapshot; load_state_dict keeps the tensors it is given, so it gets a copy."""
        self.optimizer.load_state_dict(copy.deepcopy(dict(state)))

    def set_base_deltas(self, deltas: Mapping[str, np.ndarray]) -> None:
        """Frozen weight of each LoRA module := original + delta (the running sum sent by the server)."""
        modules = dict(self.split.peft_model.named_modules())
        with torch.no_grad():
            for name, delta in deltas.items():
                layer = modules.get(name)
                if layer is None or not hasattr(layer, "base_layer"):
                    raise KeyError(f"base delta for unknown LoRA module {name!r}")
                w = layer.base_layer.weight
                orig = self._base_original.setdefault(name, w.detach().clone())
                if tuple(delta.shape) != tuple(w.shape):
                    raise ValueError(f"base delta {name}: shape {tuple(delta.shape)} != {tuple(w.shape)}")
                w.copy_(orig + torch.from_numpy(np.asarray(delta, dtype=np.float32)))

    @property
    def factors(self) -> dict[str, np.ndarray]:
        return {k: p.detach().numpy().copy() for k, p in self._params.items()}

    def set_factors(self, values: Mapping[str, np.ndarray]) -> None:
        self.split.set_edge_factors(dict(values))

    def save_factors(self, path: str | os.PathLike[str]) -> None:
        save_factors(self.factors, path)

    def load_factors(self, path: str | os.PathLike[str]) -> None:
        self.set_factors(load_factors(path))

    def forward(self, input_ids: ArrayLike, attention_mask: ArrayLike) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
        with torch.enable_grad():
            h = self.module(ids, mask)
        self._last = h
        return h.detach().numpy()

    def backward(self, grad_h: ArrayLike) -> dict[str, np.ndarray]:
        if self._last is None:
            raise RuntimeError("backward() called before forward()")
        params = [self._params[k] for k in self.factor_names]
        grads = torch.autograd.grad(self._last, params, torch.as_tensor(np.asarray(grad_h, dtype=np.float32)))
        self._last = None
        return {k: g.numpy() for k, g in zip(self.factor_names, grads)}

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        for k in self.factor_names:
            p = self._params[k]
            p.grad = torch.as_tensor(grads[k]).clone() if (k in grads and k in self.trainable) else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(
        self, input_ids: ArrayLike, attention_mask: ArrayLike, grad_fn: Callable[[np.ndarray], ArrayLike]
    ) -> dict[str, np.ndarray]:
        h = self.forward(input_ids, attention_mask)
        grads = self.backward(grad_fn(h))
        self.step(grads)
        return grads


def torch_backend(bundle: Path, settings: BackendSettings) -> EdgeBackend:
    """The edge client's `BackendFactory` for `--backend torch`: TorchEdge rebuilt from the bundle.

    settings.mode and settings.threads are ONNX Runtime choices and stay unused (as before: torch keeps its
    own thread count, shared with whatever else runs in the process)."""
    return TorchEdge.from_bundle(
        bundle, lr=settings.lr, weight_decay=settings.weight_decay, betas=settings.betas, eps=settings.eps
    )
