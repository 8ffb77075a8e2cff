"""Run configuration: one schema for recipe YAML files, ``key=value`` CLI overrides and code.

A recipe is a YAML mapping whose top-level keys are the sections of `RunConfig` (``model``,
``inject``, ``lora``, ``balance``, ``data``, ``stage1``, ``stage2``, ``train``, ``eval``,
``export``) and whose second-level keys are the fields of those sections. The same fields can be
set from the command line with dotted overrides::

    zeda train recipes/reference/quickstart.yaml balance.target_zero_share=0.4 lora.r=16

Override values are parsed with ``yaml.safe_load`` (so ``true``, ``null``, ``2e-4``, ``[a, b]``
all work) and then type-checked and coerced against the dataclass field types. Unknown keys,
values of the wrong type, values outside a ``Literal`` and violated cross-field constraints all
raise a one-line `ZedaError` that names the key (and suggests the closest valid key).

A recipe may start with ``base: other.yaml`` (a path relative to the recipe) to inherit another
recipe; mappings are merged key by key, everything else (lists included) is replaced.

Mutually exclusive keys (``balance.w`` / ``balance.target_zero_share``): setting both in the same
place (one file, or one override list) is an error, but setting one in a child recipe or an
override clears the other one inherited from the base recipe, so
``balance.w=3`` works on top of a recipe that sets ``target_zero_share``.

Relative paths inside a config (model, data files, output dir) are taken relative to the current
working directory, not to the recipe file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from zeda.errors import ZedaError

__all__ = [
    "BalanceConfig",
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "InjectConfig",
    "LoraConfig",
    "ModelConfig",
    "RunConfig",
    "Stage1Config",
    "Stage2Config",
    "TrainConfig",
    "apply_overrides",
    "field_docs",
    "from_dict",
    "load_recipe",
    "parse_overrides",
    "save_recipe",
    "to_dict",
    "valid_keys",
    "validate_recipe",
]

DType = Literal["float32", "bfloat16", "float16", "auto"]
Stage1Mode = Literal["rollout", "text"]
KDKind = Literal["forward_kl", "reverse_kl", "nll"]
Stage2Loss = Literal["pg", "full_reverse_kl"]
LRSchedule = Literal["cosine", "constant"]

#: Pairs of dotted keys that must not both be set; setting one in a later layer clears the other.
EXCLUSIVE_KEYS: tuple[tuple[str, str], ...] = (("balance.w", "balance.target_zero_share"),)

#: Extra hints for keys people commonly bring from other trainers.
_KEY_HINTS: dict[str, str] = {
    "max_steps": "'stage1.steps' or 'stage2.steps' (steps are per stage)",
    "steps": "'stage1.steps' or 'stage2.steps' (steps are per stage)",
    "learning_rate": "'stage1.lr' or 'stage2.lr' (learning rates are per stage)",
    "lr": "'stage1.lr' or 'stage2.lr' (learning rates are per stage)",
    "num_zero": "'inject.num_zero_experts'",
    "zero_experts": "'inject.num_zero_experts'",
    "target_share": "'balance.target_zero_share'",
}


def _fail(path: str, msg: str) -> typing.NoReturn:
    raise ZedaError(f"config key {path!r}: {msg}")


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        _fail(path, msg)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


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
        _check(bool(self.name_or_path.strip()), "model.name_or_path", "must not be empty")
        if self.experts_implementation is not None:
            _check(
                bool(self.experts_implementation.strip()),
                "model.experts_implementation",
                "must be a backend name or null",
            )


@dataclass
class InjectConfig:
    """How zero experts are added to each MoE router."""

    section: ClassVar[str] = "inject"

    num_zero_experts: int | None = None
    """Zero experts Z added per MoE layer; ``None`` means E // 2 (E = real routed experts)."""
    seed: int = 0
    """Seed for the initialisation of the new router rows."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        if self.num_zero_experts is not None:
            _check(self.num_zero_experts >= 1, "inject.num_zero_experts", "must be >= 1 (or null for E/2)")

    def resolve_num_zero(self, num_real: int) -> int:
        """The number of zero experts Z for a model with ``num_real`` routed experts."""
        if self.num_zero_experts is not None:
            return self.num_zero_experts
        return max(1, num_real // 2)


@dataclass
class LoraConfig:
    """What is trained: LoRA on the expert FFNs (or full experts) and the router."""

    section: ClassVar[str] = "lora"

    enabled: bool = True
    """Train LoRA adapters on the routed experts' FFN weights."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    full_experts: bool = False
    """Fine-tune the expert FFN weights in full instead of LoRA (as the paper); needs enabled=false."""
    train_router: bool = True
    """Train the (extended) router weights in full."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        _check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _check(self.alpha >= 1, "lora.alpha", f"must be >= 1, got {self.alpha}")
        _check(
            not (self.enabled and self.full_experts),
            "lora.full_experts",
            "full_experts=true fine-tunes the experts in full; also set lora.enabled=false",
        )


@dataclass
class BalanceConfig:
    """The two-group (real vs zero experts) balance loss that sets the sparsity."""

    section: ClassVar[str] = "balance"

    alpha: float = 0.1
    """Balance loss coefficient (per MoE layer, summed over layers)."""
    w: float | None = None
    """Zero-group weight; equilibrium zero share is wZ/(wZ+E). ``None`` means 2.0 unless
    ``target_zero_share`` is set. Mutually exclusive with ``target_zero_share``."""
    target_zero_share: float | None = None
    """Desired share s of the top-k slots routed to zero experts, in (0, 1); sets
    w = s*E / (Z*(1-s)). Mutually exclusive with ``w``."""
    global_batch: bool = True
    """Form the expert-load fractions over the global batch (all micro-steps and ranks)."""

    DEFAULT_W: ClassVar[float] = 2.0

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        _check(self.alpha >= 0 and math.isfinite(self.alpha), "balance.alpha", "must be finite and >= 0")
        if self.w is not None:
            _check(self.w > 0 and math.isfinite(self.w), "balance.w", f"must be finite and > 0, got {self.w}")
        if self.target_zero_share is not None:
            s = self.target_zero_share
            _check(0.0 < s < 1.0, "balance.target_zero_share", f"must be in (0, 1), got {s}")
        _check(
            self.w is None or self.target_zero_share is None,
            "balance.w",
            "set either balance.w or balance.target_zero_share, not both",
        )

    def resolve_w(self, num_real: int, num_zero: int) -> float:
        """The zero-group weight w for E = ``num_real`` and Z = ``num_zero`` experts."""
        if self.target_zero_share is not None:
            from zeda.distillation.losses import w_for_target

            return w_for_target(self.target_zero_share, num_real, num_zero)
        return self.DEFAULT_W if self.w is None else float(self.w)

    def resolve_target_share(self, num_real: int, num_zero: int) -> float:
        """The equilibrium zero share wZ/(wZ+E) that this config aims at."""
        w = self.resolve_w(num_real, num_zero)
        return w * num_zero / (w * num_zero + num_real)


@dataclass
class DataConfig:
    """Training / evaluation text and prompts."""

    section: ClassVar[str] = "data"

    train_file: str = "evals/reference/data/train_sample.jsonl"
    """JSONL training text (stage 1 text mode) and prompt fallback."""
    eval_file: str = "evals/reference/data/validation.jsonl"
    """JSONL held-out text for perplexity / KL evaluation."""
    prompt_file: str | None = None
    """JSONL prompts for rollouts (stage 1 rollout mode, stage 2); ``None`` uses ``train_file``."""
    seq_len: int = 256
    """Tokens per training sequence (prompt + response in rollout mode)."""
    text_field: str = "text"
    """JSON field holding the text (or the prompt) in each JSONL record."""
    chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template when it has one."""
    max_prompts: int | None = None
    """Use at most this many prompts (``None`` = all)."""
    rollout_cache: str | None = None
    """Directory caching teacher rollouts between runs (``None`` = no cache)."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        _check(bool(self.train_file.strip()), "data.train_file", "must not be empty")
        _check(bool(self.eval_file.strip()), "data.eval_file", "must not be empty")
        _check(self.seq_len >= 8, "data.seq_len", f"must be >= 8, got {self.seq_len}")
        _check(bool(self.text_field.strip()), "data.text_field", "must not be empty")
        if self.max_prompts is not None:
            _check(self.max_prompts >= 1, "data.max_prompts", "must be >= 1 (or null for all)")


@dataclass
class Stage1Config:
    """Stage 1: token-level distillation from the frozen original model."""

    section: ClassVar[str] = "stage1"

    enabled: bool = True
    """Run stage 1."""
    mode: Stage1Mode = "text"
    """``text``: distil on ``data.train_file`` text; ``rollout``: on teacher-generated responses."""
    steps: int = 100
    """Optimizer steps."""
    lr: float = 2e-4
    """Peak learning rate."""
    kd: KDKind = "forward_kl"
    """Distillation loss: KL(teacher||student), KL(student||teacher), or NLL of the tokens."""
    nll_weight: float = 0.0
    """Weight of an extra NLL term on the training tokens (added to the KD loss)."""
    temperature: float = 1.0
    """Softmax temperature of the KD loss and of teacher sampling in rollout mode."""
    max_new_tokens: int = 128
    """Response length of teacher rollouts (rollout mode)."""
    rollout_batch_size: int = 8
    """Prompts per teacher generation call (rollout mode)."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        _check(self.steps >= 0, "stage1.steps", f"must be >= 0, got {self.steps}")
        _check(self.lr > 0 and math.isfinite(self.lr), "stage1.lr", f"must be > 0, got {self.lr}")
        _check(self.nll_weight >= 0, "stage1.nll_weight", f"must be >= 0, got {self.nll_weight}")
        _check(self.temperature > 0, "stage1.temperature", f"must be > 0, got {self.temperature}")
        _check(self.max_new_tokens >= 1, "stage1.max_new_tokens", "must be >= 1")
        _check(self.rollout_batch_size >= 1, "stage1.rollout_batch_size", "must be >= 1")
        if self.enabled:
            _check(self.steps >= 1, "stage1.steps", "must be >= 1 when stage1.enabled=true")


