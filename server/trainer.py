"""The server half of a split step: top blocks + head forward from cut activations, loss, backward, AdamW.

One `TopTrainer` serves every client. In `sl`/`sfl-v2` all clients share one top adapter (and one optimizer);
in `sfl-v1` each client has its own top adapter and optimizer state, swapped into the shared module for its
step. Compute runs on the one compute thread (server/compute.py): the server is one shared resource, served
in arrival order.

In `sfl-v2` with `server_batch` K > 1, steps of up to K different clients that wait at the same time are
fused into one server step (server/batching.py decides which; `_train_fused` computes them):
- their activations are concatenated along the batch dimension, the sequence dimension padded to the
  longest with h = 0 and attention_mask = 0 (padded keys are masked out, so no real position sees them);
- each client's loss is its own mean loss on its own rows and positions, exactly as in an unfused step; the
  fused loss is the mean of the K client losses, so every client weighs the same as in an unfused step,
  and one AdamW step of the shared top adapter is taken on it;
- each client gets back dL_c/dh_c of ITS OWN loss (padding cut off), its loss and correct/count.
The backward runs on the sum of the client losses and the adapter gradients are then divided by K: the
same gradient as backward of the mean, while each client's dL_c/dh_c comes out unscaled. One client's
fused step is the unfused step, operation for operation.

No step is applied unless its loss, every adapter gradient and grad_h are finite: a client whose step is
not gets INVALID_ARGUMENT and the adapter and AdamW state stay bit-identical; the other members of a fused
step get the fused step of the remaining members (`_train_locked`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import get_peft_model_state_dict

from splitwave.server import compute
from splitwave.server.batching import StepBatcher
from splitwave.server.errors import ServiceError

log = logging.getLogger(__name__)


def trainable_parameters(peft_model, names: list[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """Map peft saved-adapter keys (the names adapters round-trip under) to the live parameters.

    The mapping is found by storage identity, so it holds for LoRA factors and for `modules_to_save` copies
    alike, whatever renaming peft applies when it saves.
    """
    by_ptr = {p.data_ptr(): p for p in peft_model.parameters() if p.requires_grad}
    saved = get_peft_model_state_dict(peft_model, state_dict={n: p for n, p in peft_model.named_parameters()})
    out = {}
    for key, tensor in saved.items():
        p = by_ptr.get(tensor.data_ptr())
        if p is not None and (names is None or key in names):
            out[key] = p
    if names is not None:
        missing = set(names) - set(out)
        if missing:
            raise KeyError(f"no trainable parameter for adapter keys: {sorted(missing)[:5]}")
    return out


@dataclass
class StepInput:
    """One client's validated step: cut activations [b, s, hidden], 0/1 mask [b, s], labels."""

    client_id: str | None
    h: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


@dataclass
class StepResult:
    grad_h: np.ndarray
    loss: float
    correct: int
    count: int
    compute_s: float  # of the whole server step (shared by every client fused into it)
    server_batch: int = 1  # client steps fused into the server step that computed this one


class _Slot:
    """A top adapter (factor values) with its own AdamW state."""

    def __init__(self, values: dict[str, torch.Tensor], optimizer_state: dict | None):
        self.values = values
        self.optimizer_state = optimizer_state


