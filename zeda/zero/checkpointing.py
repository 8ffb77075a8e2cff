"""Activation checkpointing per decoder layer, and how hooks tell a recompute from a real forward.

transformers checkpoints each decoder layer (``GradientCheckpointingLayer``) once
``activation_checkpointing_enable`` is called: in a training forward with gradients, the layer
keeps only its inputs, and backward runs the layer's forward again to rebuild what it needs.
Module hooks such as FSDP2's stay outside the checkpointed call. A forward without gradients
(the teacher pass, generation) runs as is: nothing of it is kept or recomputed.

The recompute runs the routers again, and with them every router hook. Each checkpointed call
is made with ``torch.utils.checkpoint``'s public ``context_fn``, whose second context wraps the
recompute only: inside it `is_recomputing` is true, so hooks that count routing decisions (the
balance loss's `RouterCapture`, `RouterTelemetry`) count each real forward once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

from torch import nn

__all__ = [
    "disable_activation_checkpointing",
    "enable_activation_checkpointing",
    "is_recomputing",
    "recomputing",
]

_RECOMPUTING: ContextVar[bool] = ContextVar("zeda_recomputing", default=False)


def is_recomputing() -> bool:
    """Whether the code running now is an activation-checkpoint recompute (inside backward)."""
    return _RECOMPUTING.get()


@contextmanager
def recomputing() -> Iterator[None]:
    """Mark the forwards inside as a recompute (`is_recomputing` is true there)."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
    # torch.utils.checkpoint: (context of the original forward, context of the recompute).
    return nullcontext(), recomputing()


def _root(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer of ``model`` (a transformers model or a PEFT wrapper).

    Non-reentrant ``torch.utils.checkpoint`` (gradients reach intermediate outputs used outside
    a layer, such as the router logits of the balance loss), with recomputes marked for
    `is_recomputing`. No input-embedding gradient hook is left installed: nothing before the
    first trained parameter needs a gradient.
    """
    root = _root(model)
    kwargs = {"use_reentrant": False, "context_fn": _context_fn}
    if hasattr(root, "activation_checkpointing_enable"):
        root.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 5.19 has only the older name
        root.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers makes the embeddings' output require grad for reentrant checkpointing; with
    # non-reentrant checkpointing it would only add a backward through the frozen first layers.
    root.disable_input_require_grads()


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo `enable_activation_checkpointing`."""
    root = _root(model)
    if hasattr(root, "activation_checkpointing_disable"):
        root.activation_checkpointing_disable()
    else:
        root.gradient_checkpointing_disable()
