"""Checks of what a client sends before it reaches the model: step tensors and uploaded adapter factors.

Its own module because every path that feeds client numbers to the server's model (the gRPC service, an
in-process simulation) must refuse the same inputs with the same INVALID_ARGUMENT messages; the checks need
no server state, only the limits they are given.
"""

from __future__ import annotations

import numpy as np

from splitwave.common.lora import is_a_key, is_b_key
from splitwave.common.tokens import IGNORE_INDEX
from splitwave.server.errors import ServiceError

STEP_TENSORS = frozenset({"h", "attention_mask", "labels"})


def checked_float32(name: str, arr: np.ndarray, bound: float) -> np.ndarray:
    """`arr` as float32, refused unless every value is finite and |value| <= bound AFTER the cast: a float64
    1e300 is finite on the wire but inf in float32, where it would reach the model."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(arr, dtype=np.float32)
        top = float(np.max(np.abs(out), initial=0.0))
    if not np.isfinite(top):
        raise ServiceError("INVALID_ARGUMENT", f"{name} has NaN or Inf values (as float32)")
    if top > bound:
        raise ServiceError(
            "INVALID_ARGUMENT", f"{name} has |value| {top:.3g} > {bound:g} (server.security.max_abs_value)"
        )
    return out


def check_batch(
    tensors: dict,
    *,
    hidden: int,
    max_seq_len: int,
    task: str,
    num_labels: int,
    vocab: int,
    max_abs: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A step's (h float32, attention_mask int64, labels int64), or INVALID_ARGUMENT naming what is wrong."""
    missing = {"h", "attention_mask", "labels"} - set(tensors)
    if missing:
        raise ServiceError("INVALID_ARGUMENT", f"step lacks tensors {sorted(missing)}")
    unknown = set(tensors) - {"h", "attention_mask", "labels"}
    if unknown:
        raise ServiceError("INVALID_ARGUMENT", f"unexpected tensors {sorted(unknown)}")
    h, mask, labels = tensors["h"], tensors["attention_mask"], tensors["labels"]
    if h.ndim != 3 or h.shape[-1] != hidden or not np.issubdtype(h.dtype, np.floating):
        raise ServiceError("INVALID_ARGUMENT", f"h must be float [batch, seq, {hidden}], got {h.dtype} {list(h.shape)}")
    b, sq = h.shape[:2]
    if b == 0 or sq == 0:
        raise ServiceError("INVALID_ARGUMENT", "empty batch")
    if sq > max_seq_len:
        raise ServiceError("INVALID_ARGUMENT", f"sequence length {sq} > max_seq_len {max_seq_len}")
    if mask.shape != (b, sq) or not np.issubdtype(mask.dtype, np.integer) or not np.isin(mask, (0, 1)).all():
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"attention_mask must be 0/1 integers of shape [{b}, {sq}], got {mask.dtype} {list(mask.shape)}",
        )
    if not (mask.sum(axis=1) > 0).all():
        raise ServiceError("INVALID_ARGUMENT", "attention_mask has a row with no tokens")
    if task == "seq-cls":
        if labels.shape != (b,) or not np.issubdtype(labels.dtype, np.integer):
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"labels must be integers of shape [{b}], got {labels.dtype} {list(labels.shape)}",
            )
        if labels.min() < 0 or labels.max() >= num_labels:
            raise ServiceError("INVALID_ARGUMENT", f"labels must be in [0, {num_labels})")
    else:
        if labels.shape != (b, sq) or not np.issubdtype(labels.dtype, np.integer):
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"labels must be integers of shape [{b}, {sq}], got {labels.dtype} {list(labels.shape)}",
            )
        if not ((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab))).all():
            raise ServiceError("INVALID_ARGUMENT", f"labels must be token ids in [0, {vocab}) or {IGNORE_INDEX}")
    h = checked_float32("h", h, max_abs)
    return h, mask.astype(np.int64, copy=False), labels.astype(np.int64, copy=False)


def check_factors(factors: dict, shapes: dict[str, tuple], rank: int, max_abs: float) -> None:
    """Shapes of uploaded factors (LoRA factors up to `rank`), checked before they reach (and could break) a
    round's aggregation; every factor is replaced by its checked float32 copy in place."""
    for k, v in factors.items():
        want = shapes.get(k)
        if want is None:
            raise ServiceError("INVALID_ARGUMENT", f"unknown factor {k!r}")
        if is_a_key(k):
            ok = v.ndim == 2 and v.shape[1] == want[1] and 1 <= v.shape[0] <= rank
        elif is_b_key(k):
            ok = v.ndim == 2 and v.shape[0] == want[0] and 1 <= v.shape[1] <= rank
        else:
            ok = v.shape == want
        if not ok:
            raise ServiceError(
                "INVALID_ARGUMENT",
                f"factor {k!r} has shape {list(v.shape)}, expected {list(want)} (rank <= {rank})",
            )
        factors[k] = checked_float32(f"factor {k!r}", v, max_abs)


def same_tensors(a: dict, b: dict) -> bool:
    """Exactly the same tensors (names, dtypes, values): a retried step, not a new one."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
