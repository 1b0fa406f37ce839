"""Datasets, federated partitions and deterministic minibatch streams for SplitWave (torch-free).

Why one module: everything here decides *which examples a client sees in which order*. Keeping loading,
partitioning and batching together (and seeded the same way) lets a centralized reference reproduce the
exact batches of a split run, which is how the "one client == centralized to ~1e-5" check works.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitwave.common.paths import find_data_file

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # transformers' CrossEntropyLoss ignore_index for causal-LM labels

SST2_LABELS = ("negative", "positive")
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


# --------------------------------------------------------------------------------------------- paths

# The file each (dataset, split) is read from, relative to a data folder (splitwave.common.paths): what a device must hold.
DATA_FILES = {
    "sst2": {
        "train": "sst2/train.tsv",
        "dev": "sst2/dev.tsv",
        "validation": "sst2/dev.tsv",
        "test_unofficial": "sst2/test_labeled_unofficial.tsv",
    },
    "ag_news": {
        "train": "ag_news/train_sample_alps.tsv",
        "test": "ag_news/test_alps.tsv",
        "test_official": "ag_news/test.csv",
    },
    "e2e": {
        "train": "e2e/lora_format/train.txt",
        "valid": "e2e/lora_format/valid.txt",
        "validation": "e2e/lora_format/valid.txt",
        "dev": "e2e/lora_format/valid.txt",
        "test": "e2e/lora_format/test.txt",
    },
}
_SPLIT_HELP = {
    "sst2": "SST-2 split must be one of {}",
    "ag_news": "AG News split must be one of {}",
    "e2e": "E2E split must be one of {}",
}


def data_file(name: str, split: str) -> str:
    """The relative path of a dataset split (ValueError for an unknown dataset or split)."""
    if name not in DATA_FILES:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATA_FILES)}")
    files = DATA_FILES[name]
    if split not in files:
        raise ValueError(f"{_SPLIT_HELP[name].format(sorted(files))}, got {split!r}")
    return files[split]


# ------------------------------------------------------------------------------------------ datasets


@dataclass(frozen=True)
class TextDataset:
    """Raw texts + integer labels (0..num_labels-1) of a classification split."""

    name: str
    texts: list[str]
    labels: np.ndarray  # int64 [n]
    num_labels: int
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return TextDataset(
            self.name, [self.texts[i] for i in idx], self.labels[idx].copy(), self.num_labels, self.label_names
        )


@dataclass(frozen=True)
class PromptDataset:
    """Prompt/target string pairs for causal-LM fine-tuning (E2E: prompt = MR, target = reference)."""

    name: str
    prompts: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PromptDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return PromptDataset(self.name, [self.prompts[i] for i in idx], [self.targets[i] for i in idx])

    def references_by_prompt(self) -> dict[str, list[str]]:
        """Group references per MR (insertion-ordered) for BLEU-style multi-reference evaluation."""
        out: dict[str, list[str]] = {}
        for p, t in zip(self.prompts, self.targets):
            out.setdefault(p, []).append(t)
        return out


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Seeded subset of row indices (kept in file order), or None for all rows."""
    if limit is None or limit >= n:
        return None
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _read_tsv(path: Path, skip_header: bool) -> list[list[str]]:
    # newline="" lets csv strip CRLF (test_labeled_unofficial.tsv) with QUOTE_NONE as the README says.
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if skip_header else rows


def load_sst2(split: str = "train", limit: int | None = None, seed: int = 0, data_dir=None) -> TextDataset:
    """GLUE SST-2. split: train (67,349) | dev (872) | test_unofficial (1,821, non-GLUE labels)."""
    rows = _read_tsv(find_data_file(data_file("sst2", split), data_dir), skip_header=True)
    # Sentences end in a trailing space before the tab; strip it (tokenizers ignore it anyway).
    texts = [r[0].strip() for r in rows]
    labels = np.array([int(r[1]) for r in rows], dtype=np.int64)
    ds = TextDataset(f"sst2/{split}", texts, labels, 2, SST2_LABELS)
    idx = _subsample(len(ds), limit, seed)
    return ds if idx is None else ds.subset(idx)


