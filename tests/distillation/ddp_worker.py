"""One rank of a 2-process CPU (gloo) distillation, launched by test_accelerate.py.

Usage: ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 ddp_worker.py OUT_DIR JSON_OVERRIDES [NAN_RANK]
Writes OUT_DIR/rank{r}.json with what this rank saw, or OUT_DIR/error{r}.txt on a ZedaError.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import zeda
import zeda.distillation.trainer as trainer_mod
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.loop import distill
from zeda.distillation.student import build_student
from zeda.tiny import tiny_model, tiny_tokenizer
from zeda.zero.routing import zero_routers


def main() -> None:
    out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    nan_rank = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    from accelerate import PartialState

    rank = PartialState(cpu=True).process_index
    cfg = apply_overrides(RunConfig(), overrides)
    student = build_student(tiny_model("qwen3_moe"), cfg)
    seen = {"train_rows": [], "eval_batches": [], "zero": [], "slots": []}

    def embed_hook(module, args):
        key = "train_rows" if torch.is_grad_enabled() else "eval_batches"
        seen[key].append(args[0].tolist() if key == "train_rows" else args[0].shape[0])

    current = {}

    def mask_hook(module, args, kwargs):
        if "attention_mask" in kwargs:  # training forwards; validation forwards carry no mask
            current["mask"] = kwargs["attention_mask"].reshape(-1).bool()

    def router_hook(module, args, output):
        if module.routes_to_zero and torch.is_grad_enabled():  # per training forward, padding excluded
            i = len(seen["train_rows"]) - 1
            idx = output[2][current["mask"]]
            for key, value in (("zero", int((idx >= module.num_experts).sum())), ("slots", idx.numel())):
                seen[key] += [0] * (i + 1 - len(seen[key]))
                seen[key][i] += value

    student.get_input_embeddings().register_forward_pre_hook(embed_hook)
    student.register_forward_pre_hook(mask_hook, with_kwargs=True)
    for r in zero_routers(student):
        r.register_forward_hook(router_hook)
    if rank == nan_rank:
        real, calls = trainer_mod.Trainer.step, {"n": 0}

        def poisoned(self, stage, batch):
            calls["n"] += 1
            loss, parts = real(self, stage, batch)
            return (loss * float("nan"), parts) if calls["n"] == 2 else (loss, parts)

        trainer_mod.Trainer.step = poisoned
    try:
        distill(student, cfg, tiny_tokenizer())
    except zeda.ZedaError as exc:
        (out / f"error{rank}.txt").write_text(str(exc))
        sys.exit(3)
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
