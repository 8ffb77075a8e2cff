"""Engine glue shared by the vLLM plugin and the SGLang models (no engine import, no transformers
import: the engine package passes its transformers classes in).

- `read_forced_share`: the forced zero share of a served model (config override or environment).
- `ServedZeda`: what a served export's config says about its zero experts, validated.
- `LayerRouting`: one served MoE layer's routing over ``E + Z`` experts.
- `AdapterConfigs`: the transformers config classes of zeda exports (``model_type =
  "zeda_<family>"``) for an adapter: served families subclass the family's config class; every
  other zeda family gets a class that refuses to load with one line naming the served ones.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from .kinds import RouterParams, get_kind
from .layers import MOE_LAYERS, layer_zero_logit_bias
from .reference import reference_zero_experts
from .slots import DROPPED, route

__all__ = ["AdapterConfigs", "LayerRouting", "ServedZeda", "read_forced_share"]

logger = logging.getLogger(__name__)


def read_forced_share(config: Any, env_var: str) -> float | None:
    """The forced zero share of a served model: ``config.zeda_forced_zero_share`` (engine
    overrides), else the environment variable ``env_var``; None when neither is set.

    Raises:
        ValueError: for a share outside [0, 1].
    """
    value = getattr(config, "zeda_forced_zero_share", None)
    if value is None:
        env = os.environ.get(env_var, "").strip()
        value = float(env) if env else None
    if value is None:
        return None
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"zeda forced zero share must be in [0, 1], got {share}")
    return share


class ServedZeda(NamedTuple):
    """What a served export's config says about its zero experts (`ServedZeda.read`).

    Attributes:
        num_zero_experts: Z.
        layer_bias: Zero-logit bias per MoE decoder layer index.
        forced_share: The forced zero share (`read_forced_share`), or None.
    """

    num_zero_experts: int
    layer_bias: dict[int, float]
    forced_share: float | None

    @classmethod
    def read(cls, config: Any, engine: str, env_var: str) -> ServedZeda:
        """Read and check ``config.zeda`` (with the engine overrides ``zeda_zero_logit_bias`` and
        ``zeda_forced_zero_share``), or a ZEDA-reference config's ``zce_*`` keys
        (`zeda_routing.reference`).

        Args:
            config: The served model's hf (text) config.
            engine: The adapter package, prefixed to every error (``"zeda_vllm"``).
            env_var: The environment variable that forces a zero share.

        Raises:
            ValueError: in one line, for a config without zero experts, a per-layer bias list
                without one entry per MoE layer, a forced share outside [0, 1], or a reference
                config zeda cannot serve exactly.
        """
        zeda = dict(getattr(config, "zeda", None) or {})
        if not zeda and getattr(config, "zce_nums", None) is not None:
            zeda = reference_zero_experts(vars(config), engine)  # a ZEDA-reference checkpoint
        z = int(zeda.get("num_zero_experts", 0))
        if z < 1:
            raise ValueError(
                f"{engine}: {config.model_type!r} config lacks zeda.num_zero_experts; is this a zeda export?"
            )
        bias = getattr(config, "zeda_zero_logit_bias", None)
        try:
            layer_bias = layer_zero_logit_bias(zeda.get("zero_logit_bias") if bias is None else bias, config)
            return cls(z, layer_bias, read_forced_share(config, env_var))
        except ValueError as err:
            raise ValueError(f"{engine}: {err}") from None


class LayerRouting:
    """One served MoE layer's routing over ``E`` real + ``Z`` zero experts (`zeda_routing.route`).

    Args:
        kind: The router kind (e.g. ``"softmax"``, ``"sigmoid_bias"``).
        num_experts: E, the real experts (the experts kernel's expert count).
        num_zero_experts: Z.
        top_k: k, slots per token.
        renormalize: Normalise the k chosen weights (zero slots included).
        zero_logit_bias: Added to this layer's zero-expert logits.
        forced_share: If set, route as the original model (zero experts out of selection) and
            drop exactly ``floor(share·T·k)`` of the lowest-weight slots, as zeda's
            ``teacher_mode`` + ``forced_zero_share``.
        gate: Module holding the ``(E + Z,)`` ``e_score_correction_bias`` of kinds that select
            with one, read at call time (the checkpoint is loaded into it after construction).
        num_expert_group: Groups of real experts (group-limited selection).
        topk_group: Groups kept per token.
        group_top: Scores summed per group to rank the groups (`zeda_routing.RouterParams`).
        routed_scaling_factor: Multiplies the weights (1.0 where the engine scales outputs).

    Raises:
        ValueError: for an unknown kind, or a kind that needs a correction bias without one.
    """

    def __init__(
        self,
        *,
        kind: str,
        num_experts: int,
        num_zero_experts: int,
        top_k: int,
        renormalize: bool,
        zero_logit_bias: float = 0.0,
        forced_share: float | None = None,
        gate: Any = None,
        num_expert_group: int = 1,
        topk_group: int = 1,
        group_top: int = 2,
        routed_scaling_factor: float = 1.0,
    ) -> None:
        if get_kind(kind).correction_bias and getattr(gate, "e_score_correction_bias", None) is None:
            raise ValueError(f"{kind} routers need a gate with e_score_correction_bias")
        self.kind = kind
        self.num_experts = num_experts
        self.num_zero_experts = num_zero_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.zero_logit_bias = zero_logit_bias
        self.forced_share = forced_share
        self.gate = gate
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.group_top = group_top
        self.routed_scaling_factor = routed_scaling_factor

    def params(self) -> RouterParams:
        """The layer's facts as `zeda_routing.route` reads them."""
        return RouterParams(
            num_experts=self.num_experts,
            top_k=self.top_k,
            renormalize=self.renormalize,
            zero_logit_bias=self.zero_logit_bias,
            correction_bias=getattr(self.gate, "e_score_correction_bias", None),
            num_expert_group=self.num_expert_group,
            topk_group=self.topk_group,
            group_top=self.group_top,
            routed_scaling_factor=self.routed_scaling_factor,
        )

    def route(self, logits: torch.Tensor, dropped_id: int = DROPPED) -> tuple[torch.Tensor, torch.Tensor]:
        """Route ``(T, E + Z)`` gate logits (static shapes, no host synchronisation).

        Args:
            logits: ``(T, E + Z)`` gate logits (``(T, E)`` with a forced share).
            dropped_id: The id of a dropped slot (see `zeda_routing.route`).

        Returns:
            ``(weights (T, k) float32, ids (T, k) int32)``; dropped slots have ``dropped_id``, weight 0.
        """
        return route(
            logits,
            self.kind,
            self.params(),
            zero_experts_enabled=self.forced_share is None,
            forced_share=self.forced_share,
            dropped_id=dropped_id,
        )


class AdapterConfigs:
    """The config classes of every zeda family for one engine adapter.

    Each class is set as an attribute of ``module`` under its name, so pickling works across the
    engine's processes.

    Args:
        module: The adapter module that owns the classes (its ``__name__``).
        engine: The adapter package, for messages (``"zeda_vllm"``).
        what: How the adapter calls itself (``"the vLLM plugin"``).
        served: The served families (base ``model_type``); their config classes are
            transformers' own (``CONFIG_MAPPING[family]``).
        transformers: The engine environment's ``transformers`` module (``PretrainedConfig`` is
            the base of the refusing classes; ``AutoConfig`` registers them).
        architectures: Served family -> architecture name, where zeda's causal-LM class is not
            named after the config class (``Qwen3_5MoeTextConfig`` -> ``ZedaQwen3_5MoeForCausalLM``).
        reasons: Refused family -> why, in a few words (added to its one-line refusal).

    Attributes:
        classes: ``{"zeda_<family>": config class}`` for every family in `zeda_routing.MOE_LAYERS`.
        architectures: Served family -> the architecture name a zeda export of it writes
            (``Zeda<Family>ForCausalLM``).
        unsupported: The refused families.
    """

    def __init__(
        self,
        module: str,
        engine: str,
        what: str,
        served: tuple[str, ...],
        transformers: Any,
        *,
        architectures: Mapping[str, str] | None = None,
        reasons: Mapping[str, str] | None = None,
    ) -> None:
        self.reasons = dict(reasons or {})
        self._transformers = transformers
        mapping = transformers.models.auto.configuration_auto.CONFIG_MAPPING
        self.engine, self.what = engine, what
        self.served = {family: mapping[family] for family in served}
        base = transformers.PretrainedConfig
        self.classes: dict[str, type] = {}
        for family in sorted(MOE_LAYERS):
            parent = self.served.get(family)
            if parent is not None:
                cls = type(f"Zeda{parent.__name__}", (parent,), {"model_type": f"zeda_{family}"})
            else:
                text = self.message(family)
                cls = type(
                    "Zeda" + "".join(p.capitalize() for p in family.split("_")) + "UnsupportedConfig",
                    (base,),
                    {
                        "model_type": f"zeda_{family}",
                        "__init__": _refuse(text),
                        "from_dict": classmethod(_refuse(text)),
                        "__doc__": f"A {family} zeda export, which {what} refuses to load.",
                    },
                )
            cls.__module__ = module
            setattr(sys.modules[module], cls.__name__, cls)
            self.classes[f"zeda_{family}"] = cls
        self.unsupported: tuple[str, ...] = tuple(f for f in sorted(MOE_LAYERS) if f not in self.served)
        self.architectures = {
            f: "Zeda" + c.__name__.removesuffix("Config") + "ForCausalLM" for f, c in self.served.items()
        } | dict(architectures or {})

    def message(self, family: str) -> str:
        """The one-line refusal of a zeda family this adapter does not serve (with its reason, if known)."""
        reason = self.reasons.get(family)
        return (
            f"{self.engine}: zeda family {family!r} (model_type 'zeda_{family}') is not supported by "
            f"{self.what}{f' ({reason})' if reason else ''}; supported families: {', '.join(sorted(self.served))}"
        )

    def register(self) -> list[str]:
        """Register the classes with ``AutoConfig``, leaving any existing registration of a model type.

        zeda registers its own ``zeda_<family>`` classes (with model classes for transformers'
        Auto classes); in a process that imports zeda and an engine, replacing them would break
        ``zeda.load``. zeda's classes subclass the same family config classes, so the engine
        reads them as well. Idempotent.

        Returns:
            The model types registered now.
        """
        from_pretrained = self._transformers.AutoConfig
        known = self._transformers.models.auto.configuration_auto.CONFIG_MAPPING
        done = [t for t in self.classes if t not in known]
        for model_type in done:
            from_pretrained.register(model_type, self.classes[model_type], exist_ok=True)
        logger.debug("%s registered zeda config classes: %s", self.engine, ", ".join(done))
        return done


def _refuse(text: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(text)

    return refuse
