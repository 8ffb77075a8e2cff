"""Two-stage self-distillation against the frozen original, as one recipe.

Both stages run the same step: the teacher (the same weights in `zeda.teacher_mode`: LoRA off,
routers back to their frozen rows, zero experts off) scores a batch, the student runs it while
`RouterCapture` keeps its routers' outputs, and the loss is a distillation term plus the group
balance loss that pulls the zero-expert share towards its target. The stages differ only in
where the batch comes from and in the distillation term:

- stage 1 (sequence-level): packed text with the teacher's full next-token distribution
  (``text`` mode), or teacher rollouts on a prompt set (``rollout`` mode);
- stage 2 (on-policy): the student samples, the teacher scores exactly those tokens, and the
  loss is the policy-gradient reverse KL (or the full-vocabulary reverse KL).

accelerate handles devices, data parallelism and gradient accumulation; the model is prepared
once for both stages (`zeda.distillation.sharding.prepare_student`: accelerate's preparation, or
FSDP2 sharding on a CPU launch that asked for FSDP, which accelerate ignores on CPU).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from zeda.config import RunConfig, load_recipe, recipe_differences
from zeda.distillation import data as zdata
from zeda.distillation.checkpoint import (
    checkpoint_bytes,
    find_checkpoint,
    load_optim_state,
    load_trainable,
    read_record,
    trim_metrics,
)
from zeda.distillation.inputs import check_resume_inputs, run_inputs
from zeda.distillation.losses import (
    distill_loss,
    policy_gradient_reverse_kl,
    reverse_kl,
    token_logprobs,
    token_nll,
)
from zeda.distillation.result import DistillResult
from zeda.distillation.rollouts import (
    Batch,
    generate,
    logit_positions,
    pad_sequences,
    teacher_rollouts,
    text_batch,
)
from zeda.distillation.run_dir import RunDir, prepare_run_dir
from zeda.distillation.sharding import check_launch, prepare_student
from zeda.distillation.student import build_student
from zeda.distillation.trainer import STOP_FILE, Stage, Trainer
from zeda.errors import ZedaError
from zeda.evaluation.head import logit_fraction
from zeda.fs import check_space
from zeda.zero.checkpointing import disable_activation_checkpointing

logger = logging.getLogger(__name__)

__all__ = ["DistillResult", "distill"]

# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def distill(
    model: nn.Module,
    config: RunConfig,
    tokenizer: Any = None,
    accelerator: Accelerator | None = None,
    *,
    run_dir: RunDir | None = None,
) -> tuple[nn.Module, DistillResult]:
    """Distill ``model`` into a zero-expert student against its own frozen original.

    Args:
        model: An original MoE model (injected here per ``config.inject``), an injected model,
            or a student returned by an earlier call.
        config: The run configuration.
        tokenizer: The model's tokenizer.
        accelerator: An `accelerate.Accelerator` (one is made from ``config.train`` if omitted).
        run_dir: A `RunDir` from `prepare_run_dir` (checked here from ``config`` if omitted).

    Returns:
        ``(student, result)``: the PEFT student (``zeda.teacher_mode(student)`` is the teacher)
        and a `DistillResult`.
    """
    config.validate()
    if tokenizer is None:
        raise ZedaError("distill needs the model's tokenizer")
    zdata.validate_data(config)
    ga = config.train.grad_accum
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=ga)
    if accelerator.gradient_accumulation_steps != ga:
        raise ZedaError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-steps but "
            f"train.grad_accum={ga}; build it with Accelerator(gradient_accumulation_steps={ga})"
        )
    check_launch(accelerator)  # refuse unusable FSDP launch options before writing
    main = accelerator.is_main_process
    if run_dir is not None:  # the caller holds the run's session
        return _distill(model, config, tokenizer, accelerator, run_dir)
    run = prepare_run_dir(config, run_inputs(config))
    accelerator.wait_for_everyone()  # every rank decides on the directory before any rank writes
    with run.session(main):
        return _distill(model, config, tokenizer, accelerator, run)


def _distill(
    model: nn.Module, config: RunConfig, tokenizer: Any, accelerator: Accelerator, run: RunDir
) -> tuple[nn.Module, DistillResult]:
    main = accelerator.is_main_process
    ckpt = find_checkpoint(run.path) if run.resuming else None
    if ckpt is not None:
        _check_resumable(run.path, config)
        load_optim_state(ckpt)  # refuse an unsafe optim.pt before anything is written

    # 1. The student (train.seed set right before LoRA is created), restored from the checkpoint.
    student = build_student(model, config)
    resume = load_trainable(ckpt, student) if ckpt is not None else None
    check_space(run.path, *checkpoint_bytes(student), "a checkpoint")  # before anything is written
    run.start(main, config)
    if main and resume:
        trim_metrics(run.path, resume)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    # 2. One preparation for both stages (accelerate places, wraps and shards the model; FSDP2 on
    #    a CPU launch is applied by zeda, since accelerate ignores it there).
    prepared = prepare_student(accelerator, student, config.train.gradient_checkpointing)
    trainer = Trainer(student, prepared, config, accelerator, run, tokenizer)

    # 3. The validation slice: the rules to beat at the target share, then (every
    #    train.eval_every steps) the best checkpoint and early stopping.
    tcfg = config.train
    if Path(config.data.eval_file).is_file() and (tcfg.eval_every > 0 or tcfg.verdict):
        from zeda.distillation.validation import Validator

        trainer.validator = Validator(
            student, config, tokenizer, trainer.result.target_zero_share, trainer._global_mean
        )
        record = read_record(ckpt, "validation.json") if ckpt is not None else None
        trainer.validator.start(run.path, record, rules=tcfg.verdict)
    elif tcfg.eval_every > 0 or tcfg.verdict:
        logger.warning(
            "no validation text at %s: no best checkpoint, early stopping or verdict against the rules",
            config.data.eval_file,
        )

    # 4. Stage 1, then stage 2; a resumed run skips what its checkpoint already covers.
    order = ["stage1", "stage2"]
    t0 = time.perf_counter()
    for name in order:
        stage_cfg = getattr(config, name)
        if not stage_cfg.enabled:
            continue
        if resume and order.index(resume["stage"]) > order.index(name):
            setattr(trainer.result, f"{name}_steps", stage_cfg.steps)
            continue
        stage = _stage1(trainer) if name == "stage1" else _stage2(trainer)
        trainer.run(stage, resume if resume and resume["stage"] == name else None)
    trainer.finish()
    trainer.result.wall_seconds = time.perf_counter() - t0
    if config.train.gradient_checkpointing:
        disable_activation_checkpointing(student)  # the returned student runs as it came in

    # 5. The student returns restored to its best validation checkpoint, with the verdict
    #    against every rule at its measured share (also recorded for the export's config.json).
    trainer.finish_validation(tcfg.verdict)
    if trainer.result.verdict is not None:
        from zeda.distillation.validation import verdict_config

        base = student.get_base_model()
        base.config.zeda = {
            **(getattr(base.config, "zeda", None) or {}),
            "verdict": verdict_config(trainer.result.verdict, config.data.eval_file),
        }
    if main:
        (run.path / STOP_FILE).unlink(missing_ok=True)
        (run.path / "result.json").write_text(json.dumps(trainer.result.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    return student, trainer.result


def _micro_index(t: Trainer) -> Callable[[int, int], int]:
    """A distinct index per (optimisation step, micro-step, rank): every one gets its own rows."""
    ga, world, rank = t.cfg.train.grad_accum, t.accelerator.num_processes, t.accelerator.process_index
    return lambda step, micro: (step * ga + micro) * world + rank


def _stage1(t: Trainer) -> Stage:
    """Stage 1: the teacher's sequences (packed text or teacher rollouts)."""
    cfg, s1, bs = t.cfg, t.cfg.stage1, t.cfg.train.batch_size
    micro_index = _micro_index(t)
    fraction = logit_fraction(t.student.config, s1.head_budget, cfg.data.seq_len)
    t.result.logit_share = fraction
    if fraction < 1.0:
        logger.info(
            "stage 1 trains the logits of %.1f%% of the positions each step: the lm_head costs "
            "%.1fx the rest of the model per token (stage1.head_budget=%g)",
            100 * fraction,
            s1.head_budget / fraction,
            s1.head_budget,
        )

    def with_positions(b: Batch, step: int, micro: int) -> Batch:
        if fraction < 1.0:
            # Seeded per (step, micro-step, rank), so a resumed run draws the same positions.
            gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + micro_index(step, micro))
            b.positions = logit_positions(b.loss_mask, fraction, gen)
        return b

    if s1.mode == "text":
        blocks = zdata.pack_texts(
            zdata.read_jsonl(cfg.data.train_file, cfg.data.text_field), t.tokenizer, cfg.data.seq_len
        )
        sampler = zdata.BlockSampler(blocks, bs, cfg.train.seed)

        def batch(step: int, micro: int) -> Batch:
            return with_positions(text_batch(sampler.batch(micro_index(step, micro))), step, micro)
    else:
        prompts = zdata.load_prompts(cfg, t.tokenizer)
        rollouts = teacher_rollouts(t.student, t.tokenizer, cfg, prompts, t.accelerator)
        sampler = zdata.BlockSampler(
            torch.arange(len(rollouts))[:, None], min(bs, len(rollouts)), cfg.train.seed
        )

        def batch(step: int, micro: int) -> Batch:
            rows = [rollouts[int(i)] for i in sampler.batch(micro_index(step, micro)).reshape(-1)]
            return with_positions(pad_sequences(rows, t.tokenizer.pad_token_id), step, micro)

    def kd(b: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        loss = distill_loss(s1.kd, s_logits, t_logits, b.labels, b.kd_mask, s1.temperature)
        parts = {"kd": float(loss.detach())}
        if s1.nll_weight > 0 and s1.kd != "nll":
            nll = token_nll(s_logits, b.labels, b.kd_mask)
            loss = loss + s1.nll_weight * nll
            parts["nll"] = float(nll.detach())
        return loss, parts

    return Stage("stage1", s1.steps, s1.lr, batch, kd, needs_teacher_logits=s1.kd != "nll")


def _stage2(t: Trainer) -> Stage:
    """Stage 2: on-policy reverse KL on the student's own samples."""
    cfg, s2 = t.cfg, t.cfg.stage2
    world, rank = t.accelerator.num_processes, t.accelerator.process_index
    micro_index = _micro_index(t)
    prompts = zdata.load_prompts(cfg, t.tokenizer)
    parts = cfg.train.grad_accum * world
    if s2.num_prompts_per_step < parts:
        raise ZedaError(
            f"stage2.num_prompts_per_step={s2.num_prompts_per_step} is fewer than train.grad_accum x processes "
            f"= {parts}; raise it or lower train.grad_accum"
        )

    def batch(step: int, micro: int) -> Batch:
        # num_prompts_per_step per optimisation step, split over micro-steps and ranks.
        g = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
        pick = torch.randperm(len(prompts), generator=g).repeat(-(-s2.num_prompts_per_step // len(prompts)))
        part = torch.tensor_split(pick[: s2.num_prompts_per_step], parts)[micro * world + rank]
        samples = generate(
            t.student,
            t.tokenizer,
            [prompts[int(i)] for i in part],
            s2.max_new_tokens,
            s2.temperature,
            seed=cfg.train.seed + 1 + micro_index(step, micro),
            batch_size=len(part),
            desc="student samples",
        )
        return pad_sequences(samples, t.tokenizer.pad_token_id)

    def kd(b: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        if s2.loss == "pg":
            with torch.no_grad():
                t_lp = token_logprobs(t_logits, b.labels)
            pg = policy_gradient_reverse_kl(token_logprobs(s_logits, b.labels), t_lp, b.kd_mask)
            loss, rkl = pg.loss, pg.reverse_kl
        else:
            loss = reverse_kl(s_logits, t_logits, b.kd_mask, s2.temperature)
            rkl = loss
        return loss, {"kd": float(loss.detach()), "reverse_kl": float(rkl.detach())}

    return Stage("stage2", s2.steps, s2.lr, batch, kd)


def _check_resumable(run_path: Path, config: RunConfig) -> None:
    """Refuse a resume whose recipe changes what the checkpoint was trained under."""
    stored_path = run_path / "recipe.yaml"
    if not stored_path.is_file():
        raise ZedaError(f"{run_path} has a checkpoint but no recipe.yaml; it cannot be resumed safely")
    check_resume_inputs(run_path, config)
    stopped = (run_path / STOP_FILE).is_file()
    allow = ("stage1.lr", "stage2.lr", "train.max_grad_norm") if stopped else ()
    diffs = recipe_differences(load_recipe(stored_path), config, allow=allow)
    if diffs:
        raise ZedaError(f"cannot resume {run_path}: the recipe changed: {'; '.join(diffs)}")