def load_ag_news(split: str = "train", limit: int | None = None, seed: int = 0, data_dir=None) -> TextDataset:
    """AG News, description text only, labels 0..3 = World, Sports, Business, Sci/Tech.

    split: train (the 10,001-row training sample) | test (official 7,600, same text field as train)
    | test_official (test.csv, the original CSV's description column).
    """
    name_to_id = {n: i for i, n in enumerate(AG_NEWS_LABELS)}
    path = find_data_file(data_file("ag_news", split), data_dir)
    if split in ("train", "test"):
        rows = _read_tsv(path, skip_header=False)
        texts = [r[0].strip() for r in rows]
        labels = np.array([name_to_id[r[1].strip()] for r in rows], dtype=np.int64)
    else:  # test_official
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        # Original format writes in-field newlines as a literal backslash + n (sometimes a lone backslash).
        texts = [" ".join(r[2].replace("\\n", " ").replace("\\", " ").split()) for r in rows]
        labels = np.array([int(r[0]) - 1 for r in rows], dtype=np.int64)
    ds = TextDataset(f"ag_news/{split}", texts, labels, 4, AG_NEWS_LABELS)
    idx = _subsample(len(ds), limit, seed)
    return ds if idx is None else ds.subset(idx)


def load_e2e(split: str = "train", limit: int | None = None, seed: int = 0, data_dir=None) -> PromptDataset:
    """E2E NLG in the LoRA paper's `MR||reference` format: train 42,061 | valid 4,672 | test 4,693.

    prompt = the MR (`name : X | Type : pub | ...`), target = the tokenized reference, stripped.
    """
    path = find_data_file(data_file("e2e", split), data_dir)
    split = "valid" if split in ("validation", "dev") else split
    prompts, targets = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            mr, sep, ref = line.partition("||")
            if not sep:
                raise ValueError(f"E2E line without '||': {line[:80]!r}")
            prompts.append(mr.strip())
            targets.append(ref.strip())
    ds = PromptDataset(f"e2e/{split}", prompts, targets)
    idx = _subsample(len(ds), limit, seed)
    return ds if idx is None else ds.subset(idx)


def load_dataset(name: str, split: str, limit: int | None = None, seed: int = 0, data_dir=None):
    """Dispatch by name ('sst2' | 'ag_news' | 'e2e') for configs; `data_dir` as in splitwave.common.paths."""
    loaders = {"sst2": load_sst2, "ag_news": load_ag_news, "e2e": load_e2e}
    data_file(name, split)  # an unknown dataset or split: ValueError before any file is looked for
    return loaders[name](split, limit=limit, seed=seed, data_dir=data_dir)


# -------------------------------------------------------------------------------------- partitioning


