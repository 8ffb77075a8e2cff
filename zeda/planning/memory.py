"""`zeda plan`: predicted peak memory per GPU of a zeda distillation run, from a recipe alone.

Nothing is built or loaded: the prediction reads the recipe (`zeda.config.RunConfig`) and the
model's config (a built-in config from ``zeda/configs``, a ``config.json`` or a model directory).
It models what zeda's training step keeps alive at its peak:

- **Static state**: the frozen weights (``model.dtype``), the trained copies PEFT keeps next to
  the frozen originals (routers, and the experts with ``lora.full_experts``), the LoRA factors
  (fp32: PEFT keeps adapters of bf16/fp16 models in fp32), and AdamW's two moments (same dtype
  as each trained tensor).
- **Peak phase**, the largest of:
  - *loss forward*: activations saved for backward, teacher and student logits at the full
    vocabulary, the loss's gradient buffer in their dtype and the fp32 temporaries of one token
    chunk (zeda's losses run over chunks of ~2**24 fp32 elements), at the positions stage 1
    computes logits for (every one, unless ``stage1.head_budget`` applies); with ``lora.split=false``
    also the merged expert weights ``W + s·BA`` that PEFT's ``target_parameters`` LoRA
    materialises per MoE layer and autograd keeps for backward (all of a layer's experts,
    whatever the batch: the first MoE layer keeps only ``down_proj``, because its input needs no
    gradient); split LoRA (the default, zeda's experts backend) forms none;
  - *expert backward*: the same activations (with ``train.gradient_checkpointing``: every
    layer's input, the router outputs the balance loss keeps, and the one layer being recomputed),
    plus the gradients, plus with merged LoRA or full experts the per-expert gradient slices that
    autograd expands to the full ``(E, ...)`` expert stack and accumulates (measured: about twice
    one layer's expert weights);
  - *optimizer step*: gradients plus the temporary of AdamW's foreach update (one copy of the
    trained tensors);
  - generation: the KV cache of the student's samples (stage 2) or of the teacher's rollouts
    (stage 1 in rollout mode, ``stage1.rollout_batch_size`` sequences per call).
- **Sharding**: with ``gpus > 1`` (FSDP full shard) weights, trained copies, gradients and
  optimiser state are divided by the number of GPUs; the layers FSDP gathers at a time
  (two decoder layers, or the embedding and lm_head) are added back unsharded. Activations,
  logits and merged expert weights are per GPU and are not divided.

Assumptions that the CPU validation (``evals/plan/results.md``) does not cover are stated in
`MemoryPlan.notes`: expert activations assume every top-k slot is a real expert (the start of
training; they shrink by the zero share later), attention is a fused (flash / memory-efficient)
kernel with no ``T x T`` buffer, and the runtime overhead of a GPU (CUDA context, cuBLAS and
NCCL workspaces) is a fixed ``overhead_gib``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from zeda.config import RunConfig, apply_overrides, load_recipe
from zeda.errors import ZedaError
from zeda.evaluation.flops import load_config
from zeda.evaluation.head import kept_positions, logit_fraction
from zeda.families import get_spec
from zeda.planning.shapes import (
    layer_activation_bytes,
    merged_expert_bytes,
    model_shape,
    resolve_model_config,
)

__all__ = ["GIB", "MAX_GPU_FRACTION", "MemoryPlan", "check_recipe_fits", "plan"]

GIB = float(2**30)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# zeda's losses (zeda.distillation.losses) run over token chunks of ~2**24 fp32 elements: per
# loss the full-vocabulary tensors are the logits themselves and one gradient buffer in their
# dtype; the fp32 work of a chunk is a constant. Measured for forward KL at V = 151,936 with the
# dense chunk layout (`python evals/plan/probe.py loss --tokens 256|1024 --dtype bfloat16`:
# 3.33 and 1.58 fp32 N x V units): 4.0 bytes per (token, vocab) element beside the teacher
# logits at bf16 (student logits + gradient buffer) and ~5.4 fp32 chunk-sized temporaries.
_LOSS_FULL_COPIES = {"kl": 3, "nll": 2, "pg": 2}  # (tokens, vocab) tensors in the logits' dtype
_CHUNK_FP32_COPIES = 6
_EXPERT_GRAD_FACTOR = 2.15
#: A recipe that names its GPUs must plan within this share of their memory (`zeda validate`).
MAX_GPU_FRACTION = 0.9
#: Experts backends that apply LoRA split per expert (`zeda.zero.experts`); None is zeda's default.
_SPLIT_BACKENDS = (None, "zeda", "zeda_grouped")


@dataclass
class MemoryPlan:
    """Predicted peak memory of one GPU (bytes), split by component.

    Attributes:
        model: Model config name.
        gpus: Data-parallel GPUs (FSDP full shard when > 1).
        gpu_memory_gib: Memory of one GPU, or None (no verdict).
        dtype: Parameter dtype.
        stage: The stage whose step has the highest peak (``stage1`` or ``stage2``).
        phase: The phase of that step at its peak.
        tokens: Tokens per micro-batch per GPU at the peak (batch x sequence length).
        components: Bytes per component at the peak; they sum to ``total``.
        total: Predicted peak bytes per GPU.
        phases: Peak bytes of every (stage, phase) considered.
        notes: Assumptions and hints.
        gradient_checkpointing: Whether each decoder layer is recomputed in backward.
        split_lora: Whether LoRA on the experts is applied split (no merged weight copy).
    """

    model: str
    gpus: int
    gpu_memory_gib: float | None
    dtype: str
    stage: str
    phase: str
    tokens: int
    components: dict[str, float]
    total: float
    phases: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    split_lora: bool = False

    @property
    def fits(self) -> bool | None:
        """Whether ``total`` fits in ``gpu_memory_gib`` (None when no GPU size was given)."""
        if self.gpu_memory_gib is None:
            return None
        return self.total <= self.gpu_memory_gib * GIB

    @property
    def gpu_fraction(self) -> float | None:
        """``total`` as a share of ``gpu_memory_gib`` (None when no GPU size was given)."""
        return None if self.gpu_memory_gib is None else self.total / (self.gpu_memory_gib * GIB)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable), with ``fits``, GiB totals and the GPU share."""
        d = asdict(self)
        d.update(fits=self.fits, total_gib=self.total / GIB, gpu_fraction=self.gpu_fraction)
        return d

    def table(self) -> str:
        """A short text table: one line per component, the total and the verdict."""
        width = max(len(k) for k in self.components) + 2
        head = (
            f"zeda plan: {self.model}, {self.dtype}, {self.gpus} GPU(s)"
            f"{' FSDP full shard' if self.gpus > 1 else ''}; peak in {self.stage} ({self.phase}), "
            f"{self.tokens} tokens per micro-batch per GPU"
            f"{'; gradient checkpointing' if self.gradient_checkpointing else ''}"
            f"{'; split LoRA' if self.split_lora else ''}"
        )
        lines = [head, f"{'component':<{width}}GiB per GPU"]
        lines += [f"{k:<{width}}{v / GIB:10.2f}" for k, v in self.components.items() if v > 0]
        lines.append(f"{'total':<{width}}{self.total / GIB:10.2f}")
        if self.gpu_memory_gib is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{verdict} in {self.gpu_memory_gib:g} GiB per GPU ({self.gpu_fraction:.0%} of it)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _chunk_rows(vocab: int) -> int:
    """Tokens per loss chunk, as `zeda.distillation.losses` picks them for this vocabulary."""
    from zeda.distillation import losses

    return losses.default_chunk_rows(vocab)


