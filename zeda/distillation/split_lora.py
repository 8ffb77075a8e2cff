"""Split LoRA: PEFT's adapters on fused experts, applied per expert without a merged weight copy.

PEFT (``target_parameters``, `peft.tuners.lora.layer.ParamWrapper`) applies LoRA to a fused 3-D
expert weight by parametrising it as ``W + s·B·A`` for the length of each forward: the whole
``(E, out, in)`` stack is materialised (and, in training, kept for backward, with a gradient
buffer of the same size). zeda's experts backend can instead compute each selected expert as
``x·W[e]ᵀ + s·(x·A[e]ᵀ)·B[e]ᵀ`` on its own rows (`zeda.zero.experts.split_lora`).

PEFT keeps owning the adapters: their parameters, names, saving, loading, ``disable_adapter``
and merging at export are PEFT's. `enable_split_lora` changes only how an active adapter is
applied during a forward, in `lora_delta_context`: the one place that relies on PEFT internals
(tested by ``tests/distillation/test_split_lora.py``):

- ``ParamWrapper.forward`` applies its active adapters inside ``self._activate_lora(adapters)``
  (and calls the base layer directly when adapters are disabled or merged);
- ``ParamWrapper.get_delta_factors(adapter)`` returns ``(lhs, rhs, scaling)`` with
  ``scaling * lhs @ rhs`` equal to the adapter's delta, shaped like the parameter.

A wrapper falls back to PEFT's own (merged) path whenever the split cannot apply: several
active adapters, a 2-D parameter, or an experts backend that is not zeda's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from peft.tuners.lora.layer import ParamWrapper
from torch import nn

from zeda.zero.experts import LoraDelta, split_lora, splits_lora

logger = logging.getLogger(__name__)

__all__ = ["SplitLoraParamWrapper", "enable_split_lora", "lora_delta_context"]


@contextmanager
def lora_delta_context(wrapper: ParamWrapper, active_adapters: list[str]) -> Iterator[bool]:
    """Attach ``wrapper``'s adapter to its experts module as a low-rank delta, if it can split.

    Yields:
        True if the delta is attached (the experts backend applies it), False if the caller must
        apply the adapter itself (PEFT's merged path).
    """
    adapters = [a for a in active_adapters if a in wrapper.lora_A]
    experts = wrapper.get_base_layer()
    if len(adapters) != 1 or wrapper.num_experts <= 1 or not splits_lora(experts):
        yield False
        return
    lhs, rhs, scaling = wrapper.get_delta_factors(adapters[0])
    with split_lora(experts, wrapper.parameter_name, LoraDelta(lhs, rhs, float(scaling))):
        yield True


class SplitLoraParamWrapper(ParamWrapper):
    """PEFT's `ParamWrapper`, applying its adapter as a split low-rank delta where it can.

    Instances are PEFT's own wrappers whose class `enable_split_lora` switched to this subclass;
    everything but ``_activate_lora`` is PEFT's.
    """

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]) -> Iterator[None]:
        with lora_delta_context(self, active_adapters) as attached:
            if attached:
                yield
                return
        with super()._activate_lora(active_adapters):
            yield


def enable_split_lora(model: nn.Module, enabled: bool = True) -> int:
    """Switch the PEFT wrappers of fused expert weights in ``model`` to split LoRA (or back).

    Args:
        model: A PEFT model with ``target_parameters`` LoRA.
        enabled: True: split; False: PEFT's merged forward.

    Returns:
        The number of wrappers switched.
    """
    n = 0
    for module in model.modules():
        if enabled and type(module) is ParamWrapper:
            module.__class__ = SplitLoraParamWrapper
            n += 1
        elif not enabled and type(module) is SplitLoraParamWrapper:
            module.__class__ = ParamWrapper
            n += 1
    logger.debug("split LoRA %s on %d wrappers", "enabled" if enabled else "disabled", n)
    return n
