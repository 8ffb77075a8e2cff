"""Recipe parsing behind `zeda.config`: YAML layers merged into an OmegaConf structured config.

A *layer* is one nested ``{section: {key: value}}`` mapping: a recipe file, one file of a ``base:``
chain, or a list of ``key=value`` overrides. Layers are merged in order into
``OmegaConf.structured(RunConfig)``, which refuses unknown keys and converts values to the field
types; this module adds what zeda promises on top: one-line `ZedaError` messages that name the
key and suggest the closest valid one, YAML errors with line and column, the exclusive-key rule,
and a scalar accepted where a list is expected. It never imports `zeda.config` (which imports it):
the sections are passed in as ``{name: dataclass}``.

Recipes are bounded before they are parsed: only regular files of at most `MAX_RECIPE_BYTES` are
read (never a device or a FIFO), YAML aliases may expand to at most `MAX_YAML_NODES` values (a
"billion laughs" is refused, not expanded), a ``base:`` chain is at most `MAX_BASE_DEPTH` deep,
and integer settings have upper bounds (`INT_BOUNDS`, else `DEFAULT_INT_BOUND`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import stat
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
EXCLUSIVE_KEYS: tuple[tuple[str, str], ...] = (
    ("balance.w", "balance.target_zero_share"),
    ("inject.num_zero_experts", "inject.zero_ratio"),
)

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

#: Largest recipe file read, in bytes.
MAX_RECIPE_BYTES = 2**20
#: Most values a recipe (or one override) may hold once its YAML aliases are expanded.
MAX_YAML_NODES = 100_000
#: Deepest ``base:`` chain.
MAX_BASE_DEPTH = 32
#: Upper bounds of integer settings (beyond them a run could never finish or fit anywhere).
INT_BOUNDS: dict[str, int] = {
    "stage1.steps": 10**7,
    "stage2.steps": 10**7,
    "data.seq_len": 2**20,
    "stage1.max_new_tokens": 2**20,
    "stage2.max_new_tokens": 2**20,
    "stage1.rollout_batch_size": 2**20,
    "stage2.num_prompts_per_step": 2**20,
    "train.batch_size": 2**20,
    "train.grad_accum": 2**20,
    "train.seed": 2**32 - 1,
    "inject.seed": 2**32 - 1,
    "inject.num_zero_experts": 2**16,
    "lora.r": 2**16,
    "lora.alpha": 2**16,
}
#: Upper bound of any other integer setting.
DEFAULT_INT_BOUND = 2**31 - 1

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
                if any(isinstance(v, Mapping | list | tuple) for v in value):
                    raise ZedaError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
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
    _check_int_bounds(obj, sections)
    return obj.validate()  # type: ignore[union-attr]


def _check_int_bounds(obj: Any, sections: Sections) -> None:
    for name, cls in sections.items():
        section = getattr(obj, name, None)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name, None)
            tp = hints.get(f.name)
            ints = tp is int or (
                typing.get_origin(tp) in (typing.Union, type(int | None)) and int in typing.get_args(tp)
            )
            if not ints or not isinstance(value, int) or isinstance(value, bool):
                continue
            key = f"{name}.{f.name}"
            bound = INT_BOUNDS.get(key, DEFAULT_INT_BOUND)
            if value > bound:
                shown = str(value) if value < 10**12 else f"{float(value):.3g}"
                raise ZedaError(f"config key {key!r}: {shown} is too large (at most {bound})")


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
        _check_yaml_size(raw, f"override {key}")
        try:
            conf.merge_with_dotlist([f"{key}={raw}"])
        except yaml.YAMLError as e:
            msg = getattr(e, "problem", None) or "invalid YAML"
            raise ZedaError(f"override {item!r}: value is not valid YAML ({msg})") from None
        except oc_errors.OmegaConfBaseException as e:
            raise ZedaError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    return typing.cast(dict, OmegaConf.to_container(conf))


def _expanded_size(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    """Values in ``node`` once its aliases are expanded, counting at most ``limit + 1``."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = limit + 1  # an alias back into a node being counted expands forever
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [x for pair in node.value for x in pair]
    else:
        children = []
    n = 1
    for child in children:
        n += _expanded_size(child, memo, limit)
        if n > limit:
            break
    memo[key] = min(n, limit + 1)
    return memo[key]


def _check_yaml_size(text: str, source: str) -> None:
    """Refuse YAML whose aliases expand beyond `MAX_YAML_NODES` values, before it is built."""
    if "*" not in text:  # no alias: the text's own size bounds it
        return
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # reported with line and column by the parser
    except RecursionError:
        raise ZedaError(f"{source}: YAML nested too deeply; write it flat") from None
    if node is not None and _expanded_size(node, {}, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ZedaError(
            f"{source}: YAML aliases expand to more than {MAX_YAML_NODES} values; "
            "write the values out instead of nesting aliases"
        )


def _read_yaml(path: Path) -> Any:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ZedaError(f"recipe {str(path)!r} not found") from None
    except OSError as e:
        raise ZedaError(f"cannot read recipe {str(path)!r}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ZedaError(f"recipe {str(path)!r} is not a regular file; pass a YAML file")
    if info.st_size > MAX_RECIPE_BYTES:
        raise ZedaError(
            f"recipe {str(path)!r} is {info.st_size} bytes, more than a recipe's {MAX_RECIPE_BYTES}; "
            "pass a recipe YAML file"
        )
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
        text = data.decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ZedaError(f"cannot read recipe {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise ZedaError(
            f"recipe {str(path)!r} is larger than {MAX_RECIPE_BYTES} bytes; pass a recipe YAML file"
        )
    try:
        _check_yaml_size(text, f"recipe {str(path)!r}")
        return yaml.safe_load(text)
    except RecursionError:
        raise ZedaError(f"recipe {str(path)!r}: YAML nested too deeply; write it flat") from None
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
    if len(seen) >= MAX_BASE_DEPTH:
        raise ZedaError(f"recipe {str(path)!r}: the base: chain is more than {MAX_BASE_DEPTH} recipes deep")
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
