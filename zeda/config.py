"""Run configuration: one schema for recipe YAML files, ``key=value`` CLI overrides and code.

A recipe is a YAML mapping whose top-level keys are the sections of `RunConfig` (``model``,
``inject``, ``lora``, ``balance``, ``data``, ``stage1``, ``stage2``, ``train``, ``eval``,
``export``, ``hardware``) and whose second-level keys are the fields of those sections. The same fields can be
set from the command line with dotted overrides::

    zeda run recipes/reference/quickstart.yaml balance.target_zero_share=0.4 lora.r=16

Each section is a dataclass kept next to the code that reads it (`InjectConfig` in
``zeda/zero/config.py``, the training sections in ``zeda/distillation/config.py``, `EvalConfig` in
``zeda/evaluation/config.py``; `ModelConfig`, `ExportConfig` and `HardwareConfig`, read by
several parts, here); all are re-exported here. Recipes are parsed as OmegaConf
structured configs (``zeda/recipe.py``): override values are read as YAML (``true``, ``null``,
``2e-4``, ``[a, b]``) and converted to the field types, and interpolations such as
``${oc.env:DATA_DIR}/train.jsonl`` are resolved. Unknown keys, values of the wrong type or outside
a ``Literal`` and violated constraints raise a one-line `ZedaError` that names the key and
suggests the closest valid one.

A recipe may start with ``base: other.yaml`` (a path relative to the recipe) to inherit another
recipe; mappings are merged key by key, everything else (lists included) is replaced.

Mutually exclusive keys (``balance.w`` / ``balance.target_zero_share``): setting both in the same
place (one file, or one override list) is an error, but setting one in a child recipe or an
override clears the other one inherited from the base recipe, so ``balance.w=3`` works on top of a
recipe that sets ``target_zero_share``.

Relative paths inside a config (model, data files, output dir) are taken relative to the current
working directory, not to the recipe file.

A recipe read from a file also receives the default of its model's router kind for every key it
does not set (`zeda.defaults`): dataclass defaults < router-kind default < recipe < overrides.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from omegaconf import OmegaConf

from zeda import recipe
from zeda.distillation.config import (
    BalanceConfig,
    DataConfig,
    LoraConfig,
    Stage1Config,
    Stage2Config,
    TrainConfig,
)
from zeda.errors import ZedaError, check_config
from zeda.evaluation.config import EvalConfig
from zeda.recipe import EXCLUSIVE_KEYS as EXCLUSIVE_KEYS  # re-exported
from zeda.recipe import parse_overrides
from zeda.zero.config import InjectConfig

if TYPE_CHECKING:
    from zeda.defaults import RouterDefaults

DType = Literal["float32", "bfloat16", "float16", "auto"]


@dataclass
class ModelConfig:
    """Which model to load and how."""

    section: ClassVar[str] = "model"

    name_or_path: str = "evals/reference/model"
    """Hugging Face hub id or local directory of the original (teacher) MoE model."""
    dtype: DType = "float32"
    """Parameter dtype for student and teacher (``auto`` = the checkpoint's dtype)."""
    experts_implementation: str | None = None
    """transformers experts backend name; ``None`` uses zeda's own zero-aware backend."""
    trust_remote_code: bool = False
    """Passed to ``from_pretrained``; only needed for families not in transformers."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        check_config(bool(self.name_or_path.strip()), "model.name_or_path", "must not be empty")
        if self.experts_implementation is not None:
            check_config(
                bool(self.experts_implementation.strip()),
                "model.experts_implementation",
                "must be a backend name or null",
            )


@dataclass
class ExportConfig:
    """How the trained model is written out."""

    section: ClassVar[str] = "export"

    out_dir: str | None = None
    """Export directory; ``None`` means ``<train.output_dir>/export``."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        if self.out_dir is not None:
            check_config(bool(self.out_dir.strip()), "export.out_dir", "must not be empty (or null)")


@dataclass
class HardwareConfig:
    """The GPUs a recipe is written for; `zeda validate` then checks with `zeda plan` that it fits."""

    section: ClassVar[str] = "hardware"

    gpus: int | None = None
    """GPUs the recipe is written for (data parallel, FSDP full shard when > 1); ``null``: none
    named (CPU recipes). When set, `zeda validate` fails unless `zeda plan` predicts a training
    step within 90% of ``gpu_memory_gib`` per GPU, and `zeda plan` uses both by default."""
    gpu_memory_gib: float | None = None
    """Memory of one of those GPUs in GiB (e.g. 80 for an 80 GB H100/A100); set with ``gpus``."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        check_config(
            (self.gpus is None) == (self.gpu_memory_gib is None),
            "hardware.gpus",
            "set hardware.gpus and hardware.gpu_memory_gib together (or neither)",
        )
        if self.gpus is not None:
            check_config(self.gpus >= 1, "hardware.gpus", f"must be >= 1, got {self.gpus}")
        if self.gpu_memory_gib is not None:
            check_config(
                self.gpu_memory_gib > 0, "hardware.gpu_memory_gib", f"must be > 0, got {self.gpu_memory_gib}"
            )


@dataclass
class RunConfig:
    """A full zeda run: one section per concern. Build it with `load_recipe` or `from_dict`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The original MoE model."""
    inject: InjectConfig = field(default_factory=InjectConfig)
    """Zero-expert injection."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Trainable parameters."""
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    """Group balance loss (sparsity control)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """Stage 1 distillation."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """Stage 2 on-policy distillation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and bookkeeping."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Export."""
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    """The GPUs the recipe is written for (checked against `zeda plan`)."""

    def validate(self) -> RunConfig:
        """Check every section and the cross-section constraints; return ``self``.

        Raises:
            ZedaError: naming the first offending key.
        """
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            check_config(
                isinstance(section, cls), name, f"must be a {cls.__name__}, got {type(section).__name__}"
            )
            section.validate()
        training = self.stage1.enabled or self.stage2.enabled
        trainable = self.lora.enabled or self.lora.full_experts or self.lora.train_router
        check_config(
            not training or trainable,
            "lora.enabled",
            "nothing to train: enable lora.enabled, lora.full_experts or lora.train_router",
        )
        return self


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "inject": InjectConfig,
    "lora": LoraConfig,
    "balance": BalanceConfig,
    "data": DataConfig,
    "stage1": Stage1Config,
    "stage2": Stage2Config,
    "train": TrainConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
    "hardware": HardwareConfig,
}


