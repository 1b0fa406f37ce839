"""Checks of what a client sends before it reaches the model: step tensors and uploaded adapter factors.

Its own module because every path that feeds client numbers to the server's model (the gRPC service, an
in-process simulation) must refuse the same inputs with the same INVALID_ARGUMENT messages; the checks need
no server state, only the limits they are given.
"""

from __future__ import annotations

import numpy as np

from splitwave.common.lora import is_a_key, is_b_key
from splitwave.common.tokens import IGNORE_INDEX
from splitwave.protos.steps import ROW_LENGTHS, unpack_rows
from splitwave.server.errors import ServiceError

PADDED_STEP = frozenset({"h", "attention_mask", "labels"})
PACKED_STEP = frozenset({"h", ROW_LENGTHS, "labels"})  # splitwave.proto, TrainRequest: "Packed step"
STEP_TENSORS = PADDED_STEP | PACKED_STEP  # the names a step's frames may carry


def step_byte_limit(batch_size: int, max_seq_len: int, hidden: int, max_tensor_bytes: int) -> int:
    """What one step can legitimately need (x4 slack on the batch, float64 h plus two int64 per position): an
    authenticated peer cannot make the server hold more than this for a step, decoded or rebuilt."""
    return min(max_tensor_bytes, 4 * batch_size * max_seq_len * (hidden + 2) * 8 + (64 << 10))


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
    max_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A step's (h float32, attention_mask int64, labels int64) in the padded layout, or INVALID_ARGUMENT
    naming what is wrong. A packed step ("row_lengths" instead of "attention_mask") is checked as sent, then
    rebuilt (zeros at padding) if that stays within `max_bytes` (else RESOURCE_EXHAUSTED)."""
    form = PACKED_STEP if ROW_LENGTHS in tensors else PADDED_STEP
    missing = form - set(tensors)
    if missing:
        raise ServiceError("INVALID_ARGUMENT", f"step lacks tensors {sorted(missing)}")
    unknown = set(tensors) - form
    if unknown:
        where = " in a packed step (one with 'row_lengths')" if form is PACKED_STEP else ""
        raise ServiceError("INVALID_ARGUMENT", f"unexpected tensors {sorted(unknown)}{where}")
    if form is PACKED_STEP:
        return _check_packed(tensors, hidden, max_seq_len, task, num_labels, vocab, max_abs, max_bytes)
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
    labels = _check_labels(labels, b, sq, task, num_labels, vocab)
    h = checked_float32("h", h, max_abs)
    return h, mask.astype(np.int64, copy=False), labels


def _check_packed(
    tensors: dict, hidden: int, max_seq_len: int, task: str, num_labels: int, vocab: int, max_abs: float, max_bytes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A packed step checked as sent (nothing is allocated before its shapes are known to fit), then rebuilt."""
    h, lengths, labels = tensors["h"], tensors[ROW_LENGTHS], tensors["labels"]
    if lengths.ndim != 1 or lengths.shape[0] == 0 or not np.issubdtype(lengths.dtype, np.integer):
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"row_lengths must be integers of shape [batch], batch >= 1, got {lengths.dtype} {list(lengths.shape)}",
        )
    if lengths.min() < 1 or lengths.max() > max_seq_len:
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"row_lengths must be in [1, max_seq_len {max_seq_len}], got [{lengths.min()}, {lengths.max()}]",
        )
    b, sq = lengths.shape[0], int(lengths.max())
    tokens = int(lengths.astype(np.int64).sum())
    if h.ndim != 2 or h.shape[-1] != hidden or not np.issubdtype(h.dtype, np.floating) or h.shape[0] != tokens:
        raise ServiceError(
            "INVALID_ARGUMENT",
            f"packed h must be float [sum(row_lengths) = {tokens}, {hidden}], got {h.dtype} {list(h.shape)}",
        )
    need = b * sq * hidden * 4
    if max_bytes is not None and need > max_bytes:
        raise ServiceError(
            "RESOURCE_EXHAUSTED",
            f"packed step rebuilds to h [{b}, {sq}, {hidden}] float32 = {need} bytes, over the step limit of "
            f"{max_bytes} bytes",
        )
    labels = _check_labels(labels, b, sq, task, num_labels, vocab)
    h = unpack_rows(checked_float32("h", h, max_abs), lengths, sq)
    mask = (np.arange(sq)[None, :] < lengths.astype(np.int64)[:, None]).astype(np.int64)
    return h, mask, labels


def _check_labels(labels: np.ndarray, b: int, sq: int, task: str, num_labels: int, vocab: int) -> np.ndarray:
    """Labels as int64: [b] class ids (seq-cls) or [b, sq] token ids / IGNORE_INDEX (causal-lm)."""
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
    return labels.astype(np.int64, copy=False)


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
