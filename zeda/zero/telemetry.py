"""Router telemetry: the measured share of skipped routed slots, per layer, with no second forward.

`RouterTelemetry(model)` hooks ``model``'s zeda routers while its context is open and counts the
routed top-k slots they emit. A slot counts as skipped when it carries the sentinel index ``E``
(a zero expert, a dropped slot of a `SlotPolicy`, or a forced share). Forwards in which a router
neither routes to zero experts nor applies a slot policy or forced share are not counted: those
are the teacher (`zeda.teacher_mode`) or an untouched original, not the model under test.

It also watches expert saturation: the share of tokens that go to the busiest real expert of a
layer. Crafted inputs can pile one expert's load onto every request, and zero experts change who
carries the load, so a layer whose busiest expert takes more than ``saturation_factor`` times
the mean expert load is flagged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from zeda.zero.checkpointing import is_recomputing
from zeda.zero.routing import zero_routers
from zeda_routing import LayerStats, total_zero_share

__all__ = ["LayerStats", "RouterTelemetry"]

DEFAULT_SATURATION_FACTOR = 4.0


class RouterTelemetry:
    """Collects per-layer skipped-slot shares, real-experts histograms and expert loads.

    Use as a context manager around the forwards to measure::

        with zeda.RouterTelemetry(model) as tel:
            model(**batch)
        tel.zero_share, tel.per_layer, tel.saturated_layers

    The collector registers a forward hook on each of ``model``'s zeda routers on ``__enter__``
    and removes them on ``__exit__``; several collectors may be open at once. Padding is
    excluded by passing each batch's mask to `set_mask` before its forward.

    Args:
        model: The model to measure (injected, a student built on one, or an original model
            prepared with `zeda.evaluation.baselines.attach_router_policy`).
        saturation_factor: A layer is flagged in `saturated_layers` when its busiest real
            expert's load exceeds this multiple of the mean expert load.
        count_original: Count every router forward, the original's too (teacher mode, an
            attached original): measures the original model's own expert loads.
    """

    def __init__(
        self,
        model: nn.Module,
        saturation_factor: float = DEFAULT_SATURATION_FACTOR,
        count_original: bool = False,
    ) -> None:
        self.model = model
        self.saturation_factor = float(saturation_factor)
        self.count_original = count_original
        self.layers: dict[int, LayerStats] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Count only tokens where ``mask`` (any shape flattening to ``(T,)``) is true; None counts all."""
        self._mask = None if mask is None else mask.reshape(-1).bool()

    def _hook(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if is_recomputing():  # an activation-checkpoint recompute: this forward was counted already
            return
        if not (
            self.count_original
            or module.routes_to_zero
            or module.slot_policy is not None
            or module.forced_zero_share is not None
        ):
            return
        indices = output[2].detach()
        if self._mask is not None and self._mask.numel() == indices.shape[0]:
            indices = indices[self._mask.to(indices.device)]
        self.layers.setdefault(module.zeda_layer_index, LayerStats()).add(indices, module.num_experts)

    @property
    def zero_share(self) -> float:
        """Share of all routed slots (all layers, all tokens) that did no expert work."""
        return total_zero_share(self.layers.values())

    @property
    def per_layer(self) -> dict[int, float]:
        """Skipped-slot share per MoE layer index."""
        return {i: s.zero_share for i, s in sorted(self.layers.items())}

    @property
    def real_experts_histogram(self) -> list[int]:
        """Tokens × layers histogram over the number of real experts used (index 0..k)."""
        out: list[int] = []
        for s in self.layers.values():
            out = [a + b for a, b in zip(out or [0] * len(s.real_per_token), s.real_per_token, strict=True)]
        return out

    @property
    def busiest_expert_share(self) -> dict[int, float]:
        """Per MoE layer index: the share of tokens that went to the layer's busiest real expert."""
        return {i: s.busiest_share for i, s in sorted(self.layers.items())}

    @property
    def load_ratio(self) -> dict[int, float]:
        """Per MoE layer index: the busiest real expert's load divided by the mean real-expert load
        (1.0 = perfectly even)."""
        return {i: s.saturation for i, s in sorted(self.layers.items())}

    @property
    def saturated_layers(self) -> dict[int, float]:
        """Layers whose busiest expert's load exceeds ``saturation_factor`` × the mean load.

        Returns:
            ``{layer index: busiest load / mean load}`` for the flagged layers.
        """
        return {
            i: s.saturation for i, s in sorted(self.layers.items()) if s.saturation > self.saturation_factor
        }

    def __enter__(self) -> RouterTelemetry:
        if self._handles:
            raise RuntimeError("this RouterTelemetry is already open")
        self._handles = [r.register_forward_hook(self._hook) for r in zero_routers(self.model)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
