"""Peak GPU memory of real zeda training steps at real shapes, beside `zeda plan` (one CUDA GPU).

The GPU counterpart of `measure.py`: a randomly initialised model of the real config
(default: Qwen3-30B-A3B, all 48 layers, 128 experts, vocabulary 151,936, bf16), built directly on
the GPU, runs ``--steps`` optimisation steps of `zeda.distill` under a recipe (default:
``recipes/qwen3/30b_a3b_lora_1gpu.yaml``: LoRA split on the experts, activation checkpointing,
one 4096-token sequence per step) in stage-1 text mode with the vendored Qwen3 tokenizer: teacher
pass, forward-KL loss at the full vocabulary, balance loss, backward, AdamW, checkpoint. It
records ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` and the device's used
memory (``torch.cuda.mem_get_info``, CUDA context included) at the end, and
`zeda.planning.plan` for the same run (the same overrides; 1 GiB runtime overhead).

    python evals/plan/gpu_step.py --out /tmp/gpu_step.json            # ~5 min on one H100 (estimate)
    python evals/plan/gpu_step.py --layers 4 --out /tmp/gpu_step.json  # a quick check

Written for a GPU session and not run here (this project's CI machines have no GPU); its
figures belong in ``results_gpu.md`` only once it has run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/qwen3/30b_a3b_lora_1gpu.yaml"))
    p.add_argument("--model-config", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("overrides", nargs="*", help="extra key=value recipe overrides")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zeda
    from zeda.config import load_recipe
    from zeda.evaluation.flops import load_config
    from zeda.planning import GIB, plan, scaled_config

    if not torch.cuda.is_available():
        print("gpu_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    config = load_config(args.model_config)
    if args.layers is not None:
        config = scaled_config(config, args.layers)
    tok = AutoTokenizer.from_pretrained(REPO / "tests/assets/qwen3_tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.jsonl"
        lines, chars = [], 0
        for line in (REPO / "evals/reference/data/train_sample.jsonl").open():
            lines.append(line)
            chars += len(line)
            if chars > 12 * 4096 * (args.steps + 1) + 20000:
                break
        train.write_text("".join(lines))
        overrides = [
            f"data.train_file={train}",
            "stage1.mode=text",
            f"stage1.steps={args.steps}",
            "stage2.enabled=false",
            "train.grad_accum=1",
            "train.save_every=0",
            "train.log_every=1",
            f"train.output_dir={Path(tmp) / 'run'}",
            *args.overrides,
        ]
        cfg = load_recipe(args.recipe, overrides)
        predicted = plan(cfg, 1, None, model_config=config, overhead_gib=1.0)

        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        build_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        _, result = zeda.distill(model, cfg, tok)
        torch.cuda.synchronize()
        step_s = (time.perf_counter() - t0) / args.steps
        free, total = torch.cuda.mem_get_info()
        row = {
            "recipe": args.recipe,
            "model_config": args.model_config,
            "layers": config.num_hidden_layers,
            "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "split_lora": predicted.split_lora,
            "device": torch.cuda.get_device_name(),
            "max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "device_used_at_end_gib": (total - free) / GIB,
            "predicted_gib": predicted.total / GIB,
            "predicted_phase": f"{predicted.stage}/{predicted.phase}",
            "predicted_components_gib": {k: v / GIB for k, v in predicted.components.items()},
            "build_s": round(build_s, 1),
            "seconds_per_step": round(step_s, 1),
            "final_loss": result.last.get("loss"),
            "torch": torch.__version__,
        }
    row["error_vs_reserved"] = row["predicted_gib"] / row["max_reserved_gib"] - 1
    print(json.dumps(row, indent=1))
    print(
        f"\n| device | layers | tokens | max allocated GiB | max reserved GiB | planned GiB | plan vs reserved |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {row['device']} | {row['layers']} | {row['tokens_per_step']} | {row['max_allocated_gib']:.2f} | "
        f"{row['max_reserved_gib']:.2f} | {row['predicted_gib']:.2f} | {row['error_vs_reserved']:+.1%} |"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
