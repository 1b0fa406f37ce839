"""Shared numpy math for federated LoRA aggregation (see shared/specs/aggregation.md).

Every strategy is a thin policy over these helpers, so the formulas live (and are tested) once. Factor key
naming and the LoRA scaling are peft's and shared with the edge: splitwave.common.lora.
Layout: A is [r, d_in], B is [d_out, r], the update is s * B @ A in nn.Linear layout [d_out, d_in].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def sample_weights(num_samples: Sequence[float]) -> np.ndarray:
    """p_k = n_k / sum_j n_j (float64 so sums stay exact enough for the identities we test)."""
    n = np.asarray(num_samples, dtype=np.float64)
    return n / n.sum()


def weighted_sum(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    out = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for w, a in zip(weights, arrays):
        out += float(w) * np.asarray(a, dtype=np.float64)
    return out


def product_sum(As, Bs, coefs) -> np.ndarray:
    """Sum_k c_k B_k A_k as a dense [d_out, d_in] matrix (the 'ideal' FedAvg-in-ΔW target)."""
    return sum(float(c) * (np.asarray(B, np.float64) @ np.asarray(A, np.float64)) for A, B, c in zip(As, Bs, coefs))


def stack_factors(As, Bs, coefs):
    """FLoRA stacking: B_stack = [B_1..B_K], A_stack = [c_1 A_1; ..; c_K A_K], so
    B_stack @ A_stack = sum_k c_k B_k A_k exactly, for any mix of ranks."""
    B_stack = np.concatenate([np.asarray(B, np.float64) for B in Bs], axis=1)
    A_stack = np.concatenate([float(c) * np.asarray(A, np.float64) for A, c in zip(As, coefs)], axis=0)
    return B_stack, A_stack


def pad_rank(A: np.ndarray, B: np.ndarray, rank: int):
    """Zero-pad A rows / B columns up to `rank` (HetLoRA). The product B @ A is unchanged."""
    r = A.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    A_pad = np.zeros((rank, A.shape[1]), dtype=np.float64)
    B_pad = np.zeros((B.shape[0], rank), dtype=np.float64)
    A_pad[:r] = A
    B_pad[:, :r] = B
    return A_pad, B_pad


def truncate_rank(A: np.ndarray, B: np.ndarray, rank: int):
    """Keep the first `rank` components (HetLoRA/RBLA distribution)."""
    if rank > A.shape[0]:
        raise ValueError(f"cannot truncate rank {A.shape[0]} to larger rank {rank}")
    return A[:rank].copy(), B[:, :rank].copy()


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Default combine function: sum_k w_k a_k (weights are assumed to sum to 1)."""
    return weighted_sum(arrays, weights)


def rank_slot_combine(As, Bs, weights, rank: int, prev_A=None, prev_B=None, masked: bool = True, combine=weighted_mean):
    """Combine heterogeneous-rank factors slot by slot into rank-`rank` global factors.

    masked=False (zero-padding, HetLoRA): pad everyone to `rank` with zeros and combine with the given
      weights, so slots a low-rank client lacks are diluted by its zeros.
    masked=True (RBLA): slot j combines only the clients that own it, weights renormalized over them.
    Slots no participant owns keep prev_A/prev_B (zeros if None) instead of being wiped.
    `combine(arrays, weights)` is the averaging operator (plain weighted mean, or a robust one).
    """
    d_in, d_out = As[0].shape[1], Bs[0].shape[0]
    w = np.asarray(weights, np.float64)
    ranks = np.array([A.shape[0] for A in As])
    A_out = np.zeros((rank, d_in)) if prev_A is None else np.array(prev_A, np.float64)
    B_out = np.zeros((d_out, rank)) if prev_B is None else np.array(prev_B, np.float64)
    owned = min(rank, int(ranks.max()))
    if not masked:
        padded = [pad_rank(A, B, owned) for A, B in zip(As, Bs)]
        A_out[:owned] = combine([a for a, _ in padded], w)
        B_out[:, :owned] = combine([b for _, b in padded], w)
        return A_out, B_out
    for j in range(owned):
        idx = np.flatnonzero(ranks > j)
        wj = w[idx] / w[idx].sum()
        A_out[j] = combine([As[k][j] for k in idx], wj)
        B_out[:, j] = combine([Bs[k][:, j] for k in idx], wj)
    return A_out, B_out


def product_fro_norm(A: np.ndarray, B: np.ndarray) -> float:
    """||B A||_F without forming the dense product: sqrt(tr((A A^T)(B^T B))), r x r work only."""
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    val = float(np.sum((A @ A.T) * (B.T @ B)))
    return math.sqrt(max(val, 0.0))


def svd_factors(dW: np.ndarray, rank: int):
    """Top-`rank` SVD factors of dW with unit scaling: B = U_r S_r, A = V_r^T (FlexLoRA, FedSVD)."""
    U, S, Vt = np.linalg.svd(np.asarray(dW, np.float64), full_matrices=False)
    rank = min(rank, S.shape[0])
    return Vt[:rank].copy(), U[:, :rank] * S[:rank]
