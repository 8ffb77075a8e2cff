"""The ZEDA authors' checkpoint format (TsinghuaC3I/ZEDA): what its ``config.json`` says about the
zero experts, read once for zeda (`zeda.zero.reference_format`) and the serving adapters.

Their conversion grows the router from E to E + Z rows and writes ``architectures``
(``Qwen3MoePlusPlusForCausalLM`` / ``Glm4MoeLitePlusPlusForCausalLM``), ``zce_nums`` (experts per
ZCE type, Z = their sum), ``zce_types`` (``"zero"``: zero-output experts) and ``use_zce_mask``
(True: zero-expert logits masked, i.e. the original model). zeda's routing equals theirs for these
two families, except that their group-limited selection puts zero experts into the groups, so only
``n_group == 1`` converts exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ARCHITECTURES", "MASK_BIAS", "reference_zero_experts"]

ARCHITECTURES: dict[str, str] = {
    "Qwen3MoePlusPlusForCausalLM": "qwen3_moe",
    "Glm4MoeLitePlusPlusForCausalLM": "glm4_moe_lite",
}
"""Reference architecture -> zeda family."""

MASK_BIAS = -1.0e4
"""Zero-logit bias standing for ``use_zce_mask = True`` (exp / sigmoid underflow to exactly 0)."""


def reference_zero_experts(data: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """The zero experts of a ZEDA-reference config, as zeda's ``config.zeda`` keys.

    Args:
        data: The checkpoint's ``config.json`` (a dict, or a config's ``__dict__``).
        source: Named in errors (the checkpoint path).

    Returns:
        ``{"num_zero_experts": Z}``, plus ``"zero_logit_bias": MASK_BIAS`` when ``use_zce_mask`` is
        true (their config class's default when the key is absent).

    Raises:
        ValueError: in one line, for ZCE types other than ``"zero"``, mismatched ``zce_nums`` /
            ``zce_types``, or a group-limited router (``n_group > 1``).
    """
    # Defaults of their config classes when a key is absent.
    nums = list(data.get("zce_nums") or [64])
    types = list(data.get("zce_types") or ["copy"])
    if len(nums) != len(types) or not nums:
        raise ValueError(f"{source}: zce_nums {nums} and zce_types {types} must have the same length")
    if any(t != "zero" for t in types):
        raise ValueError(
            f"{source}: zce_types {types} include experts that are not zero-output; only 'zero' is supported"
        )
    if int(data.get("n_group", 1) or 1) > 1:
        raise ValueError(
            f"{source}: n_group={data['n_group']}: the reference puts zero experts inside the routing "
            "groups, zeda keeps them outside; only n_group=1 converts exactly"
        )
    zeda: dict[str, Any] = {"num_zero_experts": int(sum(nums))}
    if data.get("use_zce_mask", True):
        zeda["zero_logit_bias"] = MASK_BIAS
    return zeda
