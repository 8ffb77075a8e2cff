"""Every offline lm-eval task under evals/tasks runs through lm_eval.simple_evaluate, offline."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

TASKS_DIR = Path(__file__).resolve().parents[2] / "evals" / "tasks"
TASKS = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
EXPECTED = {
    "ref_perplexity": ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"),
    "ref_cloze": ("acc,none", "perplexity,none"),
    "bigbench_elementary_math_qa": ("acc,none", "acc_norm,none"),
    "bigbench_strategyqa": ("acc,none", "acc_norm,none"),
    "bigbench_social_iqa": ("acc,none", "acc_norm,none"),
    "gsm_symbolic": ("exact_match,last_number",),
}


def test_every_task_is_listed():
    assert set(TASKS) == set(EXPECTED)


REFERENCE_TOKENIZER = Path(__file__).resolve().parents[2] / "evals" / "reference" / "model"
N_DOCS = {
    "ref_perplexity": "ref_perplexity.jsonl",
    "ref_cloze": "ref_cloze.jsonl",
    "bigbench_elementary_math_qa": "bigbench_elementary_math_qa.jsonl",
    "bigbench_strategyqa": "bigbench_strategyqa.jsonl",
    "bigbench_social_iqa": "bigbench_social_iqa.jsonl",
    "gsm_symbolic": "gsm_symbolic.jsonl",
}


def _tiny_moe(vocab_size: int):
    """A tiny random stock Qwen3MoeForCausalLM (2 layers, 8 experts, top-2)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return Qwen3MoeForCausalLM(config).eval()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REFERENCE_TOKENIZER)
    model = _tiny_moe(len(tok))
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=4, max_length=256)
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))  # the tasks must not depend on the working directory
    try:
        out = simple_evaluate(
            model=lm,
            tasks=TASKS,
            task_manager=TaskManager(include_path=str(TASKS_DIR)),
            limit=3,
            bootstrap_iters=0,
            gen_kwargs="max_gen_toks=8",
        )
    finally:
        os.chdir(cwd)
    return out


def test_reference_tokenizer_is_complete():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REFERENCE_TOKENIZER)
    assert len(tok) == 8192
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    text = "In the beginning God created the heaven and the earth."
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("task", sorted(N_DOCS))
def test_task_reads_every_committed_row(results, task):
    with (TASKS_DIR / "data" / N_DOCS[task]).open(encoding="utf-8") as f:
        rows = sum(1 for line in f if line.strip())
    assert results["n-samples"][task]["original"] == rows


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_task_metrics_are_finite(results, task):
    res = results["results"][task]
    for metric in EXPECTED[task]:
        assert metric in res, f"{task}: {metric} missing from {sorted(res)}"
        assert math.isfinite(res[metric])
    assert results["n-samples"][task]["effective"] == 3
    if task == "ref_perplexity":
        # A random 128-token model is far from perfect: perplexities well above 1.
        assert res["word_perplexity,none"] > 1.5 and res["bits_per_byte,none"] > 0.1
    if task.startswith("bigbench"):
        assert 0.0 <= res["acc,none"] <= 1.0
