"""Two-stage self-distillation against the frozen original, in one explicit training loop.

Stage 1 (sequence-level): the student learns the teacher's sequences — either teacher rollouts
on a prompt set (token-mean NLL, the paper's recipe) or, in ``text`` mode, a text corpus with the
teacher's full next-token distribution (forward KL, optional NLL). Stage 2 (on-policy): the
student samples; the teacher scores exactly the same token ids; the loss is the per-token
reverse-KL policy-gradient estimator (or the full-vocabulary reverse KL). Both stages add the
two-group balance loss that pulls the zero-expert share towards its target.

The teacher is the same weights in `zeda.teacher_mode` (LoRA off, routers back to their frozen
copies, zero experts off): no second copy of the model. accelerate handles devices, gradient
accumulation and data parallelism.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from zeda.config import RunConfig
from zeda.distillation import data as zdata
from zeda.distillation.losses import (
    GroupStats,
    all_reduce_counts,
    distill_loss,
    group_balance_loss,
    group_balance_stats,
    policy_gradient_reverse_kl,
    reverse_kl,
    router_probs,
    token_nll,
)
from zeda.distillation.student import is_student, make_student
from zeda.errors import ZedaError
from zeda.zero.inject import inject_zero_experts, is_injected, teacher_mode
from zeda.zero.routing import RouterCapture, zero_routers

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"


@dataclass
class DistillResult:
    """Outcome of `distill`.

    Attributes:
        output_dir: Run directory (metrics.jsonl, checkpoint/).
        stage1_steps: Optimisation steps done in stage 1.
        stage2_steps: Optimisation steps done in stage 2.
        final_zero_share: Zero-expert share of routed slots over the last logged window.
        target_zero_share: Equilibrium share the balance loss aims at.
        tokens_seen: Student tokens processed.
        wall_seconds: Training time of this call.
        last: The last logged metrics row.
    """

    output_dir: str
    stage1_steps: int = 0
    stage2_steps: int = 0
    final_zero_share: float = float("nan")
    target_zero_share: float = float("nan")
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    last: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    def _repr_markdown_(self) -> str:
        rows = "\n".join(f"| {k} | {v} |" for k, v in self.to_dict().items() if k != "last")
        return f"| field | value |\n|---|---|\n{rows}"


# ----------------------------------------------------------------------------------------------
# Balance loss from the routers captured during the student forward
# ----------------------------------------------------------------------------------------------


class BalanceTracker:
    """Builds the group balance loss from captured router logits.

    With ``global_batch`` the expert-load fractions ``f`` use the slot counts accumulated over
    the micro-steps of the current optimisation step so far and summed over data-parallel ranks
    (Qwen's global-batch balancing); the probabilities ``P`` stay per micro-batch.
    """

    def __init__(self, cfg: RunConfig, global_batch: bool) -> None:
        self.cfg, self.global_batch = cfg, global_batch
        self.window: dict[int, GroupStats] = {}
        self.zero_slots = 0.0
        self.slots = 0.0

    def reset_window(self) -> None:
        """Start a new optimisation step."""
        self.window = {}

    def loss(self, records: list[tuple[nn.Module, torch.Tensor]], mask: torch.Tensor | None) -> torch.Tensor:
        """Balance loss of one micro-batch; also accumulates the zero share for logging.

        Args:
            records: ``(router, logits (T, E+Z))`` pairs from `RouterCapture`.
            mask: ``(T,)`` token mask or None.
        """
        if not records:
            return torch.zeros(())
        losses = []
        for i, (router, logits) in enumerate(records):
            e, z, k = router.num_experts, router.num_zero_experts, router.top_k
            probs = router_probs(logits, router.zeda_router_kind)
            st = group_balance_stats(probs, e, k, mask)
            self.zero_slots += float(st.count_Z)
            self.slots += float(st.count_E + st.count_Z)
            if self.global_batch:
                prev = self.window.get(i)
                counted = (
                    st
                    if prev is None
                    else GroupStats(
                        prev.count_E + st.count_E,
                        prev.count_Z + st.count_Z,
                        st.prob_sum_E,
                        st.prob_sum_Z,
                        st.n_tokens,
                    )
                )
                self.window[i] = counted.detach()
                st = all_reduce_counts(counted)
            w = self.cfg.balance.resolve_w(e, z)
            losses.append(group_balance_loss([st], e, z, k, self.cfg.balance.alpha, w))
        return torch.stack(losses).sum()

    def pop_share(self) -> float:
        """Zero share (fresh top-k over router probabilities) since the last call."""
        share = self.zero_slots / self.slots if self.slots else float("nan")
        self.zero_slots = self.slots = 0.0
        return share


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, model: nn.Module, state: dict, optimizer: Any, scheduler: Any) -> None:
    """Atomically write trainable tensors, optimiser/scheduler state and progress to ``out/checkpoint``."""
    tmp = out / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()},
        tmp / "trainable.safetensors",
    )
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final = out / CHECKPOINT
    old = out / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model: nn.Module) -> dict | None:
    """Restore trainable tensors from ``out/checkpoint``; return its state (None if absent)."""
    ckpt = out / CHECKPOINT
    if not (ckpt / "state.json").exists():
        return None
    tensors = load_file(ckpt / "trainable.safetensors")
    params = _trainable(model)
    if set(tensors) != set(params):
        raise ZedaError(f"checkpoint {ckpt} does not match this model/recipe; use another train.output_dir")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    state = json.loads((ckpt / "state.json").read_text())
    state["_optim"] = torch.load(ckpt / "optim.pt", weights_only=False)
    return state


# ----------------------------------------------------------------------------------------------
# Batches of each stage
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One micro-batch: ``input_ids``/``attention_mask`` ``(B, T)`` and a loss mask ``(B, T)``
    marking the positions whose *next* token is trained (the last position is never trained)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


def _text_batch(ids: torch.Tensor) -> Batch:
    mask = torch.ones_like(ids)
    loss_mask = mask.clone()
    loss_mask[:, -1] = 0
    return Batch(ids, mask, loss_mask)


def _pad_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Batch:
    """Left-pad prompt+response sequences; the loss covers the response tokens."""
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    loss = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        s = p + r
        ids[i, width - len(s) :] = torch.tensor(s)
        att[i, width - len(s) :] = 1
        # Position t predicts token t+1: train positions whose next token is a response token.
        start = width - len(r) - 1
        loss[i, start : width - 1] = 1
    return Batch(ids, att, loss)


def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).logits


def _next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` log-probability of token t+1 at position t (last position: 0)."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(lp, (0, 1))


def _labels(ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(ids[:, 1:], (0, 1))


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 8,
    desc: str = "generate",
) -> list[tuple[list[int], list[int]]]:
    """Sample continuations with KV cache, batched and left-padded.

    Returns:
        ``(prompt_ids, response_ids)`` per prompt; responses stop after the first EOS.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[tuple[list[int], list[int]]] = []
    was_training = model.training
    model.eval()
    for j, chunk in enumerate(tqdm(list(zdata.iter_batches(prompts, batch_size)), desc=desc, leave=False)):
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, width - len(e) :] = torch.tensor(e)
            att[i, width - len(e) :] = 1
        torch.manual_seed(seed * 100003 + j)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for i, e in enumerate(enc):
            resp = gen[i, width:].tolist()
            if eos is not None and eos in resp:
                resp = resp[: resp.index(eos) + 1]
            out.append((e, resp or [eos if eos is not None else pad]))
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _scheduler(cfg: RunConfig, optimizer: Any, steps: int) -> Any:
    warmup = int(cfg.train.warmup_ratio * steps)
    if cfg.train.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _run_stage(
    name: str,
    steps: int,
    lr: float,
    micro_loss: Callable[[int, int], tuple[torch.Tensor, dict, int]],
    *,
    model: nn.Module,
    accelerator: Accelerator,
    cfg: RunConfig,
    out: Path,
    tracker: BalanceTracker,
    resume_state: dict | None,
    result: DistillResult,
) -> int:
    """Optimise one stage; ``micro_loss(step, micro)`` returns (loss, metrics, tokens)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    scheduler = _scheduler(cfg, optimizer, steps)
    start = 0
    if resume_state and resume_state.get("stage") == name:
        optimizer.load_state_dict(resume_state["_optim"]["optimizer"])
        scheduler.load_state_dict(resume_state["_optim"]["scheduler"])
        start = int(resume_state["step"])
    model_p, optimizer_p = accelerator.prepare(model, optimizer)
    metrics_path = out / "metrics.jsonl"
    bar = tqdm(
        range(start, steps), desc=name, disable=not accelerator.is_main_process, initial=start, total=steps
    )
    window: dict[str, float] = {}
    window_steps = 0
    t0, tokens = time.perf_counter(), 0
    model_p.train()
    for step in bar:
        tracker.reset_window()
        for micro in range(cfg.train.grad_accum):
            with accelerator.accumulate(model_p):
                loss, parts, ntok = micro_loss(step, micro)
                if not torch.isfinite(loss):
                    raise ZedaError(
                        f"non-finite loss ({float(loss.detach())}) at {name} step {step}; the last good checkpoint is kept "
                        f"in {out / CHECKPOINT}; lower the learning rate and resume"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer_p.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer_p.zero_grad()
            tokens += ntok
            for k, v in parts.items():
                window[k] = window.get(k, 0.0) + float(v) / cfg.train.grad_accum
        done = step + 1
        window_steps += 1
        if (cfg.train.log_every > 0 and done % cfg.train.log_every == 0) or done == steps:
            n = max(window_steps, 1)
            dt = time.perf_counter() - t0
            row = {k: v / n for k, v in window.items()}
            row.update(
                stage=name,
                step=done,
                lr=scheduler.get_last_lr()[0],
                zero_share=tracker.pop_share(),
                tokens_per_s=tokens / dt if dt > 0 else 0.0,
            )
            window, window_steps = {}, 0
            result.tokens_seen += tokens
            t0, tokens = time.perf_counter(), 0
            result.final_zero_share = row["zero_share"]
            result.last = row
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(
                    loss=f"{row.get('loss', 0):.4f}",
                    kd=f"{row.get('kd', 0):.4f}",
                    bal=f"{row.get('balance', 0):.4f}",
                    zero=f"{row['zero_share']:.3f}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                )
        if (cfg.train.save_every > 0 and done % cfg.train.save_every == 0) or done == steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    out,
                    accelerator.unwrap_model(model_p),
                    {"stage": name, "step": done},
                    optimizer,
                    scheduler,
                )
    result.tokens_seen += tokens
    return steps


def _prepare_output(cfg: RunConfig) -> tuple[Path, bool]:
    out = Path(cfg.train.output_dir)
    has_ckpt = (out / CHECKPOINT / "state.json").exists()
    if out.exists() and any(out.iterdir()):
        if cfg.train.resume:
            if not has_ckpt:
                raise ZedaError(
                    f"train.resume=true but {out} holds no checkpoint; start a new run without resume"
                )
        elif cfg.train.overwrite:
            shutil.rmtree(out)
        else:
            raise ZedaError(
                f"output directory {out} already exists; pass train.resume=true to continue it "
                "or train.overwrite=true to start over"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out, cfg.train.resume and has_ckpt


def distill(
    model: nn.Module, config: RunConfig, tokenizer: Any = None, accelerator: Accelerator | None = None
) -> tuple[nn.Module, DistillResult]:
    """Distill ``model`` into a zero-expert student against its own frozen original.

    Args:
        model: An original MoE model (injected here per ``config.inject``), an injected model,
            or a student returned by an earlier call.
        config: The run configuration.
        tokenizer: The model's tokenizer (required for rollouts, stage 2 and text data).
        accelerator: An `accelerate.Accelerator` (one is made from ``config.train`` if omitted).

    Returns:
        ``(student, result)``: the PEFT-wrapped student (its ``disable_adapter()`` context plus
        `zeda.teacher_mode` is the teacher) and a `DistillResult`.
    """
    config.validate()
    if tokenizer is None:
        raise ZedaError("distill needs the model's tokenizer")
    accelerator = accelerator or Accelerator(gradient_accumulation_steps=config.train.grad_accum)
    out, resuming = _prepare_output(config)
    if not is_injected(model):
        inject_zero_experts(
            model,
            num_zero_experts=config.inject.num_zero_experts,
            seed=config.inject.seed,
            experts_implementation=config.model.experts_implementation or "zeda",
        )
    student = model if is_student(model) else make_student(model, config.lora)
    student.to(accelerator.device)
    resume_state = load_checkpoint(out, student) if resuming else None
    if resume_state:
        logger.info("resuming %s from %s step %s", out, resume_state["stage"], resume_state["step"])
    torch.manual_seed(config.train.seed)
    routers = [r for r in zero_routers(student) if r.num_zero_experts > 0]
    e, z = routers[0].num_experts, routers[0].num_zero_experts
    result = DistillResult(output_dir=str(out), target_zero_share=config.balance.resolve_target_share(e, z))
    tracker = BalanceTracker(config, config.balance.global_batch)
    world, rank = accelerator.num_processes, accelerator.process_index
    ga, bs = config.train.grad_accum, config.train.batch_size
    device = accelerator.device
    base = accelerator.unwrap_model  # the teacher runs on the unwrapped PEFT model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    t_start = time.perf_counter()
    stage_order = ["stage1", "stage2"]
    done_stages = set()
    if resume_state:
        done_stages = set(stage_order[: stage_order.index(resume_state["stage"])])
        if int(resume_state["step"]) >= _stage_steps(config, resume_state["stage"]):
            done_stages.add(resume_state["stage"])

    def student_loss(batch: Batch, kd_kind: str, nll_weight: float) -> tuple[torch.Tensor, dict, int]:
        batch = batch.to(device)
        with torch.no_grad(), teacher_mode(base(student)):
            t_logits = _forward(base(student), batch) if kd_kind != "nll" else None
        with RouterCapture() as cap:
            s_logits = _forward(student, batch)
            bal = tracker.loss(cap.records, batch.attention_mask.reshape(-1))
        labels = _labels(batch.input_ids)
        kd = distill_loss(kd_kind, s_logits, t_logits, labels, batch.loss_mask, config.stage1.temperature)
        loss = kd + bal.to(kd.device)
        parts = {"kd": float(kd.detach()), "balance": float(bal.detach())}
        if nll_weight > 0 and kd_kind != "nll":
            nll = token_nll(s_logits, labels, batch.loss_mask)
            loss = loss + nll_weight * nll
            parts["nll"] = float(nll.detach())
        parts["loss"] = float(loss.detach())
        return loss, parts, int(batch.attention_mask.sum())

    # ---- stage 1 ----
    s1 = config.stage1
    if s1.enabled and "stage1" not in done_stages:
        if s1.mode == "text":
            texts = zdata.read_jsonl(config.data.train_file, config.data.text_field)
            blocks = zdata.pack_texts(texts, tokenizer, config.data.seq_len)
            sampler = zdata.BlockSampler(blocks, bs, config.train.seed)

            def s1_loss(step: int, micro: int) -> tuple[torch.Tensor, dict, int]:
                ids = sampler.batch((step * ga + micro) * world + rank)
                return student_loss(_text_batch(ids), s1.kd, s1.nll_weight)
        else:
            rollouts = _teacher_rollouts(student, tokenizer, config, out, accelerator)

            def s1_loss(step: int, micro: int) -> tuple[torch.Tensor, dict, int]:
                n = len(rollouts)
                g = torch.Generator().manual_seed(config.train.seed + step)
                pick = torch.randperm(n, generator=g)[: bs * world][rank * bs : (rank + 1) * bs] if n else []
                rows = [rollouts[int(i)] for i in pick]
                batch = _pad_sequences([r[0] for r in rows], [r[1] for r in rows], tokenizer.pad_token_id)
                return student_loss(batch, s1.kd, s1.nll_weight)

        result.stage1_steps = _run_stage(
            "stage1",
            s1.steps,
            s1.lr,
            s1_loss,
            model=student,
            accelerator=accelerator,
            cfg=config,
            out=out,
            tracker=tracker,
            resume_state=resume_state,
            result=result,
        )
    elif "stage1" in done_stages:
        result.stage1_steps = s1.steps

    # ---- stage 2 ----
    s2 = config.stage2
    if s2.enabled:
        prompts = _prompts(config, tokenizer)

        def s2_loss(step: int, micro: int) -> tuple[torch.Tensor, dict, int]:
            g = torch.Generator().manual_seed(config.train.seed * 7919 + step * ga + micro)
            pick = torch.randperm(len(prompts), generator=g)[: s2.num_prompts_per_step * world]
            mine = [
                prompts[int(i)]
                for i in pick[rank * s2.num_prompts_per_step : (rank + 1) * s2.num_prompts_per_step]
            ]
            samples = generate(
                base(student),
                tokenizer,
                mine,
                s2.max_new_tokens,
                s2.temperature,
                seed=config.train.seed + 1 + step * ga + micro,
                batch_size=len(mine),
                desc="student samples",
            )
            batch = _pad_sequences(
                [s[0] for s in samples], [s[1] for s in samples], tokenizer.pad_token_id
            ).to(device)
            with torch.no_grad(), teacher_mode(base(student)):
                t_logits = _forward(base(student), batch)
            with RouterCapture() as cap:
                s_logits = _forward(student, batch)
                bal = tracker.loss(cap.records, batch.attention_mask.reshape(-1))
            if s2.loss == "pg":
                ids = batch.input_ids
                pg = policy_gradient_reverse_kl(
                    _next_token_logprobs(s_logits, ids), _next_token_logprobs(t_logits, ids), batch.loss_mask
                )
                kd, rkl = pg.loss, pg.reverse_kl
            else:
                kd = reverse_kl(s_logits, t_logits, batch.loss_mask, s2.temperature)
                rkl = kd
            loss = kd + bal.to(kd.device)
            return (
                loss,
                {
                    "loss": float(loss.detach()),
                    "kd": float(kd.detach()),
                    "reverse_kl": float(rkl.detach()),
                    "balance": float(bal.detach()),
                },
                int(batch.attention_mask.sum()),
            )

        state2 = resume_state if resume_state and resume_state["stage"] == "stage2" else None
        result.stage2_steps = _run_stage(
            "stage2",
            s2.steps,
            s2.lr,
            s2_loss,
            model=student,
            accelerator=accelerator,
            cfg=config,
            out=out,
            tracker=tracker,
            resume_state=state2,
            result=result,
        )
    result.wall_seconds = time.perf_counter() - t_start
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
    return accelerator.unwrap_model(student), result


def _stage_steps(cfg: RunConfig, stage: str) -> int:
    return cfg.stage1.steps if stage == "stage1" else cfg.stage2.steps


def _prompts(cfg: RunConfig, tokenizer: Any) -> list[str]:
    limit = cfg.data.max_prompts or 4096
    if cfg.data.prompt_file:
        raw = zdata.read_jsonl(cfg.data.prompt_file, cfg.data.text_field, limit)
    else:
        texts = zdata.read_jsonl(cfg.data.train_file, cfg.data.text_field)
        raw = zdata.prompts_from_texts(
            texts, tokenizer, prompt_tokens=min(64, cfg.data.seq_len // 2), limit=limit
        )
    return [zdata.format_prompt(tokenizer, p, cfg.data.chat_template) for p in raw]


def _teacher_rollouts(
    student: nn.Module, tokenizer: Any, cfg: RunConfig, out: Path, accelerator: Accelerator
) -> list[tuple[list[int], list[int]]]:
    """Teacher samples on the prompt set, cached as JSONL and reused on re-runs."""
    prompts = _prompts(cfg, tokenizer)
    gen_cfg = {
        "max_new_tokens": cfg.stage1.max_new_tokens,
        "temperature": cfg.stage1.temperature,
        "seed": cfg.train.seed,
    }
    model_id = str(cfg.model.name_or_path)
    cache_dir = Path(cfg.data.rollout_cache) if cfg.data.rollout_cache else out
    path = zdata.rollout_cache_path(cache_dir, model_id, prompts, gen_cfg)
    if path.exists():
        rows = [json.loads(line) for line in path.open()]
        logger.info("reusing %d teacher rollouts from %s", len(rows), path)
    else:
        base = accelerator.unwrap_model(student)
        with teacher_mode(base):
            samples = generate(
                base,
                tokenizer,
                prompts,
                cfg.stage1.max_new_tokens,
                cfg.stage1.temperature,
                seed=cfg.train.seed,
                batch_size=cfg.stage1.rollout_batch_size,
                desc="teacher rollouts",
            )
        rows = [{"prompt_ids": p, "response_ids": r} for p, r in samples]
        if accelerator.is_main_process:
            zdata.write_jsonl_atomic(path, rows)
    return [(r["prompt_ids"], r["response_ids"]) for r in rows]


__all__ = ["DistillResult", "distill", "generate", "load_checkpoint", "save_checkpoint"]

_ = (math, os)