def plan(
    recipe: str | Path | RunConfig,
    gpus: int | None = None,
    gpu_memory_gib: float | None = None,
    *,
    model_config: str | Mapping[str, Any] | PretrainedConfig | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    loss_chunk_tokens: int | None = None,
    gradient_checkpointing: bool | None = None,
    split_lora: bool | None = None,
    overhead_gib: float = 1.0,
) -> MemoryPlan:
    """Predict the peak memory per GPU of a zeda distillation run.

    Args:
        recipe: A recipe path or a `RunConfig`.
        gpus: Data-parallel GPUs; more than one means FSDP full shard. Default: the recipe's
            ``hardware.gpus``, else 1.
        gpu_memory_gib: Memory of one GPU in GiB, for the fits / does-not-fit verdict. Default:
            the recipe's ``hardware.gpu_memory_gib`` (none: no verdict).
        model_config: The model's config (built-in name, ``config.json``, model directory, dict or
            config); default: resolved from ``model.name_or_path`` (see `resolve_model_config`).
        overrides: ``section.key=value`` recipe overrides.
        loss_chunk_tokens: Tokens per loss chunk; default: what zeda's losses use
            (`zeda.distillation.losses.default_chunk_rows`, ~2**24 fp32 elements).
        gradient_checkpointing: Recompute each decoder layer in backward; default: the recipe's
            ``train.gradient_checkpointing``.
        split_lora: Apply LoRA on the experts per expert without a merged copy; default: the
            recipe's ``lora.split`` with zeda's experts backend (a stock backend merges).
        overhead_gib: Fixed runtime overhead (CUDA context, cuBLAS/NCCL workspaces); 0 for CPU.

    Returns:
        The `MemoryPlan`.

    Raises:
        ZedaError: on a bad recipe, an unknown model or a bad argument.
    """
    cfg = recipe if isinstance(recipe, RunConfig) else load_recipe(recipe, list(overrides))
    if isinstance(recipe, RunConfig) and overrides:
        cfg = apply_overrides(cfg, list(overrides))
    gpus = gpus if gpus is not None else cfg.hardware.gpus or 1
    gpu_memory_gib = gpu_memory_gib if gpu_memory_gib is not None else cfg.hardware.gpu_memory_gib
    if gpus < 1:
        raise ZedaError(f"--gpus must be >= 1, got {gpus}")
    if model_config is None:
        config, name = resolve_model_config(cfg.model.name_or_path)
    else:
        config = load_config(model_config)
        name = model_config if isinstance(model_config, str) else str(config.model_type)
    dtype = cfg.model.dtype
    if dtype == "auto":
        raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        dtype = str(raw).removeprefix("torch.")
    if dtype not in _DTYPE_BYTES:
        raise ZedaError(f"model.dtype {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}")
    p = _DTYPE_BYTES[dtype]
    spec = get_spec(config.model_type)
    zero = cfg.inject.resolve_num_zero(spec.num_experts(config))
    s = model_shape(config, zero)
    chunk = loss_chunk_tokens if loss_chunk_tokens is not None else _chunk_rows(s.vocab)
    ckpt = gradient_checkpointing if gradient_checkpointing is not None else cfg.train.gradient_checkpointing
    lora = cfg.lora
    use_lora = lora.enabled and not lora.full_experts
    if split_lora is None:
        split_lora = lora.split and cfg.model.experts_implementation in _SPLIT_BACKENDS
    split = use_lora and split_lora
    merged_lora = use_lora and not split
    shard = float(gpus)
    notes: list[str] = []

    # ---- static state ----
    n_moe = len(s.moe_layers)
    total_params = sum(s.params.values())
    routed = s.params["routed_experts"]
    weights = total_params * p / shard
    router_copy = (s.router_params * p if lora.train_router else 0) / shard
    expert_copy = (routed * p if lora.full_experts else 0) / shard
    up_b, down_b = merged_expert_bytes(s, p)
    width_sum = ((2 if s.gated else 1) * s.expert_width + s.hidden) + (s.expert_width + s.hidden)
    lora_params = lora.r * s.experts * width_sum * n_moe if use_lora else 0
    lora_bytes = lora_params * 4 / shard
    grads = router_copy + expert_copy + lora_bytes  # each trained tensor's gradient, same dtype
    adam = 2 * grads
    gathered = 0.0
    if gpus > 1:
        layer_params = (total_params - s.params["embedding"] - s.params["lm_head"]) / max(s.layers, 1)
        layer_bytes = layer_params * p + (routed / max(n_moe, 1) * p if lora.full_experts else 0)
        gathered = max(2 * layer_bytes, (s.params["embedding"] + s.params["lm_head"]) * p)
    static = {
        f"weights ({dtype}, frozen)": weights,
        "router copies (trained)": router_copy,
        "expert copies (trained, full_experts)": expert_copy,
        "LoRA adapters (fp32)": lora_bytes,
        "AdamW moments": adam,
        "FSDP gathered layers": gathered,
        "runtime overhead": overhead_gib * GIB,
    }

    # ---- per stage: tokens, activations, merged weights, logits ----
    stages: list[tuple[str, int, int, str]] = []  # (stage, sequences, seq_len, loss kind)
    if cfg.stage1.enabled:
        kind = "nll" if cfg.stage1.kd == "nll" else "kl"
        stages.append(("stage1", cfg.train.batch_size, cfg.data.seq_len, kind))
    if cfg.stage2.enabled:
        seqs = math.ceil(cfg.stage2.num_prompts_per_step / (cfg.train.grad_accum * gpus))
        stages.append(("stage2", seqs, cfg.data.seq_len, "pg" if cfg.stage2.loss == "pg" else "kl"))
    if not stages:
        raise ZedaError("both stages are disabled: nothing to plan")
    first_moe = s.moe_layers[0] if s.moe_layers else s.layers
    best: tuple[float, str, str, int, dict[str, float]] | None = None
    phases: dict[str, float] = {}
    for stage, seqs, seq_len, kind in stages:
        n = seqs * seq_len
        acts_layers = [
            layer_activation_bytes(s, p, n, i in s.moe_layers, attention_saved=i > first_moe)
            for i in range(s.layers)
        ]
        head = (4 * s.hidden + 2 * p * s.hidden) * n  # final norm, lm_head input
        merged_all = down_b + (n_moe - 1) * (up_b + down_b) if merged_lora and n_moe else 0.0
        if ckpt:
            # Each layer keeps its input; the balance loss keeps every MoE layer's router logits and
            # probabilities (fp32); backward recomputes one layer at a time, with its merged weights.
            kept = s.layers * n * p * s.hidden + n_moe * n * 8 * (s.experts + s.zero) + head
            acts_fwd, acts_bwd = kept, kept + max(acts_layers)
            merged_fwd, merged_bwd = 0.0, (up_b + down_b) if merged_lora and n_moe else 0.0
        else:
            acts_fwd = acts_bwd = sum(acts_layers) + head
            merged_fwd = merged_bwd = merged_all
        # stage1.head_budget: where the lm_head dominates a token's FLOPs, stage 1 computes the
        # logits of a share of the trained positions only (every position on real checkpoints).
        n_logits = n
        if stage == "stage1":
            fraction = logit_fraction(config, cfg.stage1.head_budget, seq_len)
            if fraction < 1.0:
                n_logits = seqs * kept_positions(fraction, seq_len - 1)
                notes.append(
                    f"stage 1 computes the logits of {100 * fraction:.1f}% of the positions "
                    f"(stage1.head_budget={cfg.stage1.head_budget:g}: the lm_head dominates the FLOPs)"
                )
        c = min(chunk, n_logits)
        loss = s.vocab * (_LOSS_FULL_COPIES[kind] * p * n_logits + _CHUNK_FP32_COPIES * 4 * c)
        # Per-expert gradient slices are expanded to the whole (E, ...) stack and accumulated: 6.1-6.5
        # units of E*I*H*P per layer in probes (evals/plan/README.md), ~2.15x the layer's weights.
        # Split LoRA never forms them (its rank-r factors' gradients are in "gradients").
        expert_grad = (
            _EXPERT_GRAD_FACTOR * (up_b + down_b) if (merged_lora or lora.full_experts) and n_moe else 0.0
        )
        candidates = {
            "loss forward": {
                "activations": acts_fwd,
                "merged LoRA expert weights": merged_fwd,
                "logits + KD loss": loss,
            },
            "expert backward": {
                "activations": acts_bwd,
                "merged LoRA expert weights": merged_bwd,
                "gradients": grads,
                "expert weight-gradient buffers": expert_grad,
            },
            "optimizer step": {"gradients": grads, "AdamW update temporary": grads},
        }
        if stage == "stage2":
            cache = seqs * seq_len * s.layers * s.kv_cache_width * p
            candidates["generation"] = {"KV cache": cache, "logits + KD loss": seqs * s.vocab * 4}
        elif cfg.stage1.mode == "rollout":  # the teacher's rollouts, before stage 1 trains
            rows = cfg.stage1.rollout_batch_size
            cache = rows * seq_len * s.layers * s.kv_cache_width * p
            candidates["rollout generation"] = {"KV cache": cache, "logits + KD loss": rows * s.vocab * 4}
        for phase, parts in candidates.items():
            value = sum(static.values()) + sum(parts.values())
            phases[f"{stage}/{phase}"] = value
            if best is None or value > best[0]:
                best = (value, stage, phase, n, parts)
    assert best is not None
    total, stage, phase, tokens, parts = best
    components = {**static, **parts}
    components = {k: v for k, v in components.items() if v > 0}

    notes.append(
        "expert activations assume every top-k slot is a real expert (start of training); they shrink "
        "by the zero share as it rises"
    )
    if not ckpt and total > (gpu_memory_gib or float("inf")) * GIB:
        alt = plan(
            cfg,
            gpus,
            gpu_memory_gib,
            model_config=config,
            loss_chunk_tokens=chunk,
            gradient_checkpointing=True,
            split_lora=split_lora,
            overhead_gib=overhead_gib,
        )
        notes.append(
            f"with gradient checkpointing (train.gradient_checkpointing=true): {alt.total / GIB:.1f} GiB per GPU"
        )
    if merged_lora:
        notes.append("LoRA merged per layer (lora.split=false or a stock experts backend)")
    return MemoryPlan(
        model=str(name),
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        dtype=dtype,
        stage=stage,
        phase=phase,
        tokens=tokens,
        components=components,
        total=total,
        phases=phases,
        notes=notes,
        gradient_checkpointing=ckpt,
        split_lora=split,
    )


def check_recipe_fits(cfg: RunConfig, name: str = "recipe") -> MemoryPlan | None:
    """`plan` a recipe on the GPUs its ``hardware`` section names; refuse it if it does not fit.

    Args:
        cfg: The recipe.
        name: How to name it in the error (its path).

    Returns:
        The plan, or None when the recipe names no GPUs (``hardware.gpus`` is null).

    Raises:
        ZedaError: if the planned peak per GPU is above `MAX_GPU_FRACTION` of its memory.
    """
    hw = cfg.hardware
    if hw.gpus is None or hw.gpu_memory_gib is None:
        return None
    result = plan(cfg, hw.gpus, hw.gpu_memory_gib)
    if result.total > MAX_GPU_FRACTION * hw.gpu_memory_gib * GIB:
        raise ZedaError(
            f"{name}: zeda plan predicts {result.total / GIB:.1f} GiB per GPU ({result.gpu_fraction:.0%}) on "
            f"the {hw.gpus} x {hw.gpu_memory_gib:g} GiB it names, above {MAX_GPU_FRACTION:.0%}; "
            f"see `zeda plan {name}` (lower train.batch_size, or set train.gradient_checkpointing=true, "
            "lora.split=true or more hardware.gpus)"
        )
    return result