class TopTrainer:
    def __init__(
        self,
        split,
        task: str,
        lr: float,
        weight_decay: float = 0.0,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        personal: bool = False,
        server_batch: int = 1,
        server_batch_wait_s: float = 0.002,
    ):
        self.split = split
        self.task = task
        self.module = split.server
        self.module.eval()  # dropout off, as on the exported edge: split training == centralized training
        edge = set(split.edge_factor_names())
        # the top LoRA factors and whatever else peft trains above the cut (e.g. a new classifier head)
        self.params = {k: p for k, p in trainable_parameters(split.peft_model).items() if k not in edge}
        self._opt_args = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), **self._opt_args)
        self.personal = personal
        self._slots: dict[str, _Slot] = {}
        self._active: str | None = None  # which client's slot is loaded into the module (sfl-v1)
        self._initial = self._snapshot()
        self.lock = threading.Lock()
        if server_batch > 1 and personal:
            raise ValueError("server_batch > 1 needs one shared top adapter (sfl-v2), not per-client ones (sfl-v1)")
        # server_batch 1: no batcher at all, every step goes straight to the compute thread as before
        self.batcher = StepBatcher(self.train_fused, server_batch, server_batch_wait_s) if server_batch > 1 else None
        if self.batcher is not None:
            log.info(
                "server batching: up to %d clients' steps fused into one server step (waiting up to %.1f ms)",
                server_batch,
                server_batch_wait_s * 1e3,
            )

    # -- adapter state -------------------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def _load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(values[k])

    def _activate(self, client_id: str | None) -> None:
        """sfl-v1: park the active client's adapter and optimizer state, load `client_id`'s."""
        if not self.personal or client_id == self._active:
            return
        if self._active is not None:
            self._slots[self._active] = _Slot(self._snapshot(), copy.deepcopy(self.optimizer.state_dict()))
        slot = self._slots.get(client_id)
        if slot is None:
            slot = _Slot({k: v.clone() for k, v in self._initial.items()}, None)
        self._load(slot.values)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), **self._opt_args)
        if slot.optimizer_state is not None:
            self.optimizer.load_state_dict(slot.optimizer_state)
        self._active = client_id

    def factors(self, client_id: str | None = None) -> dict[str, np.ndarray]:
        with self.lock:
            if self.personal and client_id is not None and client_id != self._active:
                slot = self._slots.get(client_id)
                src = slot.values if slot else self._initial
                return {k: v.numpy().copy() for k, v in src.items()}
            return {k: p.detach().numpy().copy() for k, p in self.params.items()}

    def set_factors(self, values: dict[str, np.ndarray], client_id: str | None = None) -> None:
        """Install aggregated top factors (for one client in sfl-v1, else the shared adapter)."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(values[k], dtype=np.float32)) for k in self.params}
        with self.lock:
            if self.personal and client_id is not None and client_id != self._active:
                old = self._slots.get(client_id)
                self._slots[client_id] = _Slot(tensors, old.optimizer_state if old else None)
            else:
                self._load(tensors)

    @contextlib.contextmanager
    def using_factors(self, values: dict[str, np.ndarray] | None) -> Iterator[None]:
        """Inside the block the module holds the top factors `values` (None or empty: the ones loaded now) and
        the trainer's lock (no step runs); after it, the adapter loaded before is back. For evaluating a global
        top adapter between steps."""
        with self.lock:
            saved = self._snapshot()
            if values:
                self._load({k: torch.from_numpy(np.asarray(v)) for k, v in values.items()})
            try:
                yield
            finally:
                self._load(saved)

    def client_ids(self) -> list[str]:
        ids = set(self._slots)
        if self._active is not None:
            ids.add(self._active)
        return sorted(ids)

    def state_dict(self) -> dict:
        """Everything needed to resume: adapters and optimizer moments of every slot."""
        with self.lock:
            active = {"values": self._snapshot(), "optimizer": copy.deepcopy(self.optimizer.state_dict())}
            return {
                "active": self._active,
                "current": active,
                "slots": {c: {"values": s.values, "optimizer": s.optimizer_state} for c, s in self._slots.items()},
            }

    def load_state_dict(self, state: dict) -> None:
        with self.lock:
            self._slots = {c: _Slot(s["values"], s["optimizer"]) for c, s in state["slots"].items()}
            self._active = state["active"]
            self._load(state["current"]["values"])
            self.optimizer = torch.optim.AdamW(list(self.params.values()), **self._opt_args)
            self.optimizer.load_state_dict(state["current"]["optimizer"])

    def slot_state(self, client_id: str | None) -> dict:
        """A copy of the top adapter and AdamW state `client_id` trains (sfl-v1: its own slot; else the shared
        one), with the optimizer's step count: what `restore_slot` rolls back to."""
        with self.lock:
            if self.personal and client_id != self._active:
                slot = self._slots.get(client_id)
                values = {k: v.clone() for k, v in (slot.values if slot else self._initial).items()}
                opt = copy.deepcopy(slot.optimizer_state) if slot else None
            else:
                values, opt = self._snapshot(), copy.deepcopy(self.optimizer.state_dict())
            return {"values": values, "optimizer": opt, "steps": _opt_steps(opt)}

    def restore_slot(self, client_id: str | None, state: dict, steps_since: int) -> bool:
        """Undo `steps_since` server steps of `client_id` taken since `state` was saved (its abandoned steps).
        Exact (adapter and AdamW state back to `state`) when nobody else trained that adapter meanwhile: always
        in sfl-v1, in sfl-v2 only if the shared optimizer took exactly those steps (unfused). Otherwise the shared
        adapter keeps their effect (other clients' later steps build on it) and only AdamW's step count is set
        back. Returns whether the rollback was exact."""
        with self.lock:
            if self.personal:
                slot = _Slot({k: v.clone() for k, v in state["values"].items()}, copy.deepcopy(state["optimizer"]))
                if client_id == self._active:
                    self._load(slot.values)
                    self.optimizer = torch.optim.AdamW(list(self.params.values()), **self._opt_args)
                    if slot.optimizer_state is not None:
                        self.optimizer.load_state_dict(slot.optimizer_state)
                else:
                    self._slots[client_id] = slot
                return True
            now = _opt_steps(self.optimizer.state_dict())
            if self.batcher is None and now - state["steps"] == steps_since:
                self._load(state["values"])
                self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
                return True
            for st in self.optimizer.state.values():
                if "step" in st:
                    st["step"] = st["step"] - min(steps_since, int(st["step"]))
            return False

    def optimizer_steps(self, client_id: str | None = None) -> int:
        """Server steps the AdamW state of `client_id`'s top adapter has taken (sfl-v2: the shared one's)."""
        return self.slot_state(client_id)["steps"]

    # -- compute -------------------------------------------------------------------------------------------
    def _outputs(self, steps: Sequence[StepInput]):
        """Forward of the (padded, concatenated) steps: h leaf, each step's row range, loss and (correct, count)."""
        h, mask, rows = _pad_concat(steps)
        h_t = torch.from_numpy(h).requires_grad_(True)
        logits = self.module(h_t, torch.from_numpy(mask))
        losses, stats = [], []
        for s, (r0, r1) in zip(steps, rows):
            # a lone step is the whole batch: no slicing, the unfused step's exact operations
            if len(steps) == 1:
                lg = logits
            else:
                lg = logits[r0:r1] if self.task == "seq-cls" else logits[r0:r1, : s.h.shape[1]]
            labels_t = torch.from_numpy(np.ascontiguousarray(s.labels, dtype=np.int64))
            losses.append(self.split.loss(lg, labels_t))
            stats.append(_accuracy(lg, labels_t, self.task))
        return h_t, rows, losses, stats

    def train_step(
        self, client_id: str | None, h: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
    ) -> StepResult:
        step = StepInput(client_id, h, attention_mask, labels)
        if self.batcher is not None:
            return self.batcher.submit(client_id, step)
        (result,) = compute.run(self._train_fused, [step])
        if isinstance(result, ServiceError):
            raise result
        return result

    def train_fused(self, steps: Sequence[StepInput]) -> list[StepResult | ServiceError]:
        """One server step for validated steps of different clients, on the compute thread: what the batcher
        runs for a group (and the simulation engine for the group its virtual clock fused)."""
        return compute.run(self._train_fused, steps)

    def eval_step(
        self, client_id: str | None, h: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
    ) -> StepResult:
        return compute.run(self._eval_step, client_id, h, attention_mask, labels)

    def _train_fused(self, steps: Sequence[StepInput]) -> list[StepResult | ServiceError]:
        """One server step for the steps of len(steps) clients (see the module docstring); a step whose loss,
        gradients or grad_h would not be finite gets a ServiceError in its place (see `_train_locked`)."""
        k = len(steps)
        if k > 1 and (self.personal or len({s.client_id for s in steps}) < k):
            raise ValueError("only steps of different clients sharing one top adapter can be fused")
        with self.lock:
            t0 = time.perf_counter()
            self._activate(steps[0].client_id)
            return self._train_locked(steps, t0)

    def _backward(self, steps: Sequence[StepInput]):
        """(lock held) Forward and backward of the steps; leaves d(mean loss)/d(adapter) in .grad, steps nothing."""
        self.optimizer.zero_grad(set_to_none=True)
        h_t, rows, losses, stats = self._outputs(steps)
        (losses[0] if len(steps) == 1 else torch.stack(losses).sum()).backward()
        if len(steps) > 1:  # d(mean of the K losses)/d(adapter)
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.div_(len(steps))
        return h_t.grad.numpy(), rows, losses, stats

    def _grads_finite(self) -> bool:
        return all(bool(torch.isfinite(p.grad).all()) for p in self.params.values() if p.grad is not None)

    def _train_locked(self, steps: Sequence[StepInput], t0: float) -> list[StepResult | ServiceError]:
        """(lock held) The step is applied only if every loss, adapter gradient and grad_h is finite; else the
        adapter and AdamW state stay exactly as they were. In a fused step the members at fault (rows are
        independent, so a member's own loss / grad_h show it; failing that, each is tried alone) are refused
        and the others' step is computed again without them."""
        k = len(steps)
        grad, rows, losses, stats = self._backward(steps)
        bad = [
            i
            for i, ((r0, r1), s, loss) in enumerate(zip(rows, steps, losses))
            if not (torch.isfinite(loss) and np.isfinite(grad[r0:r1, : s.h.shape[1]]).all())
        ]
        if not bad and self._grads_finite():
            self.optimizer.step()
            dt = time.perf_counter() - t0
            return [
                StepResult(
                    grad if k == 1 else np.ascontiguousarray(grad[r0:r1, : s.h.shape[1]]),
                    float(loss.detach()),
                    correct,
                    count,
                    dt,
                    k,
                )
                for s, (r0, r1), loss, (correct, count) in zip(steps, rows, losses, stats)
            ]
        self.optimizer.zero_grad(set_to_none=True)
        if not bad and k > 1:  # only the summed adapter gradient overflowed: find who makes it so alone
            for i, s in enumerate(steps):
                self._backward([s])
                if not self._grads_finite():
                    bad.append(i)
                self.optimizer.zero_grad(set_to_none=True)
        if not bad:
            bad = list(range(k))
        refusal = ServiceError(
            "INVALID_ARGUMENT",
            "server step refused: the loss, adapter gradients or grad_h of "
            "this client's step are not finite (NaN/Inf); nothing was applied",
        )
        log.warning(
            "server step refused for client(s) %s: non-finite loss/gradients (fused with %d)",
            [steps[i].client_id for i in bad],
            k,
        )
        good = [i for i in range(k) if i not in bad]
        done = dict(zip(good, self._train_locked([steps[i] for i in good], t0))) if good else {}
        return [done.get(i, refusal) for i in range(k)]

    @torch.no_grad()
    def _eval_step(self, client_id, h, attention_mask, labels) -> StepResult:
        with self.lock:
            t0 = time.perf_counter()
            self._activate(client_id)
            _, _, (loss,), ((correct, count),) = self._outputs([StepInput(client_id, h, attention_mask, labels)])
            return StepResult(np.zeros(0, np.float32), float(loss), correct, count, time.perf_counter() - t0)


