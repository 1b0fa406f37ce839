"""Reference edge backend running the torch edge module (same interface as edge.runtime.EdgeRuntime).

Imports torch: only imported explicitly (tests, benchmarks, a server-side simulated edge), never by `edge`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from splitwave.edge.runtime import load_factors, save_factors


class TorchEdge:
    """forward/backward/step of the edge part in torch eager with torch.optim.AdamW.

    Built from a SplitModel (shares its modules: stepping here changes the split's edge factors), or from
    model args (family_or_path, task, cut, lora) via server.split.
    """

    def __init__(
        self,
        split=None,
        *,
        family_or_path: str | None = None,
        task: str = "seq-cls",
        cut: int | None = None,
        lora=None,
        seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        trainable: set[str] | None = None,
        threads: int | None = None,
    ):
        import torch  # the reference backend only: `edge` itself never imports torch

        if split is None:
            from splitwave.server.models import build_model
            from splitwave.server.split import LoraSpec, split_model

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
        self.manifest = {
            "family": split.family,
            "task": split.task,
            "cut": split.cut,
            "factors": [
                {"name": k, "shape": list(self._params[k].shape), "dtype": "float32"} for k in self.factor_names
            ],
        }
        self._last = None

    @classmethod
    def from_bundle(cls, bundle_dir, **kw) -> TorchEdge:
        """The reference backend for a bundle: rebuild the same model from the bundle's `source` record."""
        import json
        from pathlib import Path

        from splitwave.server.split import LoraSpec

        m = json.loads((Path(bundle_dir) / "manifest.json").read_text())
        src = m.get("source")
        if src is None:
            raise ValueError("bundle manifest has no 'source' record: cannot rebuild the torch reference edge")
        lora = {k: v for k, v in m["lora"].items() if k in ("r", "alpha", "targets", "dropout", "rslora")}
        family = src["family"]  # a tiny family, or a packaged real model build_model locates ("minilm", "smollm2")
        from splitwave.server.models import build_model
        from splitwave.server.split import split_model

        split = split_model(
            build_model(
                family,
                m["task"],
                src["num_labels"],
                seed=src["seed"],
                vocab_size=src.get("vocab_size"),
                init_std=src.get("init_std"),
                tie_embeddings=src.get("tie_embeddings"),
            ),
            m["cut"],
            LoraSpec(**lora),
            m["task"],
        )
        edge = cls(split, **kw)
        edge.set_factors(load_factors(Path(bundle_dir) / m["factors_file"]))
        return edge

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments (a re-initialized adapter starts a new optimization)."""
        self.optimizer.state.clear()

    def set_base_deltas(self, deltas: dict[str, np.ndarray]) -> None:
        """Frozen weight of each LoRA module := original + delta (the running sum sent by the server)."""
        import torch

        modules = dict(self.split.peft_model.named_modules())
        if not hasattr(self, "_base_original"):
            self._base_original = {}
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

    def set_factors(self, values: dict[str, np.ndarray]) -> None:
        self.split.set_edge_factors(values)

    def save_factors(self, path: str | os.PathLike) -> None:
        save_factors(self.factors, path)

    def load_factors(self, path: str | os.PathLike) -> None:
        self.set_factors(load_factors(path))

    def forward(self, input_ids, attention_mask) -> np.ndarray:
        import torch

        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
        mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
        with torch.enable_grad():
            h = self.module(ids, mask)
        self._last = h
        return h.detach().numpy()

    def backward(self, grad_h) -> dict[str, np.ndarray]:
        import torch

        if self._last is None:
            raise RuntimeError("backward() called before forward()")
        params = [self._params[k] for k in self.factor_names]
        grads = torch.autograd.grad(self._last, params, torch.as_tensor(np.asarray(grad_h, dtype=np.float32)))
        self._last = None
        return {k: g.numpy() for k, g in zip(self.factor_names, grads)}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        import torch

        for k in self.factor_names:
            p = self._params[k]
            p.grad = torch.as_tensor(grads[k]).clone() if (k in grads and k in self.trainable) else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, input_ids, attention_mask, grad_fn: Callable[[np.ndarray], np.ndarray]) -> dict:
        h = self.forward(input_ids, attention_mask)
        grads = self.backward(grad_fn(h))
        self.step(grads)
        return grads
