"""Preparing the student for training, and FSDP2 sharding where accelerate does not shard: CPU.

accelerate (1.15) switches to ``DistributedType.FSDP`` only for accelerator-backed process groups
(``MULTI_GPU``, ``MULTI_XPU``, ... in ``accelerate/state.py``). A CPU (gloo) launch stays
``MULTI_CPU``: ``accelerator.prepare`` wraps the model in DistributedDataParallel and ignores the
FSDP options it was launched with, so nothing is sharded. `prepare_student` keeps accelerate's
preparation everywhere except in that one case, a CPU launch that asked for FSDP version 2::

    ACCELERATE_USE_CPU=true accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 \\
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_cpu_ram_efficient_loading false ...

There `shard_fsdp2` applies torch's ``fully_shard`` the way accelerate's own
``fsdp2_prepare_model`` does on GPUs: one FSDP unit per module picked by the launch's wrap policy
(accelerate's ``fsdp2_prepare_auto_wrap_policy``, i.e. the decoder layers for
``TRANSFORMER_BASED_WRAP``), then the transformers model as the root. accelerate stays in charge
of everything else (launch, process group, gradient accumulation, backward, DTensor-aware
clipping, reductions), and on GPUs its FSDP2 path is the one used. No accelerate class is modified.

On CPU the options come from the launch environment (``FSDP_*``, set by ``accelerate launch``): an
``Accelerator(fsdp_plugin=...)`` object is dropped by accelerate's state on CPU, so only its
``ACCELERATE_USE_FSDP=true`` is visible.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from zeda.errors import ZedaError
from zeda.zero.checkpointing import enable_activation_checkpointing

logger = logging.getLogger(__name__)

__all__ = [
    "check_launch",
    "root_gathered",
    "cpu_fsdp2_plugin",
    "is_sharded",
    "prepare_optimizer",
    "prepare_student",
    "shard_fsdp2",
]


def cpu_fsdp2_plugin(distributed_type: DistributedType) -> FullyShardedDataParallelPlugin | None:
    """The FSDP2 options of a CPU launch that asked for FSDP, which accelerate itself would ignore.

    The options are read by accelerate's own `FullyShardedDataParallelPlugin` from the launch's
    environment (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_AUTO_WRAP_POLICY``, ...; what
    ``accelerate launch --use_fsdp ...`` sets in every process).

    Args:
        distributed_type: The accelerate state's distributed type.

    Returns:
        The plugin, or None when this is not a CPU launch that asked for FSDP.

    Raises:
        ZedaError: for an FSDP option the CPU path cannot honour (one line).
    """
    if distributed_type != DistributedType.MULTI_CPU:
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    try:
        plugin = FullyShardedDataParallelPlugin()
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZedaError(f"invalid FSDP launch options: {first[:200]}") from None
    if plugin.fsdp_version != 2:
        raise ZedaError(
            f"FSDP version {plugin.fsdp_version} was asked for on CPU; zeda shards CPU runs with FSDP "
            "version 2 only (accelerate launch --fsdp_version 2, or FSDP_VERSION=2 in the environment)"
        )
    _refuse_fsdp_activation_checkpointing(plugin)
    return plugin


def _refuse_fsdp_activation_checkpointing(plugin: FullyShardedDataParallelPlugin | None) -> None:
    # accelerate's FSDP activation checkpointing wraps every decoder layer in torch's
    # checkpoint_wrapper, which renames every parameter below it (``_checkpoint_wrapped_module``) and
    # would checkpoint a second time around transformers' own per-layer checkpointing. The recipe's
    # train.gradient_checkpointing does it once, the same way on every layout.
    if plugin is not None and plugin.activation_checkpointing:
        raise ZedaError(
            "launch without FSDP activation checkpointing (--fsdp_activation_checkpointing false) and set "
            "train.gradient_checkpointing=true in the recipe instead"
        )


def check_launch(accelerator: Accelerator) -> None:
    """Refuse launch options zeda cannot honour, before anything is written.

    Raises:
        ZedaError: one line naming the option and the fix.
    """
    cpu_fsdp2_plugin(accelerator.distributed_type)
    if accelerator.is_fsdp2:
        _refuse_fsdp_activation_checkpointing(accelerator.state.fsdp_plugin)


def shard_fsdp2(model: nn.Module, plugin: FullyShardedDataParallelPlugin) -> nn.Module:
    """Shard ``model`` in place with FSDP2 (``torch.distributed.fsdp.fully_shard``) on the default mesh.

    Every module the plugin's wrap policy selects (bottom-up, like accelerate's
    ``fsdp2_prepare_model``) becomes its own FSDP unit, then the transformers model at the root
    does. Parameters become ``DTensor`` shards (dim 0 split across ranks); frozen and trainable
    parameters are sharded alike.

    With RAM-efficient loading (``--fsdp_cpu_ram_efficient_loading true``) only rank 0's weights
    count: other ranks may hold placeholders, and rank 0's full state is broadcast into every
    rank's shards after sharding (torch's ``set_model_state_dict(..., broadcast_from_rank0=True)``,
    as accelerate's GPU path does).

    Args:
        model: The student, unsharded and on the CPU, with identical values on every rank (or
            valid on rank 0 only, with RAM-efficient loading).
        plugin: The launch's FSDP2 options (wrap policy, ``reshard_after_forward``,
            ``cpu_ram_efficient_loading``).

    Returns:
        ``model`` itself (a PEFT wrapper stays one; the model inside is now an ``FSDPModule``).
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.other import get_module_children_bottom_up
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # The root unit is the transformers model itself, not a PEFT wrapper around it:
    # ``PeftModel.generate`` (teacher rollouts, stage-2 samples) calls the inner model directly,
    # which would skip a wrapper's all-gather.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    from_rank0 = bool(plugin.cpu_ram_efficient_loading)
    full = root.state_dict() if from_rank0 and torch.distributed.get_rank() == 0 else {}
    policy = fsdp2_prepare_auto_wrap_policy(plugin, root)
    units = 0
    if policy is not None:
        for module in get_module_children_bottom_up(root)[:-1]:  # the root is wrapped last
            if policy(module) and not isinstance(module, FSDPModule):
                fully_shard(module, reshard_after_forward=plugin.reshard_after_forward)
                units += 1
    # The root keeps torch's default (no reshard after forward), as accelerate does.
    fully_shard(root)
    if from_rank0:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            root, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        del full
    _mark_fsdp_managed(model)
    logger.info("FSDP2 on CPU: %d wrapped modules + the root", units)
    return model


