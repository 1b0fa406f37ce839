"""Causal-LM training data, evaluation and server checks: per-token labels from the data to the fused step.

The exactness of causal-LM split training over gRPC is in test_grpc_exactness.py, the end-to-end runner on
configs/e2e-gpt2-tiny.yaml in test_runner.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from net_helpers import ROOT, run_clients, serving

from splitwave.common.config import ConfigError, parse_config
from splitwave.common.datasets import load_e2e
from splitwave.common.shard import build_token_dataset, partition
from splitwave.common.synthetic import synthetic_causal_lm
from splitwave.common.tokens import IGNORE_INDEX
from splitwave.server.datasets import data_spec
from splitwave.server.errors import ServiceError
from splitwave.server.evaluation import evaluate
from splitwave.server.models import minilm_path
from splitwave.server.reference import centralized_train
from splitwave.server.setup import build_split, tokenizer_source
from splitwave.server.trainer import _accuracy

E2E_CONFIG = ROOT / "configs" / "e2e-gpt2-tiny.yaml"


def _synthetic_cfg(family: str = "gpt2", **data):
    return parse_config(
        {
            "seed": 0,
            "num_clients": 1,
            "model": {"family": family, "tiny": True, "task": "causal-lm", "cut": 2, "init_std": 0.18},
            "lora": {"r": 4, "alpha": 8},
            "data": {"dataset": "synthetic", "num_train": 256, "num_eval": 64, "max_seq_len": 16, **data},
            "training": {"batch_size": 16, "local_steps": 10, "optim": {"lr": 0.03}},
            "rounds": {"num_rounds": 3},
        }
    )


def _e2e_raw(**overrides) -> dict:
    raw = yaml.safe_load(E2E_CONFIG.read_text())
    for section, values in overrides.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    return raw


# -- data --------------------------------------------------------------------------------------------------


def test_synthetic_causal_lm_follows_one_successor_rule_and_batches_trim_labels():
    train = synthetic_causal_lm(64, 12, 100, seed=5, rule_seed=1)
    evals = synthetic_causal_lm(64, 12, 100, seed=6, rule_seed=1)
    succ = {}
    for ds in (train, evals):
        assert ds.per_token and ds.labels.shape == ds.input_ids.shape
        for ids, mask, lab in zip(ds.input_ids, ds.attention_mask, ds.labels):
            n = int(mask.sum())
            assert (lab[n:] == IGNORE_INDEX).all() and (ids[n:] == 0).all()
            first = int(np.flatnonzero(lab != IGNORE_INDEX)[0])
            assert 1 <= first <= 3 and (lab[first:n] == ids[first:n]).all()  # prompt unlabelled, target labelled
            for prev, tok in zip(ids[first - 1 : n - 1], ids[first:n]):
                assert succ.setdefault(int(prev), int(tok)) == tok  # train and eval share one rule
    assert len(succ) == 16 and sorted(succ.values()) == sorted(succ)  # a permutation of the 16-token alphabet
    again = synthetic_causal_lm(64, 12, 100, seed=5, rule_seed=1)
    assert np.array_equal(again.input_ids, train.input_ids) and np.array_equal(again.labels, train.labels)

    ids, mask, labels = train.batch([3, 1, 4])
    assert labels.shape == ids.shape == (3, mask.sum(1).max())
    assert np.array_equal(labels, train.labels[[3, 1, 4], : ids.shape[1]])
    assert (train.labels[[3, 1, 4], ids.shape[1] :] == IGNORE_INDEX).all()  # only unlabelled columns dropped


def test_e2e_rows_are_prompt_sep_target_sep_with_loss_on_the_target():
    spec = {"dataset": "e2e", "split": "valid", "limit": 16, "seed": 0, "max_seq_len": 64, "task": "causal-lm"}
    ds = build_token_dataset(spec, minilm_path())
    from splitwave.common.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(minilm_path())
    raw = load_e2e("valid", limit=16, seed=0)
    assert ds.num_labels == tok.vocab_size == 30522 and ds.input_ids.shape == (16, 64)
    sep = tok.sep_id
    for i in range(16):
        n = int(ds.attention_mask[i].sum())
        row, lab = ds.input_ids[i, :n], ds.labels[i, :n]
        prompt = tok.encode_lists([raw.prompts[i]], add_special_tokens=False)[0]
        target = tok.encode_lists([" " + raw.targets[i]], add_special_tokens=False)[0]
        p = len(prompt) + 1
        assert row.tolist() == (prompt + [sep] + target + [sep])[:n]  # cut at max_seq_len, else whole
        assert n == 64 or n == len(prompt) + len(target) + 2
        assert (lab[:p] == IGNORE_INDEX).all() and (lab[p:] == row[p:]).all()  # loss on the target (+ [SEP])
    with pytest.raises(ValueError, match="max_seq_len"):  # rows whose prompt fills them have no loss at all
        build_token_dataset({**spec, "max_seq_len": 20}, minilm_path())
    with pytest.raises(ValueError, match="causal-LM data"):
        build_token_dataset({**spec, "task": "seq-cls"}, minilm_path())


def test_causal_lm_is_partitioned_iid_only():
    data = synthetic_causal_lm(40, 8, 100, seed=0)
    parts = partition(data, 4, "iid", 0.3, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(40))
    with pytest.raises(ValueError, match="iid"):
        partition(data, 4, "dirichlet", 0.3, seed=0)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"model": {"task": "causal-lm"}, "data": {"partition": "dirichlet"}}, "data.partition"),
        ({"model": {"family": "gpt2", "task": "causal-lm"}, "data": {"dataset": "e2e"}}, "model.tokenizer"),
        ({"data": {"dataset": "sst2"}}, "model.tokenizer"),
        ({"model": {"family": "minilm", "tiny": False, "vocab_size": 500}}, "model.vocab_size"),
        ({"model": {"family": "minilm", "tiny": False, "init_std": 0.1}}, "model.init_std"),
        ({"model": {"init_std": 0}}, "model.init_std"),
    ],
)
def test_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert field in str(e.value)


def test_tiny_model_takes_the_tokenizers_vocabulary():
    from splitwave.server.setup import model_vocab_size

    cfg = parse_config(_e2e_raw())
    assert tokenizer_source(cfg) == minilm_path() and model_vocab_size(cfg) == 30522
    assert model_vocab_size(parse_config(_e2e_raw(model={"vocab_size": 30600}))) == 30600
    with pytest.raises(ConfigError, match="model.vocab_size"):
        model_vocab_size(parse_config(_e2e_raw(model={"vocab_size": 1000})))
    assert data_spec(cfg, "eval", 30522)["split"] == "valid"


# -- evaluation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_evaluation_is_hf_loss_per_token_and_next_token_accuracy_at_any_batch_size(family):
    cfg = _synthetic_cfg(family)
    split = build_split(cfg)
    data = build_token_dataset(data_spec(cfg, "eval", 100), None)
    ids, mask, labels = (torch.from_numpy(x) for x in data.batch(np.arange(len(data))))
    with torch.no_grad():
        out = split.peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    correct, count = _accuracy(out.logits, labels, "causal-lm")
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    for rows in (64, 7, 1):
        got = evaluate(split, data, max_rows=rows)
        assert got["eval_loss"] == pytest.approx(float(out.loss), abs=1e-5)
        assert (got["eval_accuracy"], got["eval_count"]) == (pytest.approx(correct / count), count)
        assert got["eval_perplexity"] == pytest.approx(math.exp(got["eval_loss"]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_synthetic_causal_lm_is_learnable(family):
    cfg = _synthetic_cfg(family)
    split = build_split(cfg)
    data = build_token_dataset(data_spec(cfg, "eval", 100), None)
    before = evaluate(split, data)
    split, _ = centralized_train(cfg, split=split)
    after = evaluate(split, data)
    assert after["eval_loss"] < before["eval_loss"] - 1.5 and after["eval_accuracy"] > before["eval_accuracy"] + 0.2


# -- server ------------------------------------------------------------------------------------------------


def test_fused_causal_lm_steps_over_grpc_and_label_checks(tmp_path):
    """Two edges on E2E text whose steps the server fuses (server_batch 2); per-token labels are checked."""
    cfg = parse_config(
        _e2e_raw(
            data={"num_train": 64, "num_eval": 16},
            rounds={"num_rounds": 1},
            training={"batch_size": 8, "local_steps": 3, "server_batch": 2, "server_batch_wait_ms": 200},
            channel={"mode": "none"},
        )
    )
    with serving(cfg, tmp_path / "run") as srv:
        out = run_clients(srv.address, ["e0", "e1"], ROOT / ".cache" / "edge-tests")
        stats = srv.app.trainer.batcher.stats()
        app = srv.app
        assert all(isinstance(v, dict) and v["rounds"] == 1 for v in out.values()), out
        assert stats["client_steps"] == 6 and max(stats["sizes"]) == 2  # fusing really happened
        line = [json.loads(x) for x in (tmp_path / "run" / "server_metrics.jsonl").read_text().splitlines()][-1]
        assert np.isfinite(line["eval_loss"]) and line["eval_perplexity"] == pytest.approx(math.exp(line["eval_loss"]))

        b, s = 2, 5
        good = {
            "h": np.zeros((b, s, 32), np.float32),
            "attention_mask": np.ones((b, s), np.int64),
            "labels": np.full((b, s), IGNORE_INDEX, np.int64),
        }
        app.check_batch(good)
        for labels, msg in [
            (np.full((b, s), 30522, np.int64), "token ids"),
            (np.full((b, s), -1, np.int64), "token ids"),
            (np.zeros((b, s + 1), np.int64), "shape"),
            (np.zeros((b, s), np.float32), "integers"),
        ]:
            with pytest.raises(ServiceError, match=msg) as e:
                app.check_batch({**good, "labels": labels})
            assert e.value.code == "INVALID_ARGUMENT"
