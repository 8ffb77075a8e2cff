"""One default per router kind, picked from the model's ``config.json``.

A user's recipe may name only the model, the data and the target share
(``balance.target_zero_share``), and optionally the variant (``lora.enabled`` /
``lora.full_experts``). Every recipe read by `zeda.config.load_recipe` (``zeda run``, ``zeda
distill``, ``zeda plan``, ``zeda validate``, a resume) is resolved in layers, each winning over
the one before::

    dataclass defaults < the router kind's default for the variant < the recipe (and its base:)
    < key=value overrides

so whatever the user set, even to ``null``, stays as set. The router kind comes from the family
of the model's ``config.json`` (``zeda.families.get_spec(model_type).router_kind``; the weights
are not read), and the defaults live in this folder, one YAML file per kind (`FILES`): ``common``
keys, one block per variant (`VARIANTS`), and ``variant``, the one a recipe gets when it sets
neither ``lora.enabled`` nor ``lora.full_experts``. Their sections and keys are the recipe's own
(unknown keys fail), so changing a default is an edit of one file. The run writes the resolved
values into its ``recipe.yaml``, so a resume or an export reads exactly what was trained.

The variant a recipe asks for: ``lora.full_experts: true``, or ``lora.enabled: false`` without
``lora.full_experts: false``, is ``full_experts``; any other setting of those two keys is
``lora``. For a pair of mutually exclusive keys (`zeda.recipe.EXCLUSIVE_KEYS`, e.g.
``inject.num_zero_experts`` / ``inject.zero_ratio``) a recipe that sets either key keeps the
default of neither.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zeda.errors import ZedaError
from zeda.recipe import EXCLUSIVE_KEYS

logger = logging.getLogger(__name__)

__all__ = ["FILES", "VARIANTS", "RouterDefaults", "default_values", "resolve", "router_kind_of"]

HERE = Path(__file__).resolve().parent

#: Router kind (`zeda.families.base.RouterKind`) -> its defaults file in this folder.
FILES: dict[str, str] = {
    "softmax": "softmax.yaml",
    "softmax_group": "softmax.yaml",  # DeepSeek-V2: softmax with group-limited selection
    "topk_softmax": "softmax.yaml",  # gpt-oss: top-k on the raw logits, then softmax over the k
    "topk_sigmoid": "softmax.yaml",  # Llama 4: top-k on the raw logits (no bias), then sigmoid
    "sigmoid_bias": "sigmoid_bias.yaml",
}
#: ``lora``: LoRA on the routed experts; ``full_experts``: the routed experts trained in full.
VARIANTS: tuple[str, ...] = ("lora", "full_experts")


@dataclass(frozen=True)
class RouterDefaults:
    """The default a recipe received.

    Attributes:
        model_type: The model's ``model_type``.
        router_kind: Its family's router kind.
        variant: ``lora`` or ``full_experts``.
        file: The defaults file.
        applied: ``dotted key -> value`` for the keys the recipe did not set (what it received).
    """

    model_type: str
    router_kind: str
    variant: str
    file: Path
    applied: dict[str, Any] = field(default_factory=dict)

    def layer(self) -> dict[str, dict[str, Any]]:
        """``applied`` as a nested ``{section: {key: value}}`` recipe layer."""
        out: dict[str, dict[str, Any]] = {}
        for key, value in self.applied.items():
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        return out

    def describe(self) -> str:
        """One line naming the default, then one per key it set, e.g. for ``zeda validate``."""
        try:
            where = self.file.relative_to(HERE.parent.parent)
        except ValueError:
            where = self.file
        head = f"{self.router_kind} router ({self.model_type}), variant {self.variant}: {where}"
        if not self.applied:
            return f"{head} (the recipe sets every key itself)"
        return "\n".join([head, *(f"  {k} = {v!r}" for k, v in self.applied.items())])


def _flatten(layer: Any, where: str) -> dict[str, Any]:
    if layer is None:
        return {}
    if not isinstance(layer, Mapping):
        raise ZedaError(f"{where}: expected a mapping of recipe sections")
    out = {}
    for section, values in layer.items():
        if not isinstance(values, Mapping):
            raise ZedaError(f"{where}: section {section!r} must be a mapping of its keys")
        out.update({f"{section}.{name}": value for name, value in values.items()})
    return out


def default_values(router_kind: str, variant: str) -> dict[str, Any]:
    """``dotted key -> value`` of the default of ``router_kind`` for ``variant`` (common keys first).

    Raises:
        ZedaError: for an unknown kind or variant, or a malformed defaults file.
    """
    if router_kind not in FILES:
        raise ZedaError(f"no default for router kind {router_kind!r}; known: {', '.join(FILES)}")
    if variant not in VARIANTS:
        raise ZedaError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    path = HERE / FILES[router_kind]
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"variant", "common", "variants"}
    if unknown or set(data.get("variants") or {}) != set(VARIANTS):
        raise ZedaError(f"{path}: expected keys variant, common and variants ({', '.join(VARIANTS)})")
    return {
        **_flatten(data.get("common"), f"{path}: common"),
        **_flatten(data["variants"][variant], f"{path}: variants.{variant}"),
    }


def default_variant(router_kind: str) -> str:
    """The variant of ``router_kind``'s defaults file for recipes that choose none."""
    data = yaml.safe_load((HERE / FILES[router_kind]).read_text()) or {}
    variant = data.get("variant", "lora")
    if variant not in VARIANTS:
        raise ZedaError(f"{HERE / FILES[router_kind]}: variant must be one of {', '.join(VARIANTS)}")
    return variant


