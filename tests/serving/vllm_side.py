"""The vLLM half of the serving parity tests; runs in the vLLM environment (``.venv-vllm``).

Usage: ``python vllm_side.py SPEC.json RESULTS.json``. SPEC lists cases
``{name, model, hf_overrides, prompts, continuations, max_tokens, enforce_eager, compilation_config,
fake_vllm_version, import_zeda}``; for each case one ``vllm.LLM`` (CPU, fp32, eager unless told) greedily generates
from the prompts (token ids) and scores ``prompt + continuation`` (the transformers model's greedy
continuation) with ``prompt_logprobs``. RESULTS maps case name to ``{tokens, gen_logprobs,
scored_logprobs}`` or ``{error}``. zeda itself is imported only by an ``import_zeda`` case (one
process holding both registrations; it then also loads the export with ``zeda.load``), which
must come last; ``fake_vllm_version`` sets ``vllm.__version__`` for that case only.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback


def run_case(case: dict) -> dict:
    """Run one case; returns its results (or the error text when loading fails)."""
    import vllm
    from vllm import LLM, SamplingParams

    if case.get("import_zeda"):
        import zeda  # noqa: F401  (registers zeda's own zeda_<family> classes in this process)
    real_version = vllm.__version__
    vllm.__version__ = case.get("fake_vllm_version") or real_version
    try:
        llm = LLM(
            model=case["model"],
            dtype="float32",
            # ZEDA_VLLM_GRAPHS=1 (evals/serve/gpu_check.sh): vLLM's default mode everywhere, CUDA graphs on GPUs
            enforce_eager=case.get("enforce_eager", True) and os.environ.get("ZEDA_VLLM_GRAPHS") != "1",
            skip_tokenizer_init=True,
            max_model_len=64,
            max_num_seqs=64,
            seed=0,
            kv_cache_memory_bytes=256 * 2**20,
            enable_prefix_caching=False,
            hf_overrides=case.get("hf_overrides") or None,
            **({"compilation_config": case["compilation_config"]} if case.get("compilation_config") else {}),
        )
    except Exception as exc:  # noqa: BLE001 - the refusal cases assert on this text
        return {"error": "".join(traceback.format_exception_only(type(exc), exc)).strip()}
    finally:
        vllm.__version__ = real_version
    prompts = [{"prompt_token_ids": p} for p in case["prompts"]]
    gen = llm.generate(
        prompts,
        SamplingParams(
            max_tokens=case["max_tokens"], temperature=0.0, logprobs=0, detokenize=False, ignore_eos=True
        ),
        use_tqdm=False,
    )
    tokens = [list(o.outputs[0].token_ids) for o in gen]
    gen_lp = [
        [step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]
        for o in gen
    ]
    scored = []
    if case.get("continuations"):
        full = [
            {"prompt_token_ids": p + c} for p, c in zip(case["prompts"], case["continuations"], strict=True)
        ]
        outs = llm.generate(
            full,
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False),
            use_tqdm=False,
        )
        for o, p, c in zip(outs, case["prompts"], case["continuations"], strict=True):
            ids = p + c
            lps = o.prompt_logprobs  # position 0 is None
            scored.append([lps[i][ids[i]].logprob for i in range(len(p), len(ids))])
    del llm
    gc.collect()
    out = {"tokens": tokens, "gen_logprobs": gen_lp, "scored_logprobs": scored}
    if case.get("import_zeda"):
        import torch

        import zeda

        model = zeda.load(case["model"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(case["prompts"][:1])).logits[0, -1]
        out["zeda_load"] = [type(model).__name__, int(logits.argmax())]
    return out


def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    results = {}
    for case in spec["cases"]:
        # vLLM runs full collections while it builds an engine (~1 s each over this process's heap on
        # 2 cores); frozen survivors of the previous cases are not traversed again (vLLM unfreezes at
        # engine teardown, so freeze again before each case)
        gc.collect()
        gc.freeze()
        t0 = time.time()
        try:
            results[case["name"]] = run_case(case)
        except Exception as exc:  # noqa: BLE001 - a failure while serving fails that case, not the rest
            results[case["name"]] = {"error": "".join(traceback.format_exception(exc))[-4000:]}
        results[case["name"]]["seconds"] = round(time.time() - t0, 1)
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
