"""One rank of a 2-process CPU (gloo) FSDP2 distillation, launched by test_fsdp.py with
``ACCELERATE_USE_CPU=true accelerate launch --use_fsdp --fsdp_version 2 ...``.

Usage: fsdp_worker.py OUT_DIR RECIPE_YAML
Trains the recipe's model (loaded from ``model.name_or_path``) with `zeda.distill` on an
`Accelerator` built from the launch's options, then writes OUT_DIR/rank{r}.json: accelerate's
distributed type, the class of the trained module, its FSDP units, and for every parameter whether
it is a DTensor with this rank's local and the full element counts, whether transformers'
``generate`` sees an FSDP-managed model (it then keeps the ranks in step), and the routers'
zero-logit biases. With ``ZEDA_TEST_PLACEHOLDER_WEIGHTS=1`` every rank but 0 overwrites its
loaded weights with placeholders first, as RAM-efficient loading leaves them where transformers
skips the read on those ranks (transformers 5.25 reads the checkpoint on every rank).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers.distributed.fsdp import is_fsdp_managed_module

from zeda.config import load_recipe
from zeda.distillation.loop import distill
from zeda.io import load, load_tokenizer
from zeda.zero.routing import zero_routers


def main() -> None:
    out, recipe = Path(sys.argv[1]), sys.argv[2]
    cfg = load_recipe(recipe)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = load(cfg.model.name_or_path)
    if os.environ.get("ZEDA_TEST_PLACEHOLDER_WEIGHTS") == "1" and accelerator.process_index != 0:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.5)
    student, _ = distill(model, cfg, tokenizer, accelerator)
    params = {
        n: {
            "dtensor": isinstance(p, DTensor),
            "local": p.to_local().numel() if isinstance(p, DTensor) else p.numel(),
            "full": p.numel(),
            "trainable": p.requires_grad,
        }
        for n, p in student.named_parameters()
    }
    seen = {
        "distributed_type": str(accelerator.distributed_type),
        "model": type(student.get_base_model()).__name__,
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in student.modules()),
        "generate_syncs_ranks": is_fsdp_managed_module(student.get_base_model()),
        "params": params,
        "zero_logit_bias": sorted({float(r.zero_logit_bias) for r in zero_routers(student)}),
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
    accelerator.end_training()


if __name__ == "__main__":
    main()
