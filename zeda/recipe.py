"""Recipe parsing behind `zeda.config`: YAML layers merged into an OmegaConf structured config.

A *layer* is one nested ``{section: {key: value}}`` mapping: a recipe file, one file of a ``base:``
chain, or a list of ``key=value`` overrides. Layers are merged in order into
``OmegaConf.structured(RunConfig)``, which refuses unknown keys and converts values to the field
types; this module adds what zeda promises on top: one-line `ZedaError` messages that name the
key and suggest the closest valid one, YAML errors with line and column, the exclusive-key rule,
and a scalar accepted where a list is expected. It never imports `zeda.config` (which imports it):
the sections are passed in as ``{name: dataclass}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from zeda.errors import ZedaError

logger = logging.getLogger(__name__)

Sections = Mapping[str, type]

#: Pairs of dotted keys that must not both be set; setting one in a later layer clears the other.
EXCLUSIVE_KEYS: tuple[tuple[str, str], ...] = (("balance.w", "balance.target_zero_share"),)

#: Extra hints for keys people commonly bring from other trainers.
KEY_HINTS: dict[str, str] = {
    "max_steps": "'stage1.steps' or 'stage2.steps' (steps are per stage)",
    "steps": "'stage1.steps' or 'stage2.steps' (steps are per stage)",
    "learning_rate": "'stage1.lr' or 'stage2.lr' (learning rates are per stage)",
    "lr": "'stage1.lr' or 'stage2.lr' (learning rates are per stage)",
    "num_zero": "'inject.num_zero_experts'",
    "zero_experts": "'inject.num_zero_experts'",
    "target_share": "'balance.target_zero_share'",
}

#: Keys that older zeda versions wrote into run directories; read with a warning and ignored.
RETIRED_KEYS: dict[str, str] = {"export.merge_lora": "export always merges LoRA adapters"}


def valid_keys(sections: Sections) -> list[str]:
    """Every dotted key of ``sections``, in schema order."""
    return [f"{name}.{f.name}" for name, cls in sections.items() for f in dataclasses.fields(cls)]


def unknown_key(path: str, sections: Sections) -> ZedaError:
    """``unknown config key 'x'; did you mean 'y'?`` (closest by full key and by last component)."""
    candidates = valid_keys(sections) + ([] if "." in path else list(sections))
    last = path.rsplit(".", 1)[-1]
    best, best_score = None, 0.0
    for cand in candidates:
        full = difflib.SequenceMatcher(None, path, cand).ratio()
        tail = difflib.SequenceMatcher(None, last, cand.rsplit(".", 1)[-1]).ratio()
        if (full + tail) / 2 > best_score:
            best, best_score = cand, (full + tail) / 2
    if last in KEY_HINTS and best_score < 0.95:
        hint = f"did you mean {KEY_HINTS[last]}?"
    elif best is not None and best_score >= 0.55:
        hint = f"did you mean {best!r}?"
    else:
        hint = f"valid keys start with one of: {', '.join(sections)}"
    return ZedaError(f"unknown config key {path!r}; {hint}")


def _field_type(sections: Sections, section: str, name: str) -> Any:
    cls = sections.get(section)
    return typing.get_type_hints(cls).get(name) if cls is not None else None


def _type_name(tp: Any) -> str:
    """``int | None`` -> ``"an integer or null"`` (for error messages only)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if typing.get_origin(tp) is list:
        return "a list of " + {bool: "booleans", int: "integers", float: "numbers", str: "strings"}[args[0]]
    if type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _translate(err: Exception, layer: Mapping[str, Any] | None, sections: Sections) -> ZedaError:
    """A one-line `ZedaError` for an OmegaConf error raised while merging (or resolving) ``layer``."""
    key = str(getattr(err, "full_key", None) or "")
    section, _, rest = key.partition(".")
    name, _, index = rest.partition("[")
    if isinstance(err, oc_errors.ConfigKeyError) and key:
        return unknown_key(key, sections)
    tp = _field_type(sections, section, name)
    typed = isinstance(err, oc_errors.ValidationError)
    if tp is None or not typed or isinstance(err, oc_errors.InterpolationResolutionError):
        first = (str(err).splitlines() or ["invalid value"])[0]
        return ZedaError(f"config key {key!r}: {first}" if key else f"config: {first}")
    value = (layer or {}).get(section, {}).get(name)
    if index and isinstance(value, list):
        i = int(index.rstrip("]"))
        value, tp = (value[i] if i < len(value) else None), typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return ZedaError(f"config key {key!r}: {value!r} is not {_type_name(tp)}{hint}")
    return ZedaError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def _normalise(data: Any, sections: Sections) -> dict[str, Any]:
    """Check the shape of one layer and fill in what OmegaConf reads differently.

    A scalar given for a list field becomes a one-element list and ``null`` an empty list; a
    retired key is dropped with a warning. Unknown keys inside a section are left for OmegaConf.
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ZedaError(f"a recipe must be a mapping of sections, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for section, values in data.items():
        if section not in sections:
            first = f".{next(iter(values))}" if isinstance(values, Mapping) and values else ""
            raise unknown_key(f"{section}{first}", sections)
        if not isinstance(values, Mapping | None):
            example = f"{section}.{dataclasses.fields(sections[section])[0].name}"
            raise ZedaError(
                f"config key {section!r}: is a section; expected a mapping of its keys (e.g. {example})"
            )
        out[section] = {}
        for name, value in (values or {}).items():
            key, tp = f"{section}.{name}", _field_type(sections, section, str(name))
            if key in RETIRED_KEYS:
                logger.warning("ignoring config key %r: %s", key, RETIRED_KEYS[key])
                continue
            if typing.get_origin(tp) is list:
                if isinstance(value, Mapping):
                    raise ZedaError(f"config key {key!r}: expected {_type_name(tp)}, got a mapping")
                value = [] if value is None else list(value) if isinstance(value, list | tuple) else [value]
            out[section][name] = value
    return out


def _is_set(layer: Mapping[str, Any], dotted: str) -> bool:
    section, name = dotted.split(".")
    values = layer.get(section)
    return isinstance(values, Mapping) and values.get(name) is not None


def merge(conf: DictConfig, data: Any, sections: Sections) -> DictConfig:
    """A new config: ``conf`` with the layer ``data`` merged on top (keys and types checked).

    For each pair in `EXCLUSIVE_KEYS`, a layer that sets exactly one key (non-null) clears the
    other; a layer that sets both is left for the section's ``validate()`` to refuse.

    Raises:
        ZedaError: on a malformed layer, an unknown key or a value of the wrong type.
    """
    layer = _normalise(data, sections)
    for a, b in EXCLUSIVE_KEYS:
        for mine, other in ((a, b), (b, a)):
            if _is_set(layer, mine) and not _is_set(layer, other):
                section, name = other.split(".")
                layer[section][name] = None
    try:
        return typing.cast(DictConfig, OmegaConf.merge(conf, layer))
    except (oc_errors.OmegaConfBaseException, TypeError) as e:
        raise _translate(e, layer, sections) from None


def build(conf: DictConfig, sections: Sections) -> Any:
    """The dataclass instance behind ``conf``, interpolations resolved, after its ``validate()``."""
    try:
        obj = OmegaConf.to_object(conf)
    except oc_errors.OmegaConfBaseException as e:
        raise _translate(e, None, sections) from None
    return obj.validate()  # type: ignore[union-attr]


def parse_overrides(overrides: Iterable[str] | str) -> dict[str, Any]:
    """Parse ``["a.b=1", ...]`` into a nested dict ``{"a": {"b": 1}}`` (values read as YAML).

    Raises:
        ZedaError: on an item without ``=``, an empty key part or a value that is not valid YAML.
    """
    conf = OmegaConf.create()
    for item in [overrides] if isinstance(overrides, str) else overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise ZedaError(f"override {item!r} must look like key=value (e.g. lora.r=16)")
        if not key or any(not p for p in key.split(".")):
            raise ZedaError(f"override {item!r} has an empty key; use a dotted key like lora.r=16")
        try:
            conf.merge_with_dotlist([f"{key}={raw}"])
        except yaml.YAMLError as e:
            msg = getattr(e, "problem", None) or "invalid YAML"
            raise ZedaError(f"override {item!r}: value is not valid YAML ({msg})") from None
        except oc_errors.OmegaConfBaseException as e:
            raise ZedaError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    return typing.cast(dict, OmegaConf.to_container(conf))


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ZedaError(f"recipe {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ZedaError(f"cannot read recipe {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ZedaError(f"recipe {str(path)!r}:{where}: {problem}") from None


def recipe_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, Any]]:
    """``(file, data)`` for the recipe at ``path`` and its ``base:`` chain, the deepest base first.

    Raises:
        ZedaError: on a missing or unreadable file, invalid YAML (with line and column), a
            recipe that is not a mapping, or an inheritance cycle.
    """
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ZedaError(f"recipe inheritance cycle: {chain}")
    data = _read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ZedaError(f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str) or not base.strip():
        raise ZedaError(f"recipe {str(path)!r}: 'base' must be a path to another recipe")
    return [*recipe_layers(path.parent / base, (*seen, resolved)), (path, data)]
