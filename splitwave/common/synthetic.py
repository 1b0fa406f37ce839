"""Synthetic token tasks with a known, learnable signal: tests and tiny-model runs need no dataset files.

Seeded only by their arguments, so the server and every edge generate the same rows from the same data spec.
"""

from __future__ import annotations

import numpy as np

from splitwave.common.tokens import TokenDataset, causal_lm_labels


def synthetic_classification(
    num_samples: int,
    seq_len: int,
    vocab_size: int,
    num_labels: int,
    seed: int,
    min_len: int = 4,
    keys_per_label: int = 4,
    pad_id: int = 0,
    cls_id: int | None = 1,
    label_noise: float = 0.0,
) -> TokenDataset:
    """Token-id classification data with a learnable signal, for tests and tiny-model runs.

    Each class c owns `keys_per_label` "key" tokens; a sample of class c holds 1-3 of its own keys at
    random positions among uniform noise tokens (which never include any key). So the label is a
    function of which key tokens are present: a bag-of-words model gets 100% (minus label_noise).
    Lengths are uniform in [min_len, seq_len], right-padded with pad_id; position 0 is cls_id if set.
    Token layout: [pad, cls?, keys of class 0.., keys of class 1.., ..., noise...].
    """
    rng = np.random.default_rng(seed)
    first_key = max(pad_id, cls_id if cls_id is not None else -1) + 1
    first_noise = first_key + num_labels * keys_per_label
    if vocab_size < first_noise + 2:
        raise ValueError(f"vocab_size {vocab_size} too small: need > {first_noise + 1}")
    start = 1 if cls_id is not None else 0
    if not (start + 1 <= min_len <= seq_len):
        raise ValueError(f"need {start + 1} <= min_len <= seq_len, got {min_len}, {seq_len}")
    labels = rng.integers(0, num_labels, size=num_samples).astype(np.int64)
    lengths = rng.integers(min_len, seq_len + 1, size=num_samples)
    ids = np.full((num_samples, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((num_samples, seq_len), dtype=np.int64)
    for i in range(num_samples):
        n = int(lengths[i])
        row = rng.integers(first_noise, vocab_size, size=n)
        if cls_id is not None:
            row[0] = cls_id
        body = n - start
        k = int(rng.integers(1, min(3, body) + 1))
        pos = start + rng.choice(body, size=k, replace=False)
        keys = first_key + labels[i] * keys_per_label + rng.integers(0, keys_per_label, size=k)
        row[pos] = keys
        ids[i, :n] = row
        mask[i, :n] = 1
    if label_noise > 0:
        flip = rng.random(num_samples) < label_noise
        labels[flip] = rng.integers(0, num_labels, size=int(flip.sum()))
    return TokenDataset(f"synthetic/{num_labels}x{seq_len}", ids, mask, labels, num_labels)


def synthetic_causal_lm(
    num_samples: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
    rule_seed: int = 0,
    min_len: int = 4,
    alphabet: int = 16,
    first_id: int = 2,
    pad_id: int = 0,
) -> TokenDataset:
    """Prompt/target token rows with a learnable next-token rule, for tests and tiny-model runs.

    A fixed successor map (one random cycle over `alphabet` token ids from `first_id`, drawn from `rule_seed`
    only, so train and eval sets share it) makes every target token a function of the token before it. A
    row is 1-3 random prompt tokens (no loss, like a prompt) followed by the chain the map continues from
    the last prompt token, right-padded with pad_id to seq_len; lengths are uniform in [min_len, seq_len].
    Loss starts near ln(vocab_size); learning the alphabet alone brings it to ln(alphabet), the map to 0.
    """
    if not 2 <= alphabet <= vocab_size - first_id:
        raise ValueError(f"need 2 <= alphabet <= vocab_size - first_id = {vocab_size - first_id}, got {alphabet}")
    if not 4 <= min_len <= seq_len:
        raise ValueError(f"need 4 <= min_len <= seq_len, got {min_len}, {seq_len}")
    cycle = np.random.default_rng([rule_seed, 17]).permutation(alphabet)
    succ = np.empty(alphabet, np.int64)
    succ[cycle] = np.roll(cycle, -1)
    rng = np.random.default_rng(seed)
    ids = np.full((num_samples, seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((num_samples, seq_len), dtype=np.int64)
    prompt_lengths = rng.integers(1, 4, size=num_samples)
    for i, n in enumerate(rng.integers(min_len, seq_len + 1, size=num_samples)):
        row = np.empty(int(n), np.int64)
        p = int(prompt_lengths[i])
        row[:p] = rng.integers(0, alphabet, size=p)
        for j in range(p, int(n)):
            row[j] = succ[row[j - 1]]
        ids[i, :n] = row + first_id
        mask[i, :n] = 1
    labels = causal_lm_labels(ids, mask, prompt_lengths)
    return TokenDataset(f"synthetic-lm/{alphabet}x{seq_len}", ids, mask, labels, vocab_size)
