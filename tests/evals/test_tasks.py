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


@pytest.fixture(scope="module")
def results():
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from zeda.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tok), max_position_embeddings=512)
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=4, max_length=256)
    out = simple_evaluate(
        model=lm,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=3,
        bootstrap_iters=0,
        gen_kwargs="max_gen_toks=8",
    )
    return out


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