def partition_iid(labels: np.ndarray | int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly random split into `num_clients` shards whose sizes differ by at most one.

    `labels` may be the label array or just the dataset size. Each shard is sorted (order is the
    batcher's job).
    """
    n = int(labels) if np.isscalar(labels) else len(labels)
    if num_clients <= 0 or num_clients > n:
        raise ValueError(f"need 1 <= num_clients <= {n}, got {num_clients}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 1, max_tries: int = 100
) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019): per class, shares over clients ~ Dirichlet(alpha).

    Small alpha -> each client sees few labels. Draws are repeated (same rng stream, so still
    deterministic) until every client has >= min_size examples; if that never happens within
    `max_tries`, samples are moved one by one from the largest client to the smallest, so no client is
    ever empty.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if num_clients <= 0 or num_clients * min_size > n:
        raise ValueError(f"cannot give {num_clients} clients >= {min_size} of {n} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _attempt in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            break
    else:
        logger.info("dirichlet(alpha=%g): no draw met min_size=%d in %d tries; rebalancing", alpha, min_size, max_tries)
        out = [rng.permutation(p) for p in out]
        while True:
            sizes = [len(p) for p in out]
            small = int(np.argmin(sizes))
            if sizes[small] >= min_size:
                break
            big = int(np.argmax(sizes))
            out[small] = np.append(out[small], out[big][-1])
            out[big] = out[big][:-1]
    return [np.sort(p).astype(np.int64) for p in out]


def partition_report(labels: np.ndarray, parts: Sequence[np.ndarray]) -> list[dict]:
    """Per-client size and per-label counts, JSON-ready (plain ints, string label keys)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    report = []
    for k, idx in enumerate(parts):
        counts = {str(int(c)): int(np.sum(labels[idx] == c)) for c in classes}
        report.append({"client": k, "n": int(len(idx)), "label_counts": counts})
    return report


def label_skew(labels: np.ndarray, parts: Sequence[np.ndarray]) -> dict:
    """Summary of non-IID-ness: total-variation distance of each client's label mix to the global mix.

    0 = identical to the global distribution; near 1 - (global share of one label) = single-label client.
    Also the mean share of each client's dominant label and the size spread.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    glob = np.array([np.mean(labels == c) for c in classes])
    tv, dom = [], []
    for idx in parts:
        cnt = np.array([np.sum(labels[idx] == c) for c in classes], dtype=np.float64)
        p = cnt / max(cnt.sum(), 1.0)
        tv.append(0.5 * np.abs(p - glob).sum())
        dom.append(p.max())
    sizes = np.array([len(p) for p in parts])
    return {
        "mean_tv": float(np.mean(tv)),
        "max_tv": float(np.max(tv)),
        "mean_dominant_share": float(np.mean(dom)),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
    }


# ------------------------------------------------------------------------------------------ batching


class Batcher:
    """Deterministic shuffled minibatches of one client's indices.

    The order of epoch e depends only on (seed, client_id, e), so a centralized reference with the same
    triple replays exactly the batches a client trained on, independent of timing or restarts.
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int,
        client_id: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.client_id = int(client_id)
        self.drop_last = drop_last
        self.shuffle = shuffle

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.client_id, int(epoch)])
            order = self.indices[rng.permutation(len(self.indices))]
        else:
            order = self.indices
        bs = self.batch_size
        return [order[i : i + bs] for i in range(0, bs * len(self), bs)]

    def stream(self, start_epoch: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """Endless (epoch, step_in_epoch, batch_indices) over consecutive epochs."""
        if len(self) == 0:
            raise ValueError("no full batch: fewer indices than batch_size with drop_last=True")
        e = start_epoch
        while True:
            for s, b in enumerate(self.epoch(e)):
                yield e, s, b
            e += 1


def batches(
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int = 0,
    drop_last: bool = False,
    client_id: int = 0,
) -> list[np.ndarray]:
    """One epoch of `Batcher` (functional form)."""
    return Batcher(indices, batch_size, seed, client_id=client_id, drop_last=drop_last).epoch(epoch)


# ------------------------------------------------------------------------------------- token arrays


@dataclass(frozen=True)
class TokenDataset:
    """Pre-tokenized, right-padded data: what an edge feeds its ONNX bottom.

    Classification: one label per row. Causal LM: one label per token (IGNORE_INDEX where no loss is taken:
    padding, prompts), not shifted, so labels travel and are trimmed together with the ids.
    """

    name: str
    input_ids: np.ndarray  # int64 [n, s]
    attention_mask: np.ndarray  # int64 [n, s]
    labels: np.ndarray  # int64 [n] (classification) or [n, s] (causal LM)
    num_labels: int  # classes, or the vocabulary size for causal LM

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def per_token(self) -> bool:
        """Causal-LM data: labels per token, so no class label to partition by."""
        return self.labels.ndim == 2

    def batch(self, indices: Sequence[int] | np.ndarray, trim: bool = True):
        """(input_ids, attention_mask, labels) for `indices`; `trim` drops all-padding columns (of per-token
        labels too), which gives exactly the ids a tokenizer with padding="longest" would give for these rows."""
        idx = np.asarray(indices, dtype=np.int64)
        ids, mask, labels = self.input_ids[idx], self.attention_mask[idx], self.labels[idx]
        if trim and len(idx):
            width = max(int(mask.sum(axis=1).max()), 1)
            ids, mask = ids[:, :width], mask[:, :width]
            if self.per_token:
                labels = labels[:, :width]
        return ids, mask, labels


def tokenize_dataset(ds: TextDataset, tokenizer, max_len: int) -> TokenDataset:
    """Tokenize once up front (pad to max_len); batches are trimmed per step by `TokenDataset.batch`."""
    ids, mask = tokenizer.encode_batch(ds.texts, max_len=max_len, pad_to=None)
    return TokenDataset(ds.name, ids, mask, ds.labels.astype(np.int64), ds.num_labels)


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


# -------------------------------------------------------------------------------------- causal LM


def causal_lm_labels(
    input_ids: np.ndarray, attention_mask: np.ndarray, prompt_lengths: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """labels = input_ids with IGNORE_INDEX on padding (and on the first prompt_lengths[i] tokens).

    Not shifted: like transformers' `labels=`, the server shifts logits/labels by one.
    """
    labels = np.where(np.asarray(attention_mask) > 0, input_ids, IGNORE_INDEX).astype(np.int64)
    if prompt_lengths is not None:
        pl = np.asarray(prompt_lengths, dtype=np.int64)[:, None]
        labels[np.arange(labels.shape[1])[None, :] < pl] = IGNORE_INDEX
    return labels


def encode_prompt_target(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_len: int,
    pad_to: int | str | None = "longest",
    sep_id: int | None = None,
    add_eos: bool = True,
    train_on_prompt: bool = False,
    eos_id: int | None = None,
):
    """Causal-LM rows `prompt [sep] " "+target [eos]` -> (input_ids, attention_mask, labels).

    Follows the LoRA paper's E2E encoding (context, bos/eos as separator, completion with a leading
    space, eos). Loss is on the target only unless train_on_prompt. Rows longer than max_len are cut
    at the right. pad_to: None -> max_len, "longest", or an int >= max_len. eos_id: None -> the
    tokenizer's eos.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    eos = tokenizer.eos_id if eos_id is None else eos_id
    if add_eos and eos is None:
        raise ValueError("tokenizer has no eos token; pass add_eos=False or eos_id")
    p_ids = tokenizer.encode_lists(prompts, add_special_tokens=False)
    t_ids = tokenizer.encode_lists([" " + t for t in targets], add_special_tokens=False)
    rows, plens = [], []
    for p, t in zip(p_ids, t_ids):
        head = p + ([sep_id] if sep_id is not None else [])
        row = (head + t + ([eos] if add_eos else []))[:max_len]
        rows.append(row)
        plens.append(min(len(head), len(row)))
    longest = max((len(r) for r in rows), default=0)
    width = max_len if pad_to is None else longest if pad_to == "longest" else int(pad_to)
    if width < longest:
        raise ValueError(f"pad_to={pad_to} < longest row {longest}")
    b = len(rows)
    ids = np.full((b, width), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    labels = causal_lm_labels(ids, mask, None if train_on_prompt else plens)
    return ids, mask, labels


def tokenize_prompts(ds: PromptDataset, tokenizer, max_len: int) -> TokenDataset:
    """Causal-LM rows `prompt <end> target <end>` with the loss on the target only, padded to max_len.

    <end> is the tokenizer's eos, or its [SEP] for BERT-style vocabularies without one (the MiniLM WordPiece
    tokenizer). Every row must keep at least one target token within max_len: a batch of rows without any
    would have no loss at all (NaN), so that is refused here, on the server, before training starts.
    """
    end = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if end is None:
        raise ValueError("tokenizer has neither an eos nor a sep token to end causal-LM rows with")
    ids, mask, labels = encode_prompt_target(
        tokenizer, ds.prompts, ds.targets, max_len, pad_to=None, sep_id=end, eos_id=end
    )
    empty = int(((labels != IGNORE_INDEX).sum(axis=1) == 0).sum())
    if empty:
        raise ValueError(
            f"max_seq_len {max_len} leaves {empty} of {len(ds)} {ds.name} rows without a target "
            f"token (their prompts fill the row): raise data.max_seq_len"
        )
    return TokenDataset(ds.name, ids, mask, labels, tokenizer.vocab_size)


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