def prepare_student(
    accelerator: Accelerator, student: nn.Module, gradient_checkpointing: bool = False
) -> nn.Module:
    """Prepare the student once for both stages.

    With ``gradient_checkpointing`` every decoder layer is checkpointed first
    (`zeda.zero.checkpointing.enable_activation_checkpointing`: transformers' per-layer
    checkpointing, FSDP2's hooks outside the recomputed call), on every layout.

    - A CPU launch that asked for FSDP2: `shard_fsdp2` (accelerate would ignore FSDP there).
    - accelerate's FSDP2 (GPUs; read from accelerate 1.15's code, not run here): accelerate's
      own preparation, given the transformers model inside the PEFT wrapper, so that it becomes
      the root unit (``PeftModel.generate`` calls it directly; with the wrapper as root,
      generation fails on a not-gathered shard, checked with accelerate's ``fsdp2_prepare_model``
      on CPU), and given a placeholder optimiser, because accelerate's FSDP2 ``prepare`` takes a
      model only together with an optimiser. zeda builds each stage's optimiser afterwards on
      the sharded parameters (`prepare_optimizer`).
    - Everything else (one process, DDP, DeepSpeed): ``accelerator.prepare``.

    Returns:
        The module the training step calls (the student itself when sharded in place).
    """
    if gradient_checkpointing:
        enable_activation_checkpointing(student)
    plugin = cpu_fsdp2_plugin(accelerator.distributed_type)
    if plugin is not None:
        if accelerator.mixed_precision != "no":
            raise ZedaError("FSDP on CPU runs in the model's dtype: launch with --mixed_precision no")
        return shard_fsdp2(student, plugin)
    if accelerator.is_fsdp2:
        root = student.get_base_model() if hasattr(student, "get_base_model") else student
        placeholder = torch.optim.SGD([p for p in root.parameters() if p.requires_grad], lr=0.0)
        prepared, _ = accelerator.prepare(root, placeholder)
        if prepared is not root:  # e.g. torch.compile'd: the PEFT wrapper would bypass it
            raise ZedaError("accelerate returned a new module for FSDP2; run without dynamo/torch.compile")
        _mark_fsdp_managed(student)
        return student
    return accelerator.prepare(student)


def prepare_optimizer(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Hand a stage's optimiser to accelerate.

    Under accelerate's FSDP2 the optimiser is built on the already-sharded parameters and
    ``accelerator.prepare`` refuses an optimiser without its model, so it is wrapped the way
    accelerate's own preparation wraps one (`accelerate.optimizer.AcceleratedOptimizer`; read from
    accelerate 1.15's code, not run here). Elsewhere: ``accelerator.prepare(optimizer)``.
    """
    if not accelerator.is_fsdp2:
        return accelerator.prepare(optimizer)
    from accelerate.optimizer import AcceleratedOptimizer

    return AcceleratedOptimizer(optimizer, device_placement=False, scaler=accelerator.scaler)


def _mark_fsdp_managed(model: nn.Module) -> None:
    """Mark the transformers model inside ``model`` as FSDP-managed, as transformers' own FSDP2
    does: ``generate`` then keeps every rank stepping until all have finished (``synced_gpus``).
    Ranks sample different prompts, and a rank that stopped early would leave the others waiting
    in an all-gather."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    root._is_fsdp_managed_module = True


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor shard (FSDP2, on CPU or GPU)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def root_gathered(model: nn.Module) -> Iterator[None]:
    """Hold a sharded model's root-unit parameters (embeddings, final norm, output head) gathered.

    Held-out scoring (`zeda.evaluation.heldout`) calls the decoder and the output head directly,
    bypassing the root module's forward, whose hooks would gather them; each decoder layer
    (its own unit) still gathers itself. One tiny root forward first initialises FSDP's state.
    A no-op for a model that is not sharded.
    """
    if not is_sharded(model):
        yield
        return
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(p for p in root.parameters()).device
    with torch.no_grad():
        root(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    root.unshard()
    try:
        yield
    finally:
        root.reshard()
