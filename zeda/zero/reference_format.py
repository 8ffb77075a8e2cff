"""The ZEDA authors' checkpoint format (TsinghuaC3I/ZEDA), read and written by zeda.

Their conversion script (``scripts/convert-hf-to-ZCE.py``) grows the router of an original
checkpoint from E to E + Z rows (``mlp.gate.weight`` and, for sigmoid routers,
``mlp.gate.e_score_correction_bias``; Gaussian rows from the per-column statistics of the old
ones), keeps the per-expert weight layout, and edits ``config.json``:

- ``architectures``: ``Qwen3MoePlusPlusForCausalLM`` or ``Glm4MoeLitePlusPlusForCausalLM``
  (``model_type`` stays ``qwen3_moe`` / ``glm4_moe_lite``; their config classes use
  ``qwen3_moe_plus_plus`` / ``glm4_moe_lite_plus_plus``, both are accepted);
- ``zce_nums`` (experts per ZCE type, Z = their sum), ``zce_types`` (``"zero"`` for
  zero-output experts; ``"copy"`` / ``"constant"`` exist there too) and ``use_zce_mask``
  (True: zero-expert logits are masked to -inf, i.e. the original model).

Their routing, as in their modeling files, equals zeda's for these two families:

- Qwen3-MoE++: softmax over all E + Z logits, top-k, optional renormalisation over the k chosen
  (zero slots included), zero experts output 0.
- GLM-4.7-Flash++: sigmoid scores, top-k on scores + ``e_score_correction_bias`` (zero experts
  have bias entries too), weights = the chosen sigmoid scores normalised over the k, times
  ``routed_scaling_factor``. Their group-limited selection puts zero experts *into* the groups,
  zeda's keeps them outside, so only ``n_group == 1`` (GLM-4.7-Flash) converts exactly.

``use_zce_mask = True`` maps to a zero-logit bias of `MASK_BIAS`, which gives zero experts a
softmax weight / sigmoid score of exactly 0 in fp32, as their -inf mask does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from zeda.errors import ZedaError
from zeda.families import get_spec
from zeda.zero.modeling import ZEDA_FORMAT_VERSION, zeda_classes
from zeda.zero.structure import current_zero_logit_bias, find_moe_layers
from zeda_routing.reference import ARCHITECTURES, MASK_BIAS, reference_zero_experts

_REFERENCE_KEYS = ("zce_nums", "zce_types", "use_zce_mask")
_DROPPED_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None


def is_reference_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local directory holding a ZEDA-reference checkpoint."""
    data = _read(Path(path))
    if not data:
        return False
    return any(a in ARCHITECTURES for a in data.get("architectures") or []) or str(
        data.get("model_type", "")
    ).endswith("_plus_plus")


def _family(data: dict[str, Any], source: str) -> str:
    for arch in data.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    base = str(data.get("model_type", "")).removesuffix("_plus_plus")
    if base in ARCHITECTURES.values():
        return base
    raise ZedaError(
        f"{source}: ZEDA-reference architecture {data.get('architectures')} is not supported; "
        f"zeda converts {', '.join(ARCHITECTURES)}"
    )


def reference_to_zeda_config(data: dict[str, Any], source: str = "checkpoint") -> Any:
    """The ``zeda_<family>`` config equivalent to a ZEDA-reference ``config.json`` dict.

    Raises:
        ZedaError: for unsupported architectures, ZCE types other than ``"zero"`` or a
            group-limited router whose zero experts would sit inside the groups.
    """
    family = _family(data, source)
    try:
        zero = reference_zero_experts(data, source)
    except ValueError as err:
        raise ZedaError(str(err)) from None
    cfg_cls, lm_cls = zeda_classes(family)
    kwargs = {k: v for k, v in data.items() if k not in _REFERENCE_KEYS + _DROPPED_KEYS}
    config = cfg_cls(**kwargs)
    config.architectures = [lm_cls.__name__]
    config.zeda = {
        "num_zero_experts": zero["num_zero_experts"],
        "base_model_type": family,
        "seed": None,
        "format_version": ZEDA_FORMAT_VERSION,
        "converted_from": "zeda-reference",
    }
    if "zero_logit_bias" in zero:
        config.zeda["zero_logit_bias"] = zero["zero_logit_bias"]
    return config


def load_reference(path: str | Path, dtype: Any = None, **kwargs: Any) -> nn.Module:
    """Load a ZEDA-reference checkpoint as zeda's ``Zeda<Family>ForCausalLM``.

    The weights load unchanged: their per-expert layout is the one transformers converts for the
    base family, and their grown ``mlp.gate`` tensors are zeda's grown router tensors.

    Raises:
        ZedaError: for an unsupported configuration or missing/mismatched weights.
    """
    data = _read(Path(path))
    if data is None:
        raise ZedaError(f"{path} has no readable config.json")
    config = reference_to_zeda_config(data, str(path))
    _, lm_cls = zeda_classes(config.zeda["base_model_type"])
    if dtype is not None:
        kwargs["dtype"] = dtype
    return lm_cls.from_pretrained(str(path), config=config, **kwargs)


def check_exportable(model: nn.Module) -> None:
    """Refuse a model the reference format cannot express, with one line.

    Raises:
        ZedaError: for other families, a group-limited router with ``n_group > 1``, or a
            zero-logit bias other than 0 (or `MASK_BIAS` on every layer).
    """
    config = model.config
    family = config.model_type.removeprefix("zeda_")
    if family not in ARCHITECTURES.values():
        raise ZedaError(
            f"the zeda-reference format exists for {', '.join(sorted(set(ARCHITECTURES.values())))}, "
            f"not {family}; export it with format='zeda'"
        )
    if get_spec(family).router_kind == "sigmoid_bias" and int(getattr(config, "n_group", 1) or 1) > 1:
        raise ZedaError(
            f"n_group={config.n_group}: the zeda-reference format groups zero experts differently"
        )
    bias = current_zero_logit_bias(model)
    if bias not in (None, MASK_BIAS):
        raise ZedaError(
            f"zero_logit_bias {bias} has no equivalent in the zeda-reference format; export with format='zeda'"
        )


def save_reference(model: nn.Module, out: Path) -> None:
    """Write ``model`` (a merged injected model) in the ZEDA-reference format into ``out``.

    transformers already saves the per-expert weight layout the reference uses; only
    ``config.json`` is rewritten.
    """
    check_exportable(model)
    model.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    zeda_meta = data.pop("zeda", {}) or {}
    family = zeda_meta.get("base_model_type") or data["model_type"].removeprefix("zeda_")
    data["model_type"] = family
    data["architectures"] = [a for a, f in ARCHITECTURES.items() if f == family]
    data["zce_nums"] = [int(find_moe_layers(model)[0].router.num_zero_experts)]
    data["zce_types"] = ["zero"]
    data["use_zce_mask"] = current_zero_logit_bias(model) == MASK_BIAS
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
