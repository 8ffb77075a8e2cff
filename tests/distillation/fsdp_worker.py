"""One rank of a 2-process CPU (gloo) distillation under accelerate FSDP2, launched by test_fsdp.py.

Usage: ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 fsdp_worker.py OUT_DIR JSON_OVERRIDES
Writes OUT_DIR/rank{r}.json: this rank's loss at every micro-step and the class of the prepared model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin

import zeda.distillation.trainer as trainer_mod
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.loop import distill
from zeda.distillation.student import build_student
from zeda.tiny import tiny_model, tiny_tokenizer


def main() -> None:
    out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    cfg = apply_overrides(RunConfig(), overrides)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen3MoeDecoderLayer"],
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, gradient_accumulation_steps=cfg.train.grad_accum)
    seen: dict = {
        "losses": [],
        "prepared": None,
        "sharded": 0,
        "distributed_type": str(accelerator.distributed_type),
    }

    # Record this rank's micro-step losses (the step itself is zeda's, unchanged).
    real_step = trainer_mod.Trainer.step

    def recording_step(self, stage, batch):
        loss, parts = real_step(self, stage, batch)
        seen["losses"].append(float(loss.detach()))
        if seen["prepared"] is None:
            seen["prepared"] = type(self.model).__name__
            seen["sharded"] = sum(type(p).__name__ == "DTensor" for p in self.model.parameters())
        return loss, parts

    trainer_mod.Trainer.step = recording_step
    student = build_student(tiny_model("qwen3_moe"), cfg)
    distill(student, cfg, tiny_tokenizer(), accelerator)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
    accelerator.end_training()


if __name__ == "__main__":
    main()
