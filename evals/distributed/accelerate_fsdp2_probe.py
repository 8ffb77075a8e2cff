"""What accelerate 1.15's own FSDP2 preparation does to a zeda student (read on CPU).

accelerate applies ``fsdp2_prepare_model`` only under ``DistributedType.FSDP``, i.e. on GPUs, so
this probe calls that public function directly on two gloo processes, with a minimal stand-in
for the few accelerator attributes it reads (``state.fsdp_plugin``, ``torch_device_mesh``,
``is_main_process``, ``mixed_precision``, ``device``). Not part of zeda or its tests.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_port 29621 \\
        evals/distributed/accelerate_fsdp2_probe.py generate
    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_port 29625 \\
        evals/distributed/accelerate_fsdp2_probe.py ram_efficient_loading FAMILY

- ``generate``: the student's PEFT wrapper as the root unit (what ``accelerator.prepare(student)``
  would do) vs the transformers model inside it as the root (what zeda passes); ``generate``
  (teacher rollouts, stage 2) then forward and backward on each.
- ``ram_efficient_loading FAMILY``: ``fsdp2_prepare_model`` with ``cpu_ram_efficient_loading``
  (accelerate launch's default) on a tiny student of FAMILY.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model

from zeda.config import RunConfig, apply_overrides
from zeda.distillation.student import build_student
from zeda.tiny import tiny_model


def _student(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(tiny_model(family), apply_overrides(RunConfig(), ["balance.target_zero_share=0.5"]))


def _accelerator_view(student: torch.nn.Module, ram_efficient: bool) -> types.SimpleNamespace:
    layer = type(student.get_base_model().model.layers[0]).__name__
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[layer],
        cpu_ram_efficient_loading=ram_efficient,
    )
    return types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        is_main_process=dist.get_rank() == 0,
        mixed_precision="no",
        device=torch.device("cpu"),
    )


def _try(what: str, fn) -> None:
    try:
        fn()
        print(f"rank {dist.get_rank()}: {what}: ok", flush=True)
    except Exception as exc:  # noqa: BLE001 (a probe reports whatever fails)
        print(
            f"rank {dist.get_rank()}: {what}: {type(exc).__name__}: {str(exc).splitlines()[0][:110]}",
            flush=True,
        )


def generate() -> None:
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
    for root_name in ("PEFT wrapper", "transformers model"):
        student = _student("qwen3_moe")
        root = student if root_name == "PEFT wrapper" else student.get_base_model()
        fsdp2_prepare_model(_accelerator_view(student, False), root)
        student.get_base_model()._is_fsdp_managed_module = True  # generate keeps ranks in step
        _try(
            f"root={root_name}: generate",
            lambda s=student: s.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=4,
                do_sample=True,
                pad_token_id=0,
            ),
        )
        _try(
            f"root={root_name}: forward+backward",
            lambda s=student: s(input_ids=ids).logits.pow(2).mean().backward(),
        )


def ram_efficient_loading(family: str) -> None:
    student = _student(family)
    _try(
        f"{family}: fsdp2_prepare_model(cpu_ram_efficient_loading=True)",
        lambda: fsdp2_prepare_model(_accelerator_view(student, True), student.get_base_model()),
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    generate() if sys.argv[1] == "generate" else ram_efficient_loading(sys.argv[2])
    dist.destroy_process_group()
