"""Training-free slot-dropping baselines, calibrated to a measured FLOP budget.

The baselines answer "what would we get without distillation?": at the same measured share of
routed top-k slots skipped (so the same routed-expert FLOPs), how good is the original model
when it simply drops its weakest slots? The rules (`POLICY_KINDS`):

- ``keep_top_m``: keep the ``m`` highest-weight slots per token (static, discrete);
- ``top_p``: keep the smallest weight-sorted prefix whose normalised weight reaches ``p``
  (dynamic routing, as in top-p MoE routing);
- ``threshold``: keep slots whose normalised weight is at least ``t`` (drop low-weight slots);
- ``adaptive_k``: entropy-guided adaptive k (`EntropyAdaptiveK`): per token, the number of
  slots kept grows with the entropy of the router's distribution over the real experts.

The kept weights are rescaled to the original total of the k weights; the ``*_no_renorm``
variants (``top_p_no_renorm``, ``threshold_no_renorm``, ``keep_top_m_no_renorm``) keep them as
they are, so the dropped weight is simply lost (as zeda's zero experts do).

`attach_router_policy` turns an *original* model's routers into zeda's router subclass with
``Z = 0`` so that the policies and ``forced_zero_share`` work on it and `RouterTelemetry` counts
every dropped slot as skipped; with no policy its logits are bit-identical to the original.
An injected model needs no attaching: inside `zeda.teacher_mode` its routers already are the
original routers and honour ``slot_policy``.

`calibrate_rule` finds the policy value whose measured skipped-slot share matches a target (bisection
on the continuous rules; the discrete ``keep_top_m`` reports the closest achievable share).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from zeda.errors import ZedaError
from zeda.evaluation.config import BASELINE_KINDS
from zeda.families import spec_for_model
from zeda.zero.inject import find_moe_layers, is_injected
from zeda.zero.routing import router_settings, zero_routers
from zeda.zero.structure import attach_zero_router
from zeda.zero.telemetry import RouterTelemetry
from zeda_routing import SlotPolicy, entropy_keep_count, keep_strongest, rescale_kept, solve_share

logger = logging.getLogger(__name__)

_NO_RENORM = "_no_renorm"
_RULES = ("keep_top_m", "top_p", "threshold")
POLICY_KINDS: tuple[str, ...] = BASELINE_KINDS
"""The training-free baselines `calibrate_rule` knows."""

__all__ = [
    "POLICY_KINDS",
    "Calibration",
    "EntropyAdaptiveK",
    "apply_policy",
    "attach_router_policy",
    "calibrate_rule",
    "make_policy",
    "measure_share",
]


@dataclass(frozen=True)
class EntropyAdaptiveK:
    """Entropy-guided adaptive k: confident tokens keep fewer of their k slots.

    For each token, ``h`` is the entropy of the router's distribution over the E real experts
    (softmax of the logits; normalised sigmoid scores for sigmoid routers), divided by
    ``log E`` so that ``h`` lies in [0, 1]. With ``k - 1`` thresholds ``tau_j = j * s / k``
    (``j = 1 .. k-1``) on ``h``, the token keeps ``1 + #{j : h > tau_j}`` of its highest-weight
    slots, i.e. ``clamp(ceil(k * h / s), 1, k)``. The scale ``s = value / (1 - value)`` is the one
    knob that `calibrate_rule` matches to a skipped share: ``value = 0`` keeps every slot, ``value
    -> 1`` keeps only the top-1 slot.

    Attributes:
        value: The calibrated knob in [0, 1].
        renormalize: Rescale kept weights to the original total of the k weights.
    """

    value: float
    renormalize: bool = True
    kind: str = "adaptive_k"

    def keep_count(self, logits: torch.Tensor, router_kind: str, k: int) -> torch.Tensor:
        """Slots each token keeps (`zeda_routing.entropy_keep_count`).

        Args:
            logits: ``(T, E)`` router logits over the real experts.
            router_kind: The router's routing kind (its distribution over the experts).
            k: Routed slots per token.

        Returns:
            ``(T,)`` int64 counts in ``1..k``.
        """
        return entropy_keep_count(logits, router_kind, k, self.value)

    def hook(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        """Router forward hook: drop each token's weakest slots beyond its entropy-chosen count.

        Args:
            module: A zeda router (teacher mode or ``Z = 0``).
            args: The router's inputs (unused).
            output: ``(logits (T, E[+Z]), weights (T, k), indices (T, k))``.

        Returns:
            The output with dropped slots at index ``E`` and weight 0.
        """
        logits, weights, indices = output
        e, k = module.num_experts, indices.shape[-1]
        keep_n = self.keep_count(logits.reshape(-1, logits.shape[-1])[:, :e], module.zeda_router_kind, k)
        keep = keep_strongest(weights, indices < e, keep_n)
        if self.renormalize:
            weights = rescale_kept(weights, keep)
        return logits, weights.masked_fill(~keep, 0), indices.masked_fill(~keep, e)


BaselinePolicy = SlotPolicy | EntropyAdaptiveK


def make_policy(kind: str, value: float) -> BaselinePolicy:
    """The policy of baseline ``kind`` (one of `POLICY_KINDS`) at ``value``."""
    if kind == "adaptive_k":
        return EntropyAdaptiveK(float(value))
    if kind.endswith(_NO_RENORM):
        return SlotPolicy(kind.removesuffix(_NO_RENORM), float(value), renormalize=False)  # type: ignore[arg-type]
    return SlotPolicy(kind, float(value))  # type: ignore[arg-type]


@contextlib.contextmanager
def apply_policy(model: nn.Module, policy: BaselinePolicy | None) -> Iterator[None]:
    """Apply ``policy`` to every zeda router of ``model`` while the context is open.

    A `SlotPolicy` is set as the routers' ``slot_policy``. `EntropyAdaptiveK` needs the router's
    full logits, which only the router's output carries, so it runs as a forward hook placed
    before any other hook (telemetry then sees its drops); the routers get a keep-everything
    ``slot_policy`` so that telemetry knows a policy is active on them.
    """
    if not isinstance(policy, EntropyAdaptiveK):
        with router_settings(model, slot_policy=policy):
            yield
        return
    routers = list(zero_routers(model))
    keep_all = SlotPolicy("keep_top_m", float(max((r.top_k for r in routers), default=1)), renormalize=False)
    handles = [r.register_forward_hook(policy.hook, prepend=True) for r in routers]
    try:
        with router_settings(model, slot_policy=keep_all):
            yield
    finally:
        for handle in handles:
            handle.remove()


def attach_router_policy(model: nn.Module) -> nn.Module:
    """Convert an original (not injected) model's routers to zeda's router class with ``Z = 0``.

    The routers keep their weights and their exact forward (``num_zero_experts = 0`` means the
    family's own router forward runs), gain the ``slot_policy`` / ``forced_zero_share`` knobs
    and report to `RouterTelemetry`. The experts are told to skip the sentinel index ``E`` that
    a dropped slot carries. The model is *not* marked as a zeda model (its config and class are
    untouched) and the call is idempotent. Already-injected models are returned unchanged: their
    routers honour slot policies in `zeda.teacher_mode`.

    Args:
        model: A transformers MoE causal LM of a supported family (PEFT wrappers allowed).

    Returns:
        ``model`` itself, modified in place.

    Raises:
        ZedaError: for an unsupported family or a model without MoE layers.
    """
    if is_injected(model):
        return model
    spec = spec_for_model(model)
    layers = find_moe_layers(model, spec)
    if not layers:
        raise ZedaError(
            f"{type(model).__name__} has no MoE layers; slot-dropping baselines need an MoE model"
        )
    for layer in layers:
        attach_zero_router(layer, spec)
    if not spec.eager_skips_sentinel:
        impl = getattr(model.config, "_experts_implementation", None)
        if impl in (None, "eager"):
            logger.info(
                "%s's eager experts cannot skip dropped slots; using zeda's loop backend", spec.model_type
            )
            base = getattr(model, "get_base_model", lambda: model)()
            base.set_experts_implementation("zeda")
    return model


@dataclass
class Calibration:
    """The outcome of `calibrate_rule`.

    Attributes:
        kind: The policy kind.
        value: The chosen policy value (``m`` for keep_top_m).
        target_share: The skipped-slot share asked for.
        achieved_share: The skipped-slot share measured with ``value`` on the calibration batches.
        evaluations: Forward sweeps over the calibration batches that the search used.
    """

    kind: str
    value: float
    target_share: float
    achieved_share: float
    evaluations: int

    @property
    def policy(self) -> BaselinePolicy:
        """The calibrated policy (`SlotPolicy` or `EntropyAdaptiveK`); apply it with `apply_policy`."""
        return make_policy(self.kind, self.value)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)


def _batches(batches: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(batches, torch.Tensor):
        return [batches if batches.dim() == 2 else batches[None]]
    return [b if b.dim() == 2 else b[None] for b in batches]


@torch.no_grad()
def measure_share(
    model: nn.Module, batches: torch.Tensor | Iterable[torch.Tensor], policy: BaselinePolicy | None = None
) -> RouterTelemetry:
    """Run ``model`` over ``batches`` with ``policy`` set on every zeda router; return the telemetry.

    Args:
        model: A model whose routers are zeda routers (injected, or `attach_router_policy`).
        batches: ``(B, T)`` token-id tensors (or one such tensor).
        policy: The policy to apply (None: routers as they are).

    Returns:
        The `RouterTelemetry` of those forwards (``zero_share`` = skipped share of routed slots).
    """
    device = next(model.parameters()).device
    with apply_policy(model, policy), RouterTelemetry(model) as tel:
        for ids in _batches(batches):
            # Only the routing is measured: the output head runs on the last position alone, so
            # no (B, T, V) logits are formed at a real vocabulary.
            model(input_ids=ids.to(device), logits_to_keep=1)
    return tel


def calibrate_rule(
    model: nn.Module,
    policy_kind: str,
    target_share: float,
    batches: torch.Tensor | Sequence[torch.Tensor],
    tol: float = 0.004,
    max_iter: int = 12,
) -> Calibration:
    """Find the policy value whose measured skipped-slot share matches ``target_share``.

    The share is measured with `RouterTelemetry` (the same counter as the converted model's
    FLOPs), so the baseline and the converted model are compared at matched measured FLOPs.
    ``top_p``, ``threshold`` and ``adaptive_k`` are searched by bisection (share falls with
    ``p``, rises with ``t`` and with the adaptive-k knob); ``keep_top_m`` is discrete and returns
    the ``m`` whose share is closest. Renormalisation does not change which slots are dropped, so
    a ``*_no_renorm`` kind lands on the same value as its renormalised twin. The top-1 slot is
    always kept, so no rule can skip more than ``(k-1)/k`` of the slots.

    Run it inside `zeda.teacher_mode` for an injected model (the baseline is the original
    model's routing); attach an original model first with `attach_router_policy`.

    Args:
        model: The model to calibrate on.
        policy_kind: One of `POLICY_KINDS`.
        target_share: Skipped-slot share in [0, 1] to match (beyond ``(k-1)/k`` the closest
            reachable share is returned).
        batches: Calibration token ids, ``(B, T)`` tensors.
        tol: Stop when the measured share is within this of the target.
        max_iter: Bisection steps at most.

    Returns:
        A `Calibration` with the value and the achieved share.

    Raises:
        ZedaError: for an unknown kind, a target outside [0, 1] or a model without zeda routers.
    """
    if policy_kind not in POLICY_KINDS:
        raise ZedaError(f"unknown baseline {policy_kind!r}; use one of {', '.join(POLICY_KINDS)}")
    if not (0.0 <= target_share <= 1.0) or math.isnan(target_share):
        raise ZedaError(f"target share {target_share} must be in [0, 1]")
    routers = list(zero_routers(model))
    if not routers:
        raise ZedaError("model has no zeda routers; call zeda.baselines.attach_router_policy(model) first")
    batches = _batches(batches)
    k = routers[0].top_k
    n_eval = 0

    def share(value: float) -> float:
        nonlocal n_eval
        n_eval += 1
        return measure_share(model, batches, make_policy(policy_kind, value)).zero_share

    if policy_kind.startswith("keep_top_m"):
        best = None
        for m in range(k, 0, -1):
            s = share(float(m))
            if best is None or abs(s - target_share) < abs(best[1] - target_share):
                best = (float(m), s)
            if s >= target_share:
                break
        assert best is not None
        return Calibration(policy_kind, best[0], target_share, best[1], n_eval)

    # top_p: share decreases with p (p=1 keeps all, p→0 keeps only top-1).
    # threshold, adaptive_k: share increases with the value (0 keeps all, 1 keeps only top-1).
    # The end points are known without a forward: every slot kept (share 0) at one end, only
    # the top-1 slot (share (k-1)/k) at the other.
    increasing = not policy_kind.startswith("top_p")
    top1 = (k - 1) / k
    value, achieved, _ = solve_share(
        share,
        target_share,
        tol=tol,
        max_iter=max_iter,
        ends=(0.0, top1) if increasing else (top1, 0.0),
        increasing=increasing,
    )
    if abs(achieved - target_share) > max(tol, 0.02):
        logger.warning(
            "%s reaches a skipped share of %.3f, not the target %.3f (reachable: 0..%.3f)",
            policy_kind,
            achieved,
            target_share,
            (k - 1) / k,
        )
    return Calibration(policy_kind, value, target_share, achieved, n_eval)