# ---- Keys and docs ----


def valid_keys() -> list[str]:
    """Every settable dotted key, e.g. ``"balance.target_zero_share"``, in schema order."""
    return recipe.valid_keys(_SECTIONS)


def field_docs() -> dict[str, str]:
    """Dotted key -> one-line description, read from the attribute docstrings of the sections."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for name, cls in _SECTIONS.items():
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError):  # pragma: no cover - source unavailable (zipped install)
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[f"{name}.{node.target.id}"] = " ".join(nxt.value.value.split())
    return docs


# ---- dicts, overrides and files ----


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict of ``cfg`` (sections -> fields), safe to dump as YAML."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTIONS}


def from_dict(d: Mapping[str, Any] | None) -> RunConfig:
    """Build and validate a `RunConfig` from a (possibly partial) nested dict.

    Missing sections and keys take their defaults.

    Raises:
        ZedaError: on an unknown key, a value of the wrong type, or a violated constraint.
    """
    return recipe.build(recipe.merge(OmegaConf.structured(RunConfig), d, _SECTIONS), _SECTIONS)


def apply_overrides(cfg: RunConfig, overrides: Iterable[str] | str) -> RunConfig:
    """A new `RunConfig` with dotted ``key=value`` overrides applied (``cfg`` is not modified).

    Args:
        cfg: The base configuration.
        overrides: Items like ``"balance.target_zero_share=0.5"``, ``"eval.tasks=[a,b]"``.

    Raises:
        ZedaError: on a malformed item, unknown key, bad value or violated constraint.
    """
    layer = parse_overrides(overrides)
    return recipe.build(recipe.merge(OmegaConf.structured(cfg), layer, _SECTIONS), _SECTIONS)


def load_recipe(
    path: str | Path, overrides: Iterable[str] | str = (), *, router_defaults: bool = True
) -> RunConfig:
    """Load a recipe YAML (following ``base:``), apply ``key=value`` overrides and validate.

    Every key that neither the recipe (nor its bases) nor the overrides set takes the default of
    the model's router kind (`zeda.defaults`: read from the model's ``config.json``), then the
    dataclass default. The recipe must be valid on its own; the overrides are applied to it and
    the result is validated again.

    Args:
        path: The recipe file.
        overrides: Dotted ``key=value`` items applied on top, in order.
        router_defaults: Apply the router kind's default (False: the dataclass defaults only).

    Returns:
        The validated `RunConfig`.

    Raises:
        ZedaError: on a missing/invalid file, unknown key, bad value or violated constraint.
    """
    return resolve_recipe(path, overrides, router_defaults=router_defaults)[0]


def resolve_recipe(
    path: str | Path, overrides: Iterable[str] | str = (), *, router_defaults: bool = True
) -> tuple[RunConfig, RouterDefaults | None]:
    """`load_recipe`, and the router kind's default the recipe received (None if none applied)."""
    from zeda.defaults import resolve

    path = Path(path)
    layers = recipe.recipe_layers(path)
    override_layer = parse_overrides(overrides)

    def merged(base: Any) -> Any:
        conf = base
        for source, data in layers:
            try:
                conf = recipe.merge(conf, data, _SECTIONS)
            except ZedaError as e:
                raise ZedaError(f"{source}: {e}") from None
        return conf

    conf = merged(OmegaConf.structured(RunConfig))
    defaults = None
    if router_defaults:
        mentioned: dict[str, Any] = {}
        for layer in [*(data for _, data in layers), override_layer]:
            for section, values in (layer or {}).items():
                if isinstance(values, Mapping):
                    mentioned.update({f"{section}.{k}": v for k, v in values.items()})
        try:
            model = str(recipe.merge(conf, override_layer, _SECTIONS).model.name_or_path)
        except Exception:  # noqa: BLE001 - a bad override or interpolation is reported below
            model = None
        defaults = resolve(model, mentioned) if model else None
        if defaults is not None and defaults.applied:
            base = recipe.merge(OmegaConf.structured(RunConfig), defaults.layer(), _SECTIONS)
            conf = merged(base)
    try:
        cfg = recipe.build(conf, _SECTIONS)
    except ZedaError as e:
        raise ZedaError(f"{path}: {e}") from None
    return apply_overrides(cfg, overrides), defaults