def _opt_steps(optimizer_state: dict | None) -> int:
    """AdamW's step count (the same for every parameter); 0 before the first step."""
    for st in (optimizer_state or {}).get("state", {}).values():
        if "step" in st:
            return int(st["step"])
    return 0


def _pad_concat(steps: Sequence[StepInput]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Steps stacked along the batch, right-padded (h = 0, mask = 0) to the longest; each step's row range."""
    if len(steps) == 1:
        s = steps[0]
        return (
            np.ascontiguousarray(s.h, dtype=np.float32),
            np.ascontiguousarray(s.attention_mask, dtype=np.int64),
            [(0, s.h.shape[0])],
        )
    seq = max(s.h.shape[1] for s in steps)
    total = sum(s.h.shape[0] for s in steps)
    h = np.zeros((total, seq, steps[0].h.shape[2]), np.float32)
    mask = np.zeros((total, seq), np.int64)
    rows, r = [], 0
    for s in steps:
        b, sq = s.h.shape[:2]
        h[r : r + b, :sq] = s.h
        mask[r : r + b, :sq] = s.attention_mask
        rows.append((r, r + b))
        r += b
    return h, mask, rows


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[int, int]:
    if task == "causal-lm":  # next-token accuracy over the positions that have a label
        pred = logits[:, :-1].argmax(-1)
        tgt = labels[:, 1:]
        valid = tgt != -100
        return int(((pred == tgt) & valid).sum()), int(valid.sum())
    return int((logits.argmax(-1) == labels).sum()), int(labels.numel())
