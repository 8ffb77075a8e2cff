"""Can DeepSpeed ZeRO-3 run on this CPU-only machine, and can accelerate (hence zeda) drive it?

Not part of zeda or its tests (DeepSpeed is not a dependency). Run in a throwaway virtual
environment that sees the system packages (torch 2.13.0+cpu, accelerate 1.15.0)::

    python -m venv --system-site-packages /tmp/dsvenv
    /tmp/dsvenv/bin/pip install deepspeed==0.19.8

Two probes, each on two processes (see results_deepspeed_cpu.md for the commands and output):

- ``direct``: ``deepspeed.initialize`` with ZeRO stage 3 on a 2-layer MLP (DeepSpeed's CPU
  accelerator, gloo), one training step; prints each rank's partition size of every parameter.
- ``accelerate``: ``Accelerator()`` under ``accelerate launch --use_deepspeed --zero_stage 3``;
  prints accelerate's distributed type, process index and number of processes, then prepares
  the same MLP.
"""

from __future__ import annotations

import os
import sys

import torch


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))


def direct() -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend="gloo")
    model = _mlp()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(torch.randn(2, 64)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    local = [p.ds_tensor.numel() for p in model.parameters()]
    full = [p.ds_numel for p in model.parameters()]
    print(
        f"direct rank {os.environ['RANK']}: accelerator={get_accelerator()._name} "
        f"backend={get_accelerator().communication_backend_name()} loss={float(loss):.6f} "
        f"partition numel={local} full numel={full}",
        flush=True,
    )


def via_accelerate() -> None:
    from accelerate import Accelerator

    acc = Accelerator()
    print(
        f"accelerate rank {os.environ['RANK']}: distributed_type={acc.distributed_type} "
        f"process_index={acc.process_index} num_processes={acc.num_processes}",
        flush=True,
    )
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        acc.prepare(model, optimizer)
    except ValueError as exc:
        print(f"accelerate rank {os.environ['RANK']}: prepare failed: {str(exc)[:120]}", flush=True)


if __name__ == "__main__":
    direct() if sys.argv[1] == "direct" else via_accelerate()