def _config_file(name_or_path: str) -> Path | None:
    """Where the model's ``config.json`` can be read: a local directory, the hub cache, zeda's
    built-in copy of a known hub model's config (``zeda/configs``), or (with network) the hub."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local / "config.json"
    if local.is_file() and local.suffix == ".json":
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name_or_path), "config.json")
        if isinstance(cached, str):
            return Path(cached)
    except Exception:  # noqa: BLE001 - not a valid hub id: nothing cached
        pass
    for builtin in sorted((HERE.parent / "configs").glob("*.json")):
        try:
            source = json.loads(builtin.read_text()).get("_source", "")
        except (OSError, ValueError):
            continue
        if source.split(" ")[0] == str(name_or_path):
            return builtin
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(name_or_path), "config.json"))
    except Exception:  # noqa: BLE001 - offline, no such repo, not a hub id
        return None


def _read_model_type(name_or_path: str) -> str | None:
    """The ``model_type`` in the model's ``config.json`` (the weights are not read), or None."""
    path = _config_file(name_or_path)
    try:
        return json.loads(path.read_text()).get("model_type") if path is not None else None
    except (OSError, ValueError, AttributeError):
        return None


def router_kind_of(name_or_path: str) -> tuple[str, str] | None:
    """``(model_type, router_kind)`` of a model from its ``config.json``, or None if unknown."""
    model_type = _read_model_type(name_or_path)
    if not model_type:
        return None
    from zeda.families import get_spec

    try:
        return model_type, get_spec(model_type).router_kind
    except ZedaError:
        return None


def choose_variant(mentioned: Mapping[str, Any], default: str) -> str:
    """The variant a recipe asks for through ``lora.enabled`` / ``lora.full_experts`` (see above)."""
    full, enabled = mentioned.get("lora.full_experts"), mentioned.get("lora.enabled")
    if full is True or (enabled is False and full is not False):
        return "full_experts"
    if "lora.full_experts" in mentioned or "lora.enabled" in mentioned:
        return "lora"
    return default


def resolve(name_or_path: str, mentioned: Mapping[str, Any]) -> RouterDefaults | None:
    """The default a recipe receives.

    Args:
        name_or_path: The recipe's ``model.name_or_path``.
        mentioned: ``dotted key -> value`` of every key the recipe, its bases and the overrides set.

    Returns:
        The `RouterDefaults`, or None when the model's config cannot be read or its family has no
        known router kind (the dataclass defaults apply then).
    """
    found = router_kind_of(name_or_path)
    if found is None:  # the run itself reports an unreadable model in one line, when it loads it
        logger.info(
            "router-kind defaults not applied: cannot read a supported model's config.json at %r",
            name_or_path,
        )
        return None
    model_type, kind = found
    if kind not in FILES:
        logger.warning(
            "router-kind defaults not applied: no default for router kind %r (zeda/defaults)", kind
        )
        return None
    variant = choose_variant(mentioned, default_variant(kind))
    values = default_values(kind, variant)
    taken = set(mentioned)
    for pair in EXCLUSIVE_KEYS:
        if taken & set(pair):
            taken |= set(pair)
    applied = {k: v for k, v in values.items() if k not in taken}
    return RouterDefaults(model_type, kind, variant, HERE / FILES[kind], applied)
