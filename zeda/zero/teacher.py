"""Teacher mode: the frozen original model inside the same weights as the student."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peft.utils import ModulesToSaveWrapper
from torch import nn

from zeda.zero.routing import zero_routers


@contextlib.contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The frozen original inside the same weights: zero experts off, LoRA adapters off.

    Inside the context the logits are bit-identical (fp32) to the untouched original model:
    routers run their family's own forward on their first E rows and PEFT's
    ``disable_adapter()`` switches routers back to the frozen copies kept by ``modules_to_save``.
    Flags are restored on exit, also when the body raises.

    Args:
        model: An injected model or a student built on one (PEFT wrappers allowed).

    Yields:
        ``model`` itself.
    """
    routers = list(zero_routers(model))
    saved = [r.__dict__.get("zero_experts_enabled") for r in routers]
    adapter_ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    # Trainable copies made without a PeftModel (full expert fine-tuning) switch back too.
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper) and not m.disable_adapters]
    try:
        for r in routers:
            r.zero_experts_enabled = False
        with adapter_ctx:
            for w in wrappers:
                w.enable_adapters(False)
            try:
                yield model
            finally:
                for w in wrappers:
                    w.enable_adapters(True)
    finally:
        for r, old in zip(routers, saved, strict=True):
            if old is None:
                r.__dict__.pop("zero_experts_enabled", None)
            else:
                r.zero_experts_enabled = old
