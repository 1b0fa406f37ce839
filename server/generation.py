"""Text generation of a split-trained causal LM, scored like E2E NLG: BLEU, ROUGE-L and NIST.

Decoding runs on the whole model (the server's torch copy of the edge blocks with the global edge adapter, the
top blocks with the top adapter): the same function the split computes, so the text is that of the trained
split model, and of `splitwave export-adapter` loaded as a PeftModel (tests/test_llm.py checks both).

Prompts are E2E meaning representations encoded exactly like the training rows (`MR <end>`, <end> the
tokenizer's eos, or [SEP] for a WordPiece vocabulary), left-padded for batched decoding; generation stops at
<end>. Each MR is scored against all its references (the dev set has 8.5 a MR on average).

Metrics, each from a maintained package that works offline:
- BLEU: sacrebleu's corpus BLEU (13a tokenization, variable number of references per MR);
- ROUGE-L: rouge-score, the F-measure of the best-matching reference per MR, averaged;
- NIST: nltk's corpus NIST (n = 5) on whitespace tokens (the E2E references are already tokenized).
Not computed: METEOR (nltk's needs the WordNet corpus, which is not installable offline) and CIDEr (only
pycocoevalcap has it, unreleased since 2020 and a 100 MB wheel of Java tools).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from splitwave.common.datasets import load_e2e
from splitwave.common.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"


def text_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{bleu, rouge_l, nist} of hypotheses against their reference lists (BLEU and ROUGE-L in percent, as the
    E2E and SplitLoRA tables print them)."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    # the scorers are the optional `llm` extra: imported where they are used, so a server without them runs
    # everything but generation scoring
    try:
        import sacrebleu
        from nltk.translate.nist_score import corpus_nist
        from rouge_score import rouge_scorer
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"generation metrics need {err.name}: pip install -e '.[llm]'") from None
    n_refs = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(n_refs)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = float(
        np.mean([scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)])
    )
    try:
        nist = float(
            corpus_nist([[r.split() for r in refs] for refs in references], [h.split() for h in hypotheses], n=5)
        )
    except ZeroDivisionError:  # every hypothesis empty
        nist = 0.0
    return {"bleu": float(bleu), "rouge_l": 100.0 * rouge, "nist": nist}


def _max_positions(config) -> int | None:
    """Positions a model can embed (GPT-2's learned table); None: no fixed limit (RoPE)."""
    if getattr(config, "model_type", "") == "gpt2":
        return int(config.n_positions)
    return None


@torch.no_grad()
def greedy_decode(
    model,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    num_beams: int = 1,
    batch_size: int = 16,
) -> list[str]:
    """Continuations of `prompts` (each encoded as `prompt <end>`) by greedy search, or beam search with
    num_beams > 1, stopping at <end>. `model`: a HF causal LM or a PeftModel of one (the split's peft_model)."""
    end = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if end is None or tokenizer.pad_id is None:
        raise ValueError("the tokenizer needs an end (eos or sep) and a pad token to decode with")
    config = model.config if hasattr(model, "config") else model.base_model.config
    heads = [p + [end] for p in tokenizer.encode_lists(list(prompts), add_special_tokens=False)]
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(heads), batch_size):
            rows = heads[i : i + batch_size]
            width = max(len(r) for r in rows)
            limit = _max_positions(config)
            new = max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - width))
            ids = np.full((len(rows), width), tokenizer.pad_id, dtype=np.int64)
            mask = np.zeros_like(ids)
            for j, r in enumerate(rows):  # left padding: every row's next token comes right after its prompt
                ids[j, width - len(r) :] = r
                mask[j, width - len(r) :] = 1
            gen = model.generate(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=new,
                do_sample=False,
                num_beams=num_beams,
                eos_token_id=end,
                pad_token_id=tokenizer.pad_id,
            )
            for row in gen[:, width:].tolist():
                if end in row:
                    row = row[: row.index(end)]
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


class Generator:
    """A fixed E2E dev subset (MRs with all their references) decoded and scored at each evaluation."""

    def __init__(
        self,
        prompts: list[str],
        references: list[list[str]],
        tokenizer: Tokenizer,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        batch_size: int = 16,
        out_path: Path | None = None,
    ):
        self.prompts, self.references, self.tokenizer = prompts, references, tokenizer
        self.max_new_tokens, self.num_beams, self.batch_size = max_new_tokens, num_beams, batch_size
        self.out_path = out_path
        self.evaluations = 0
        if out_path is not None:
            out_path.write_text("")

    @classmethod
    def from_config(cls, cfg, tokenizer_dir, run_dir: Path | None = None) -> Generator:
        if tokenizer_dir is None:
            raise ValueError("generation needs the bundle's tokenizer")
        g = cfg.generation
        prompts, references = e2e_prompts(g.num_prompts, cfg.seed)
        return cls(
            prompts,
            references,
            Tokenizer.from_dir(tokenizer_dir),
            g.max_new_tokens,
            g.num_beams,
            g.batch_size,
            None if run_dir is None else Path(run_dir) / GENERATIONS_FILE,
        )

    def decode(self, model) -> list[str]:
        return greedy_decode(model, self.tokenizer, self.prompts, self.max_new_tokens, self.num_beams, self.batch_size)

    def score(self, split) -> dict[str, float]:
        """gen_bleu, gen_rouge_l, gen_nist, gen_len (mean words), gen_s of the split model as it is now; the
        texts go to generations.jsonl (one line per evaluation)."""
        t0 = time.perf_counter()
        texts = self.decode(split.peft_model)
        m = text_metrics(texts, self.references)
        out = {f"gen_{k}": v for k, v in m.items()}
        out["gen_len"] = float(np.mean([len(t.split()) for t in texts]))
        out["gen_s"] = time.perf_counter() - t0
        if self.out_path is not None:
            with open(self.out_path, "a") as f:
                f.write(json.dumps({"evaluation": self.evaluations, **out, "texts": texts}) + "\n")
        self.evaluations += 1
        log.info(
            "generation on %d E2E MRs: BLEU %.2f, ROUGE-L %.2f, NIST %.3f (%.1f s)",
            len(texts),
            out["gen_bleu"],
            out["gen_rouge_l"],
            out["gen_nist"],
            out["gen_s"],
        )
        return out


def e2e_prompts(num_prompts: int, seed: int = 0, split: str = "valid") -> tuple[list[str], list[list[str]]]:
    """`num_prompts` distinct MRs of the E2E dev set (a seeded choice, in file order) with all their references."""
    by_mr = load_e2e(split).references_by_prompt()
    mrs = list(by_mr)
    if num_prompts < len(mrs):
        keep = np.sort(np.random.default_rng([seed, 16]).choice(len(mrs), size=num_prompts, replace=False))
        mrs = [mrs[i] for i in keep]
    return mrs, [by_mr[m] for m in mrs]