@dataclass
class Stage2Config:
    """Stage 2: on-policy reverse-KL distillation on the student's own samples."""

    section: ClassVar[str] = "stage2"

    enabled: bool = False
    """Run stage 2 after stage 1."""
    steps: int = 50
    """Optimizer steps."""
    lr: float = 5e-5
    """Peak learning rate."""
    loss: Stage2Loss = "pg"
    """``pg``: single-sample policy-gradient reverse KL; ``full_reverse_kl``: exact over the vocab."""
    max_new_tokens: int = 64
    """Length of the student's sampled responses."""
    temperature: float = 1.0
    """Student sampling temperature."""
    num_prompts_per_step: int = 8
    """Prompts (one sampled response each) per optimizer step."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        _check(self.steps >= 0, "stage2.steps", f"must be >= 0, got {self.steps}")
        _check(self.lr > 0 and math.isfinite(self.lr), "stage2.lr", f"must be > 0, got {self.lr}")
        _check(self.max_new_tokens >= 1, "stage2.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "stage2.temperature", f"must be > 0, got {self.temperature}")
        _check(self.num_prompts_per_step >= 1, "stage2.num_prompts_per_step", "must be >= 1")
        if self.enabled:
            _check(self.steps >= 1, "stage2.steps", "must be >= 1 when stage2.enabled=true")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping shared by both stages."""

    section: ClassVar[str] = "train"

    batch_size: int = 8
    """Sequences per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    warmup_ratio: float = 0.1
    """Fraction of each stage's steps spent in linear warm-up, in [0, 1)."""
    lr_schedule: LRSchedule = "cosine"
    """Learning-rate schedule after warm-up (cosine decays to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    seed: int = 0
    """Seed for data order, sampling and LoRA initialisation."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    save_every: int = 100
    """Save a checkpoint every N optimizer steps (0 = only at the end)."""
    output_dir: str = "runs/zeda"
    """Run directory (config, checkpoints, metrics)."""
    resume: bool = False
    """Resume from the latest checkpoint in ``output_dir``."""
    overwrite: bool = False
    """Delete an existing ``output_dir`` before starting."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(
            0.0 <= self.warmup_ratio < 1.0,
            "train.warmup_ratio",
            f"must be in [0, 1), got {self.warmup_ratio}",
        )
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.save_every >= 0, "train.save_every", "must be >= 0 (0 = only at the end)")
        _check(bool(self.output_dir.strip()), "train.output_dir", "must not be empty")
        _check(
            not (self.resume and self.overwrite),
            "train.resume",
            "resume=true and overwrite=true contradict each other; set one of them",
        )


@dataclass
class EvalConfig:
    """What is measured after training."""

    section: ClassVar[str] = "eval"

    tasks: list[str] = field(default_factory=lambda: ["ref_perplexity"])
    """Evaluation tasks (zeda's own ``ref_*`` tasks or lm-eval task names)."""
    limit: int | None = None
    """Examples per task (``None`` = all)."""
    max_eval_tokens: int = 20000
    """Token budget of the perplexity / KL evaluation."""
    zero_bias_sweep: list[float] = field(default_factory=list)
    """Extra biases added to the zero-expert logits at eval time to trace a FLOPs/quality curve."""
    baselines: list[str] = field(default_factory=lambda: ["keep_top_m", "top_p", "threshold"])
    """Training-free dynamic-k baselines evaluated at matched FLOPs."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        if self.limit is not None:
            _check(self.limit >= 1, "eval.limit", "must be >= 1 (or null for all)")
        _check(self.max_eval_tokens >= 1, "eval.max_eval_tokens", "must be >= 1")
        for name in ("tasks", "baselines"):
            values = getattr(self, name)
            _check(all(v.strip() for v in values), f"eval.{name}", "entries must not be empty")
            _check(len(set(values)) == len(values), f"eval.{name}", "entries must be unique")
        _check(
            all(math.isfinite(b) for b in self.zero_bias_sweep),
            "eval.zero_bias_sweep",
            "entries must be finite",
        )


@dataclass
class ExportConfig:
    """How the trained model is written out."""

    section: ClassVar[str] = "export"

    merge_lora: bool = True
    """Merge LoRA adapters into the expert weights on export."""
    out_dir: str | None = None
    """Export directory; ``None`` means ``<train.output_dir>/export``."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        if self.out_dir is not None:
            _check(bool(self.out_dir.strip()), "export.out_dir", "must not be empty (or null)")


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

    def validate(self) -> RunConfig:
        """Check every section and the cross-section constraints; return ``self``.

        Raises:
            ZedaError: naming the first offending key.
        """
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            _check(
                isinstance(section, _SECTIONS[f.name]),
                f.name,
                f"must be a {_SECTIONS[f.name].__name__}, got {type(section).__name__}",
            )
            section.validate()
        training = self.stage1.enabled or self.stage2.enabled
        trainable = self.lora.enabled or self.lora.full_experts or self.lora.train_router
        _check(
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
}


# --------------------------------------------------------------------------------------------
# Keys, docs and suggestions
# --------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys() -> list[str]:
    """Every settable dotted key, e.g. ``"balance.target_zero_share"``, in schema order."""
    return [f"{name}.{f.name}" for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


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


def _suggest(bad: str, candidates: Sequence[str]) -> str:
    """``" — did you mean 'x'?"`` for the closest candidate (by full key or by last component)."""
    last = bad.rsplit(".", 1)[-1]
    best, best_score = None, 0.0
    for cand in candidates:
        full = difflib.SequenceMatcher(None, bad, cand).ratio()
        tail = difflib.SequenceMatcher(None, last, cand.rsplit(".", 1)[-1]).ratio()
        score = (full + tail) / 2
        if score > best_score:
            best, best_score = cand, score
    if last in _KEY_HINTS and best_score < 0.95:
        return f"; did you mean {_KEY_HINTS[last]}?"
    if best is not None and best_score >= 0.55:
        return f"; did you mean {best!r}?"
    return f"; valid keys start with one of: {', '.join(_SECTIONS)}"


def _unknown(path: str, candidates: Sequence[str]) -> typing.NoReturn:
    raise ZedaError(f"unknown config key {path!r}{_suggest(path, candidates)}")


# --------------------------------------------------------------------------------------------
# Type coercion
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the field type ``tp`` and return it coerced (e.g. ``"2e-4"`` -> 2e-4)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args:
            if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
                return None
            rest = [a for a in args if a is not type(None)]
            return _coerce(value, rest[0] if len(rest) == 1 else Union[tuple(rest)], path)  # noqa: UP007
        errors = []
        for a in args:
            try:
                return _coerce(value, a, path)
            except ZedaError as e:  # pragma: no cover - no non-Optional unions in the schema
                errors.append(str(e))
        _fail(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        _fail(path, f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            if isinstance(value, dict):
                _fail(path, f"expected {_type_name(tp)}, got a mapping")
            value = [value]  # a single scalar is a one-element list
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        _fail(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            _fail(path, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = math.nan
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        _fail(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            _fail(path, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # PyYAML reads 2e-4 (no dot) as a string
            except ValueError:
                pass
        _fail(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(path, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp!r} at {path}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# dict <-> RunConfig
# --------------------------------------------------------------------------------------------


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict of ``cfg`` (sections -> fields), safe to dump as YAML."""
    return {
        name: {f.name: copy.deepcopy(getattr(getattr(cfg, name), f.name)) for f in dataclasses.fields(cls)}
        for name, cls in _SECTIONS.items()
    }


def _section_from_dict(name: str, data: Any) -> Any:
    cls = _SECTIONS[name]
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        _fail(
            name,
            f"is a section; expected a mapping of its keys (e.g. {name}.{dataclasses.fields(cls)[0].name})",
        )
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{name}.{key}"
        if key not in names:
            _unknown(path, valid_keys())
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Build and validate a `RunConfig` from a (possibly partial) nested dict.

    Missing sections and keys take their defaults.

    Raises:
        ZedaError: on an unknown key, a value of the wrong type, or a violated constraint.
    """
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ZedaError(f"a recipe must be a mapping of sections, got {type(d).__name__}")
    sections = {}
    for key, value in d.items():
        if key not in _SECTIONS:
            if isinstance(value, Mapping) and value:
                _unknown(f"{key}.{next(iter(value))}", valid_keys())
            _unknown(str(key), valid_keys() + list(_SECTIONS))
        sections[key] = _section_from_dict(key, value)
    return RunConfig(**sections).validate()


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Parse ``["a.b=1", ...]`` into a nested dict ``{"a": {"b": 1}}`` (values via ``yaml.safe_load``).

    Raises:
        ZedaError: on an item without ``=`` or a value that is not valid YAML.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ZedaError(f"override {item!r} must look like key=value (e.g. lora.r=16)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ZedaError(f"override {item!r} has an empty key; use a dotted key like lora.r=16")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            msg = getattr(e, "problem", None) or "invalid YAML"
            raise ZedaError(f"override {item!r}: value is not valid YAML ({msg})") from None
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if p not in node:
                node[p] = {}
            elif not isinstance(node[p], dict):
                raise ZedaError(f"override {item!r}: {'.'.join(parts[: i + 1])!r} is not a section")
            node = node[p]
        if parts[-1] in node and isinstance(node[parts[-1]], dict) and isinstance(value, dict):
            node[parts[-1]] = _merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def _set_in(d: Mapping[str, Any], dotted: str) -> bool:
    """Whether ``d`` sets the dotted key to a non-null value."""
    node: Any = d
    for p in dotted.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return False
        node = node[p]
    return node is not None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``: mappings merge, everything else replaces.

    For each pair in `EXCLUSIVE_KEYS`, if ``over`` sets exactly one key (non-null), the other is
    cleared.
    """
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    for a, b in EXCLUSIVE_KEYS:
        for mine, other in ((a, b), (b, a)):
            if _set_in(over, mine) and not _set_in(over, other) and _set_in(out, other):
                sec, key = other.split(".")
                out[sec][key] = None
    return out


def apply_overrides(cfg: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """A new `RunConfig` with dotted ``key=value`` overrides applied (``cfg`` is not modified).

    Args:
        cfg: The base configuration.
        overrides: Items like ``"balance.target_zero_share=0.5"``, ``"eval.tasks=[a,b]"``.

    Raises:
        ZedaError: on a malformed item, unknown key, bad value or violated constraint.
    """
    parsed = parse_overrides(overrides)
    return from_dict(_merge(to_dict(cfg), parsed))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ZedaError(f"recipe {str(path)!r} not found") from None
    except OSError as e:
        raise ZedaError(f"cannot read recipe {str(path)!r}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ZedaError(f"recipe {str(path)!r}:{where}: {problem}") from None


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe at ``path`` as a nested dict with its ``base:`` chain merged in."""
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
        return data
    if not isinstance(base, str) or not base.strip():
        raise ZedaError(f"recipe {str(path)!r}: 'base' must be a path to another recipe")
    parent = _load_tree(path.parent / base, (*seen, resolved))
    return _merge(parent, data)


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a recipe YAML (following ``base:``), apply ``key=value`` overrides and validate.

    Args:
        path: The recipe file.
        overrides: Dotted ``key=value`` items applied on top, in order.

    Returns:
        The validated `RunConfig`.

    Raises:
        ZedaError: on a missing/invalid file, unknown key, bad value or violated constraint.
    """
    path = Path(path)
    tree = _load_tree(path)
    try:
        base_cfg = from_dict(tree)
    except ZedaError as e:
        raise ZedaError(f"{path}: {e}") from None
    return apply_overrides(base_cfg, overrides)


def validate_recipe(path: str | Path) -> RunConfig:
    """Load and validate a recipe; return its `RunConfig` or raise a one-line `ZedaError`."""
    cfg = load_recipe(path)
    reloaded = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
    if reloaded != cfg:  # pragma: no cover - guards the YAML round trip of every value
        raise ZedaError(f"{path}: config does not survive a YAML round trip")
    return cfg


def save_recipe(cfg: RunConfig, path: str | Path) -> Path:
    """Write the full resolved ``cfg`` as YAML (no ``base:``); `load_recipe` reads back an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# zeda run config (resolved; every key explicit)\n" + yaml.safe_dump(
        to_dict(cfg), sort_keys=False, default_flow_style=None
    )
    path.write_text(text)
    return path