def validate_recipe(path: str | Path) -> RunConfig:
    """Load and validate a recipe; return its `RunConfig` or raise a one-line `ZedaError`."""
    return explain_recipe(path)[0]


def explain_recipe(path: str | Path) -> tuple[RunConfig, RouterDefaults | None]:
    """`validate_recipe`, and the router kind's default the recipe received (``zeda validate``)."""
    cfg, defaults = resolve_recipe(path)
    reloaded = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    if reloaded != cfg:  # pragma: no cover - guards the YAML round trip of every value
        raise ZedaError(f"{path}: config does not survive a YAML round trip")
    return cfg, defaults


def save_recipe(cfg: RunConfig, path: str | Path) -> Path:
    """Write the full resolved ``cfg`` as YAML (no ``base:``); `load_recipe` reads back an equal config.

    The file is written to a temporary name and renamed, so a crash never leaves half a recipe.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# zeda run config (resolved; every key explicit)\n" + yaml.safe_dump(
        to_dict(cfg), sort_keys=False, default_flow_style=None
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ---- Resume ----

#: Dotted keys that may differ between a run's stored recipe and the recipe that resumes it:
#: more steps, everything measured or written after training, where the rollout cache lives,
#: and bookkeeping. ``stage1.steps``/``stage2.steps`` may only grow.
RESUMABLE_KEYS: frozenset[str] = frozenset(
    {
        "stage1.steps",
        "stage2.steps",
        "data.eval_file",
        "data.rollout_cache",
        "train.resume",
        "train.overwrite",
        "train.output_dir",
        "train.log_every",
        "train.save_every",
        "train.gradient_checkpointing",  # memory only: the same step, recomputed
        "lora.split",  # memory only: the same adapters, applied without a merged copy
        "train.eval_every",
        "train.patience",
        "train.verdict",
        *(k for k in valid_keys() if k.split(".")[0] in ("eval", "export", "hardware")),
    }
)

_GROWING_KEYS = ("stage1.steps", "stage2.steps")


def recipe_differences(old: RunConfig, new: RunConfig, allow: Iterable[str] = ()) -> list[str]:
    """One line per change from ``old`` (the run's stored recipe) to ``new`` that resume refuses.

    A key may change if it is in `RESUMABLE_KEYS` or ``allow``, or if it is a ``stage2.*`` key and
    ``old`` had stage 2 disabled (stage 2 never ran, so enabling or reshaping it trains nothing
    twice). Steps may grow but not shrink.

    Args:
        old: The recipe the run was started with (``<output_dir>/recipe.yaml``).
        new: The recipe asked to resume it.
        allow: Extra dotted keys the caller accepts changing (e.g. the learning rates when
            recovering from a non-finite stop).

    Returns:
        Lines like ``"lora.r: 8 -> 16"``; empty when the run may be resumed with ``new``.
    """
    free = RESUMABLE_KEYS | set(allow)
    fresh_stage2 = not old.stage2.enabled
    a, b = to_dict(old), to_dict(new)
    lines = []
    for key in valid_keys():
        section, name = key.split(".")
        x, y = a[section][name], b[section][name]
        if x == y or (fresh_stage2 and section == "stage2"):
            continue
        if key in _GROWING_KEYS and key in free and y < x:
            lines.append(f"{key}: {x!r} -> {y!r} (a resumed run may add steps, not remove them)")
        elif key not in free:
            lines.append(f"{key}: {x!r} -> {y!r}")
    return lines
