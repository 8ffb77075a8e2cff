"""The recipe sections read by the distillation loop: ``lora``, ``balance``, ``data``, ``stage1``,
``stage2`` and ``train``.

Plain dataclasses with no heavy imports, so that ``zeda.config`` (which composes them into
`zeda.config.RunConfig` and parses recipes) can be imported without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from zeda.errors import check_config

Stage1Mode = Literal["rollout", "text"]
KDKind = Literal["forward_kl", "reverse_kl", "nll"]
Stage2Loss = Literal["pg", "full_reverse_kl"]
LRSchedule = Literal["cosine", "constant"]


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
    router_lr_scale: float = 1.0
    """The routers' learning rate as a multiple of the stage's ``lr`` (LoRA factors and experts
    use ``lr`` itself): routers are small and must move far to learn which slots to skip."""
    router_rows: str = "all"
    """Which router rows train (with ``train_router``): ``all`` (the paper's full router) or
    ``zero`` (only the zero experts' rows; the routing among real experts stays the original's)."""
    split: bool = True
    """Apply LoRA on the fused experts per expert, ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` (zeda's experts backend),
    never forming the merged ``W + s·B·A`` stack; false: PEFT's merged forward (same result,
    more memory)."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        check_config(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        check_config(self.alpha >= 1, "lora.alpha", f"must be >= 1, got {self.alpha}")
        check_config(
            self.router_lr_scale > 0 and math.isfinite(self.router_lr_scale),
            "lora.router_lr_scale",
            f"must be finite and > 0, got {self.router_lr_scale}",
        )
        check_config(
            self.router_rows in ("all", "zero"),
            "lora.router_rows",
            f"must be 'all' or 'zero', got {self.router_rows!r}",
        )
        check_config(
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
    per_layer: bool = True
    """Drive every MoE layer to the target share (the paper's loss). False: only the share over
    all layers is driven, each layer's share is left to the distillation loss."""
    real_alpha: float = 0.0
    """Coefficient of the real-expert balance term (0 = off): per MoE layer, each real expert that
    takes a larger share of the real slots than in the original's routing of the same tokens is
    pushed down in proportion to the excess, which keeps the busiest expert's load near the
    original's (`zeda.distillation.balance.real_balance_loss`)."""
    share_gain: float = 0.0
    """Feedback on the zero-group weight (0 = off; needs ``target_zero_share``): after every
    optimisation step ``log w += share_gain * (target - the step's measured zero share)``, so the
    share meets the target where the distillation loss holds it short of the balance loss's own
    equilibrium (which ignores the distillation loss). Not yet measured on the zoo; at 0.05 a
    10-point shortfall raises w by 0.5% per step."""

    DEFAULT_W: ClassVar[float] = 2.0

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        check_config(
            self.alpha >= 0 and math.isfinite(self.alpha), "balance.alpha", "must be finite and >= 0"
        )
        check_config(
            self.real_alpha >= 0 and math.isfinite(self.real_alpha),
            "balance.real_alpha",
            "must be finite and >= 0 (0 = off)",
        )
        if self.w is not None:
            check_config(
                self.w > 0 and math.isfinite(self.w), "balance.w", f"must be finite and > 0, got {self.w}"
            )
        if self.target_zero_share is not None:
            s = self.target_zero_share
            check_config(0.0 < s < 1.0, "balance.target_zero_share", f"must be in (0, 1), got {s}")
        check_config(
            self.share_gain >= 0 and math.isfinite(self.share_gain),
            "balance.share_gain",
            "must be finite and >= 0 (0 = off)",
        )
        check_config(
            self.share_gain == 0 or self.target_zero_share is not None,
            "balance.share_gain",
            "steers the share to balance.target_zero_share; set that too, or share_gain=0",
        )
        check_config(
            self.w is None or self.target_zero_share is None,
            "balance.w",
            "set either balance.w or balance.target_zero_share, not both",
        )

    def resolve_w(self, num_real: int, num_zero: int) -> float:
        """The zero-group weight w for E = ``num_real`` and Z = ``num_zero`` experts."""
        if self.target_zero_share is not None:
            from zeda.distillation.losses import w_for_target  # torch; only when asked

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
    """Use at most this many prompts; ``None`` uses every prompt in the file."""
    rollout_cache: str | None = None
    """Directory caching teacher rollouts between runs; ``None`` means no cache: rollouts are
    generated afresh and nothing is written for them."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        check_config(bool(self.train_file.strip()), "data.train_file", "must not be empty")
        check_config(bool(self.eval_file.strip()), "data.eval_file", "must not be empty")
        check_config(self.seq_len >= 8, "data.seq_len", f"must be >= 8, got {self.seq_len}")
        check_config(bool(self.text_field.strip()), "data.text_field", "must not be empty")
        if self.max_prompts is not None:
            check_config(self.max_prompts >= 1, "data.max_prompts", "must be >= 1 (or null for all)")
        if self.rollout_cache is not None:
            check_config(
                bool(self.rollout_cache.strip()),
                "data.rollout_cache",
                "must not be empty (or null for no cache)",
            )


@dataclass
class Stage1Config:
    """Stage 1: token-level distillation from the frozen original model."""

    section: ClassVar[str] = "stage1"

    enabled: bool = True
    """Run stage 1."""
    mode: Stage1Mode = "text"
    """``text``: distil on ``data.train_file`` text; ``rollout``: on teacher-generated responses."""
    steps: int = 100
    """Optimizer steps (may be raised when resuming a run)."""
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
    head_budget: float | None = None
    """Cap on the logits' work per step: where the original's ``lm_head`` costs more FLOPs per
    token than ``head_budget`` times the rest of the model (`zeda.evaluation.flops.lm_head_ratio`,
    a small model with a large vocabulary), each step computes and trains the logits of a random
    share ``head_budget / ratio`` of the positions, drawn afresh every step; the model still runs
    on every token. The 12 built-in real configs' ratio is 0.01-0.19, so any budget of 1 or more
    leaves them exact. None: every position, always."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        check_config(self.steps >= 0, "stage1.steps", f"must be >= 0, got {self.steps}")
        check_config(
            self.head_budget is None or (self.head_budget > 0 and math.isfinite(self.head_budget)),
            "stage1.head_budget",
            f"must be finite and > 0, or null (every position), got {self.head_budget}",
        )
        check_config(self.lr > 0 and math.isfinite(self.lr), "stage1.lr", f"must be > 0, got {self.lr}")
        check_config(self.nll_weight >= 0, "stage1.nll_weight", f"must be >= 0, got {self.nll_weight}")
        check_config(self.temperature > 0, "stage1.temperature", f"must be > 0, got {self.temperature}")
        check_config(self.max_new_tokens >= 1, "stage1.max_new_tokens", "must be >= 1")
        check_config(self.rollout_batch_size >= 1, "stage1.rollout_batch_size", "must be >= 1")
        if self.enabled:
            check_config(self.steps >= 1, "stage1.steps", "must be >= 1 when stage1.enabled=true")


@dataclass
class Stage2Config:
    """Stage 2: on-policy reverse-KL distillation on the student's own samples."""

    section: ClassVar[str] = "stage2"

    enabled: bool = False
    """Run stage 2 after stage 1."""
    steps: int = 50
    """Optimizer steps (may be raised when resuming a run)."""
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
        check_config(self.steps >= 0, "stage2.steps", f"must be >= 0, got {self.steps}")
        check_config(self.lr > 0 and math.isfinite(self.lr), "stage2.lr", f"must be > 0, got {self.lr}")
        check_config(self.max_new_tokens >= 1, "stage2.max_new_tokens", "must be >= 1")
        check_config(self.temperature > 0, "stage2.temperature", f"must be > 0, got {self.temperature}")
        check_config(self.num_prompts_per_step >= 1, "stage2.num_prompts_per_step", "must be >= 1")
        if self.enabled:
            check_config(self.steps >= 1, "stage2.steps", "must be >= 1 when stage2.enabled=true")


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
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (the
    teacher pass is never recomputed; routing counts count each real forward once)."""
    seed: int = 0
    """Seed for LoRA initialisation, data order and sampling; applied before the student is built,
    so two identical runs give bit-equal weights on CPU."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    save_every: int = 100
    """Save a checkpoint every N optimizer steps (0 = only at the end)."""
    output_dir: str = "runs/zeda"
    """Run directory (config, checkpoints, metrics)."""
    resume: bool = False
    """Continue the run in ``output_dir`` from its latest checkpoint. The recipe stored in the run
    is compared with this one (`zeda.config.recipe_differences`): only the keys in
    `zeda.config.RESUMABLE_KEYS` may change (more ``stage1.steps``/``stage2.steps``, ``eval.*``,
    ``export.*``, ``data.eval_file``, ``data.rollout_cache``, ``hardware.*``, the memory-only keys ``train.gradient_checkpointing``
    and ``lora.split``, and the bookkeeping keys ``train.resume``, ``train.overwrite``,
    ``train.output_dir``, ``train.log_every``, ``train.save_every``, ``train.eval_every``,
    ``train.patience``, ``train.verdict``), plus any
    ``stage2.*`` key if the stored run had stage 2 disabled; any other change is refused."""
    overwrite: bool = False
    """Replace an existing ``output_dir`` (a zeda run) with this run."""
    eval_every: int = 100
    """Score the student on the validation slice every N optimizer steps and at each stage's last
    step (KL, perplexity ratio, top-1 agreement, measured zero share; ``val_*`` in
    metrics.jsonl), keep the best checkpoint at the target share in ``<output_dir>/best`` and
    restore it at the end; 0 = no evaluation during training."""
    eval_tokens: int = 16384
    """Tokens of ``data.eval_file`` in the validation slice (the first ones, in ``data.seq_len`` blocks)."""
    best_tolerance: float = 0.01
    """An evaluation competes for the best checkpoint when its measured zero share is at least
    the target share minus this."""
    patience: int = 0
    """Stop a stage when the validation KL has not improved for this many evaluations once the
    share has reached the target band (0 = never stop early)."""
    verdict: bool = True
    """Calibrate every training-free rule on the validation slice at the start (to the target
    share) and at the end (to the student's measured share), and record whether the student beats
    them all (the run summary, a WARNING when it does not, the export's ``config.json``)."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        check_config(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        check_config(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        check_config(
            0.0 <= self.warmup_ratio < 1.0,
            "train.warmup_ratio",
            f"must be in [0, 1), got {self.warmup_ratio}",
        )
        check_config(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check_config(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        check_config(self.log_every >= 1, "train.log_every", "must be >= 1")
        check_config(self.save_every >= 0, "train.save_every", "must be >= 0 (0 = only at the end)")
        check_config(bool(self.output_dir.strip()), "train.output_dir", "must not be empty")
        check_config(
            self.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = no evaluation during training)"
        )
        check_config(self.eval_tokens >= 16, "train.eval_tokens", f"must be >= 16, got {self.eval_tokens}")
        check_config(
            0.0 <= self.best_tolerance < 1.0,
            "train.best_tolerance",
            f"must be in [0, 1), got {self.best_tolerance}",
        )
        check_config(self.patience >= 0, "train.patience", "must be >= 0 (0 = never stop early)")
        check_config(
            not (self.resume and self.overwrite),
            "train.resume",
            "resume=true and overwrite=true contradict each other; set one of them",
        )
