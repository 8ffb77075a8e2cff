"""Train, evaluate and write one zoo member, whatever its family (the member table has the family).

    python -m evals.zoo.data mixtral                               # splits + tokenizer + tokens
    python -m evals.zoo.train mixtral --max-minutes 55             # train (checkpoints in the cache)
    python -m evals.zoo.train mixtral --resume                     # continue a stopped run
    python -m evals.zoo.train mixtral --finalize                   # evaluate, write model/ + card

Training: AdamW (0.9, 0.95, wd 0.1), linear warmup then cosine decay over ``--steps`` (the
member's default), clipped gradients, float32, the eager experts backend. The batch of step ``i``
depends only on the seed and ``i`` (random windows of the tokenised train split), so a resumed
run sees exactly the batches an uninterrupted one would. Load balancing by family: ``aux`` members
use the family's own load-balancing loss (``router_aux_loss_coef``, added to the loss by
transformers); ``bias`` members (sigmoid routers with ``e_score_correction_bias``) are balanced as
DeepSeek-V3 does it (arXiv 2412.19437, 2.1.2): after every optimiser step each layer's bias moves
by gamma towards balance, ``b_i += gamma * sign(mean_load - load_i)`` (a buffer: no gradient, no
weight decay), plus a sequence-wise balance loss with a tiny coefficient. Every ``eval_every``
steps the validation perplexity of a fixed slice is logged (the card's convergence curve).

``--max-minutes`` (training wall clock, summed over resumed runs) and ``--stop-at-step`` end a run
early with a checkpoint; checkpoints are written atomically every ``--save-every`` steps. Every
invocation is recorded in the checkpoint and the card's rebuild command lists them.
``--finalize`` saves the model in bfloat16 (routers and correction biases of ``fp32_router``
members in float32) to a temporary folder, **reloads it with the stock transformers class**,
evaluates the reloaded weights (validation and test perplexity, unigram baseline, per-layer expert
load, a small check figure that the tests recompute) and renames it over ``model/``.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
from __future__ import annotations

import os

# Waiting OpenMP workers must sleep, not spin: on a shared, oversubscribed machine spinning workers
# made a 2-thread training step ~8x slower (and tiny ops ~100x). Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import math
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    get_cosine_schedule_with_warmup,
)

import zeda  # noqa: F401  (registers the families)
from evals.zoo import data as zdata
from evals.zoo.members import CORPORA, MEMBERS, ROOT, Member, get_member
from zeda.cpu_memory import reuse_freed_memory
from zeda.families import get_spec

log = logging.getLogger("evals.zoo.train")
EVAL_TOKENS = 200_000
CHECK_BLOCKS = 8


# ---------------------------------------------------------------- model


def build_config(member: Member, tok, **overrides: Any):
    """The member's transformers config (special ids from the tokenizer, balancing from the member).

    ``overrides`` replace config fields (the tests build tiny versions this way).
    """
    spec = get_spec(member.family)
    sep = zdata.doc_sep_id(member, tok)
    kwargs: dict[str, Any] = dict(member.config)
    kwargs.update(
        vocab_size=member.vocab_size or len(tok),
        bos_token_id=sep if tok.bos_token_id is None else tok.bos_token_id,
        eos_token_id=sep,
        pad_token_id=sep if tok.pad_token_id is None else tok.pad_token_id,
    )
    if member.balance == "aux":
        kwargs.update(output_router_logits=True, router_aux_loss_coef=member.aux_coef)
    kwargs.update(overrides)
    return spec.config_class(**kwargs)


_TINY_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "moe_intermediate_size": 16,
    "head_dim": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "max_position_embeddings": 64,
    "sliding_window": 16,
}


def tiny_overrides(member: Member) -> dict[str, Any]:
    """Config fields that shrink a member to a tiny model of the same family and routing.

    Widths shrink; layer counts, expert counts, top-k, groups, shared and dense layers stay, so the
    tiny model routes like the member.
    """
    out = {k: v for k, v in _TINY_SIZES.items() if k in member.config}
    if member.config.get("q_lora_rank"):
        out["q_lora_rank"] = 16
    if get_spec(member.family).attention == "mla":
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def build_model(member: Member, config, seed: int) -> torch.nn.Module:
    """A freshly initialised model of the member's family (seeded), eager experts, train mode."""
    torch.manual_seed(seed)
    model = get_spec(member.family).causal_lm_class(config)
    model.set_experts_implementation(member.experts_implementation)
    return model


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router of every MoE layer, in layer order (found by the family's router class)."""
    cls = get_spec(model.config.model_type).router_class
    return [m for m in model.modules() if isinstance(m, cls)]


def moe_layers(model: torch.nn.Module) -> list[int]:
    """Decoder-layer indices of the MoE layers."""
    return get_spec(model.config.model_type).moe_layer_indices(model.config)


class RouterTap:
    """Forward hooks on the model's routers that keep each call's logits and chosen experts.

    ``records[i]`` is ``(router_logits (N, E), topk_indices (N, K))`` of MoE layer ``i`` in the
    last forward, ``N`` = batch * seq tokens. Every family's router returns
    ``(logits, weights, indices)``; the hooks only read.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.records: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._handles = []
        for i, r in enumerate(routers(model)):
            self.records.append(None)
            self._handles.append(r.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(_module, _inputs, outputs) -> None:
            self.records[i] = (outputs[0], outputs[2])

        return hook

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()

    def __enter__(self) -> RouterTap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def seq_aux_loss(records, num_experts: int, top_k: int, batch: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, summed over layers (before alpha).

    ``sum_i f_i P_i`` per sequence, averaged over sequences; ``f_i = E/(K T) * #slots of i`` (no
    gradient), ``P_i`` = mean over the sequence's tokens of the sum-normalised sigmoid scores.
    """
    total = 0.0
    for logits, idx in records:
        s = logits.sigmoid().view(batch, -1, num_experts)  # (B, T, E)
        p = (s / s.sum(-1, keepdim=True)).mean(1)  # (B, E)
        t = s.shape[1]
        counts = torch.zeros(batch, num_experts, device=idx.device)
        counts.scatter_add_(1, idx.view(batch, -1), torch.ones_like(idx.view(batch, -1), dtype=counts.dtype))
        f = counts * num_experts / (top_k * t)  # (B, E)
        total = total + (f * p).sum(-1).mean()
    return total


@torch.no_grad()
def update_bias(model: torch.nn.Module, records, gamma: float) -> list[float]:
    """Aux-loss-free balancing: ``b_i += gamma * sign(mean_load - load_i)`` per layer.

    Returns:
        Per layer, max/mean of the step's expert load (before the update).
    """
    e = get_spec(model.config.model_type).num_experts(model.config)
    ratios = []
    for r, (_logits, idx) in zip(routers(model), records, strict=True):
        load = torch.bincount(idx.reshape(-1), minlength=e).float()
        r.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))
        ratios.append(float(load.max() / load.mean()))
    return ratios


# ---------------------------------------------------------------- data and evaluation


def batch_at(data: torch.Tensor, step: int, bs: int, seq: int, seed: int) -> torch.Tensor:
    """The batch of step ``step``: ``bs`` random windows of ``seq`` tokens. ``(bs, seq)`` int64."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq - 1, (bs,), generator=g)
    return torch.stack([data[s : s + seq] for s in starts.tolist()]).long()


def load_tokens(member: Member, split: str) -> torch.Tensor:
    """The cached token tensor of a split (built by ``python -m evals.zoo.data``). ``(n,)`` int32."""
    path = zdata.tokens_path(member, split)
    if not path.exists():
        raise SystemExit(f"zoo: {path} missing; run python -m evals.zoo.data {member.name} first")
    return torch.load(path)


def _load_stats(counts: torch.Tensor, layer: int) -> dict:
    p = counts / counts.sum()
    return {
        "layer": layer,
        "entropy_nats": float(-(p * p.clamp_min(1e-12).log()).sum()),
        "max_entropy_nats": math.log(counts.numel()),
        "max_over_mean": float(counts.max() / counts.mean()),
        "min_over_mean": float(counts.min() / counts.mean()),
        "experts_under_1pct_of_mean": int((counts < 0.01 * counts.mean()).sum()),
    }


@torch.no_grad()
def evaluate(
    model, data: torch.Tensor, seq: int, max_tokens: int, batch: int = 8
) -> tuple[float, list[dict]]:
    """Perplexity on consecutive ``seq``-token blocks and per-MoE-layer load of the chosen experts.

    The loss is the language-model loss only (no balance term); the load counts the router's
    actual top-k choice. Restores the model's train/eval mode.
    """
    was_training = model.training
    model.eval()
    n_blocks = min(max_tokens // seq, data.numel() // seq)
    e = get_spec(model.config.model_type).num_experts(model.config)
    device = next(model.parameters()).device
    nll, count, loads = 0.0, 0, None
    kw = {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}
    with RouterTap(model) as tap:
        for i in range(0, n_blocks, batch):
            ids = torch.stack([data[j * seq : (j + 1) * seq] for j in range(i, min(i + batch, n_blocks))])
            ids = ids.long().to(device)
            out = model(ids, labels=ids, **kw)
            n = ids.numel() - ids.shape[0]
            nll += float(out.loss) * n
            count += n
            layer_counts = [torch.bincount(idx.reshape(-1), minlength=e).double() for _, idx in tap.records]
            loads = (
                layer_counts if loads is None else [a + b for a, b in zip(loads, layer_counts, strict=True)]
            )
    model.train(was_training)
    return math.exp(nll / count), [
        _load_stats(c, layer) for c, layer in zip(loads, moe_layers(model), strict=True)
    ]


def unigram_ppl(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one unigram model fitted on the train tokens."""
    counts = torch.bincount(train.long(), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[test.long()].mean()))


# ---------------------------------------------------------------- training


def save_ckpt(run: Path, state: dict) -> None:
    """Write the training state atomically (temp file + rename)."""
    tmp = run / "ckpt.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run / "ckpt.pt")


def device_name(device: str) -> str:
    """A run's device as recorded: ``cpu`` or the GPU's name."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def plan_restarts(ck: dict, args: argparse.Namespace) -> list[dict]:
    """The warm restarts of a resumed run: the checkpoint's, plus ``--extend`` when it adds one.

    A restart continues a finished schedule for ``steps`` more optimiser steps (AdamW moments
    kept): linear warmup over ``warmup`` steps to ``lr``, then cosine decay to 0. Repeating the
    ``--extend`` command resumes that restart instead of adding another.
    """
    restarts = [dict(r) for r in ck.get("restarts", [])]
    if not args.extend:
        return restarts
    want = {"steps": args.extend, "lr": args.extend_lr, "warmup": args.extend_warmup}
    if restarts and {k: restarts[-1][k] for k in want} == want and ck["step"] < ck["total_steps"]:
        return restarts
    if ck["step"] != ck["total_steps"]:
        raise SystemExit(
            f"zoo: --extend continues a finished schedule, but the checkpoint is at step {ck['step']} "
            f"of {ck['total_steps']}; finish it first with --resume"
        )
    return [*restarts, {"from_step": ck["step"], **want}]


def restart_schedule(
    opt: torch.optim.Optimizer, args: argparse.Namespace, restarts: list[dict]
) -> torch.optim.lr_scheduler.LambdaLR:
    """The first schedule (``--steps``, warmup, cosine) followed by each warm restart's."""
    first = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps).lr_lambdas[0]

    def factor(step: int) -> float:
        for r in reversed(restarts):
            if step >= r["from_step"]:
                s, w = step - r["from_step"], r["warmup"]
                f = (
                    s / max(1, w)
                    if s < w
                    else 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, r["steps"] - w)))
                )
                return max(0.0, f) * r["lr"] / args.lr
        return first(step)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(
    member: Member,
    model: torch.nn.Module,
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor,
    args: argparse.Namespace,
    invocation: str,
) -> dict:
    """Train from scratch or resume from ``run/ckpt.pt`` until a stop condition; returns the last state."""
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model.to(args.device)
    device = device_name(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    restarts: list[dict] = []
    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "wall": 0.0,
        "cpu": 0.0,
        "curve": [],
        "invocations": [],
        "segments": [],
    }
    ckpt = run / "ckpt.pt"
    if ckpt.exists():
        if not args.resume:
            raise SystemExit(f"zoo: {ckpt} exists; pass --resume to continue it or delete {run}")
        ck = torch.load(ckpt, weights_only=False, map_location=args.device)
        if ck.get("device", "cpu") != device:
            raise SystemExit(f"zoo: {ckpt} was trained on {ck.get('device', 'cpu')}, not {device}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        restarts = plan_restarts(ck, args)
        if restarts:
            sched = restart_schedule(opt, args, restarts)
        sched.load_state_dict(ck["sched"])
        if restarts:
            # The checkpoint's learning rate is the finished schedule's last (0): set this step's.
            for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
                group["lr"] = base * sched.lr_lambdas[0](sched.last_epoch)
        keys = ("step", "tokens", "wall", "cpu", "curve", "invocations", "segments")
        state = {k: ck[k] for k in keys if k in ck}
        for key, empty in (("curve", []), ("invocations", []), ("segments", []), ("cpu", 0.0)):
            state.setdefault(key, empty)
        log.info("resumed at step %d (%d tokens, %.0f s)", state["step"], state["tokens"], state["wall"])
    elif args.extend:
        raise SystemExit(f"zoo: --extend continues a finished run, but {ckpt} does not exist; train first")
    elif args.resume:
        log.info("no checkpoint in %s: starting from scratch", run)
    total = restarts[-1]["from_step"] + restarts[-1]["steps"] if restarts else args.steps
    state["restarts"] = restarts
    state["invocations"].append(invocation)
    state["segments"].append({"from_step": state["step"], "steps": total, "threads": args.threads})
    cfg = model.config
    spec = get_spec(cfg.model_type)
    stop = min(total, args.stop_at_step or total)
    budget = args.max_minutes * 60 if args.max_minutes else math.inf
    step = state["step"]
    eval_tokens = args.eval_blocks * args.seq_len

    def checkpoint(step_done: int) -> None:
        save_ckpt(
            run,
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                **state,
                "step": step_done,
                "total_steps": total,
                "threads": args.threads,
                "device": device,
                "member": member.name,
            },
        )

    def eval_point(step_done: int) -> None:
        ppl, _ = evaluate(model, val_tokens, args.seq_len, eval_tokens)
        state["curve"] = [p for p in state["curve"] if p["step"] != step_done]
        state["curve"].append({"step": step_done, "val_ppl": ppl, "tokens": state["tokens"]})
        log.info("step %d: validation perplexity %.3f (%d tokens)", step_done, ppl, eval_tokens)

    if args.eval_every and step == 0 and not state["curve"]:
        eval_point(0)
    model.train()
    with RouterTap(model) as tap, open(run / "train_log.jsonl", "a") as logf:
        bar = tqdm(range(step, stop), initial=step, total=stop, desc=f"train {member.name}", mininterval=30)
        for step in bar:
            t0, c0 = time.perf_counter(), time.process_time()
            ids = batch_at(train_tokens, step, args.batch_size, args.seq_len, args.seed).to(args.device)
            out = model(ids, labels=ids)
            loss = out.loss
            row: dict[str, Any] = {}
            if member.balance == "bias":
                aux = seq_aux_loss(tap.records, spec.num_experts(cfg), spec.top_k(cfg), ids.shape[0])
                loss = loss + args.seq_aux_coef * aux
                row["seq_aux"] = float(aux.detach())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if member.balance == "bias":
                ratios = update_bias(model, tap.records, args.bias_update_speed)
            state["wall"] += time.perf_counter() - t0
            state["cpu"] += time.process_time() - c0
            state["tokens"] += ids.numel()
            done = step + 1 == stop or state["wall"] >= budget
            if (step + 1) % 10 == 0 or done:
                lm = float(out.loss.detach())
                row = {"step": step + 1, "loss": lm, **row}
                if member.balance == "aux":
                    row["aux"] = float(out.aux_loss.detach())
                else:
                    row["load_max_over_mean"] = [round(x, 3) for x in ratios]
                    row["bias_abs_max"] = [
                        float(r.e_score_correction_bias.abs().max()) for r in routers(model)
                    ]
                row.update(
                    lr=sched.get_last_lr()[0],
                    tokens=state["tokens"],
                    wall_s=state["wall"],
                    cpu_s=state["cpu"],
                )
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                bar.set_postfix(loss=f"{lm:.3f}", tok_s=f"{state['tokens'] / state['wall']:.0f}")
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total):
                eval_point(step + 1)
            if (step + 1) % args.save_every == 0 or done:
                checkpoint(step + 1)
            if done:
                break
    state["step"] = step + 1 if stop > state["step"] else state["step"]
    log.info(
        "stopped at step %d of %d (%d tokens, %.0f s of training)",
        state["step"],
        total,
        state["tokens"],
        state["wall"],
    )
    return state


# ---------------------------------------------------------------- finalize


def save_model(member: Member, model: torch.nn.Module, tok, out: Path) -> None:
    """bf16 weights (routers and correction biases of ``fp32_router`` members kept in float32)."""
    keep: dict[str, torch.Tensor] = {}
    if member.fp32_router:
        for r in routers(model):
            for t in [*r.parameters(recurse=False), *r.buffers(recurse=False)]:
                keep[id(t)] = t.detach().clone()
    tensors = {
        id(t): t for r in routers(model) for t in [*r.parameters(recurse=False), *r.buffers(recurse=False)]
    }
    model.to(torch.bfloat16)
    with torch.no_grad():
        for key, saved in keep.items():
            tensors[key].data = saved
    model.config.output_router_logits = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    sep = zdata.doc_sep_id(member, tok)
    GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=sep, pad_token_id=sep
    ).save_pretrained(out)


def convergence(curve: list[dict], steps: int) -> dict:
    """How flat the validation curve is over the last 20% of the schedule.

    Returns:
        ``window_from`` (first step of the window), ``rel_change`` (ppl at the window's first
        point / final ppl - 1), ``rel_range`` (max/min - 1 within the window), ``converged``
        (range within 1%).
    """
    start = 0.8 * steps
    pts = [p for p in curve if p["step"] >= start]
    if len(pts) < 2:
        return {"window_from": start, "points": len(pts), "converged": False}
    vals = [p["val_ppl"] for p in pts]
    rng = max(vals) / min(vals) - 1
    return {
        "window_from": pts[0]["step"],
        "points": len(pts),
        "rel_change": vals[0] / vals[-1] - 1,
        "rel_range": rng,
        "converged": rng <= 0.01,
    }


def rebuild_command(member: Member, invocations: list[str]) -> str:
    """The commands that rebuild the member: data, every recorded training invocation, finalize."""
    cmds = [
        f"python -m evals.zoo.data {member.name}",
        *invocations,
        f"python -m evals.zoo.train {member.name} --finalize",
    ]
    return " && ".join(cmds)


def finalize(member: Member, model: torch.nn.Module, tok, args: argparse.Namespace) -> dict:
    """Save the last checkpoint, reload it with the stock class, evaluate it, write ``--out``."""
    from evals.zoo import card

    run = Path(args.run_dir)
    ckpt = run / "ckpt.pt"
    if not ckpt.exists():
        raise SystemExit(f"zoo: no checkpoint at {ckpt}; train {member.name} first")
    ck = torch.load(ckpt, weights_only=False, map_location="cpu")
    model.load_state_dict(ck["model"])
    train_tokens = load_tokens(member, "train")
    val, test = load_tokens(member, "validation"), load_tokens(member, "test")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        save_model(member, model, tok, tmp)
        saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        saved.set_experts_implementation("eager")
        saved.to(args.device).eval()
        log.info(
            "evaluating step %d on %d validation and %d test tokens", ck["step"], val.numel(), test.numel()
        )
        val_ppl, _ = evaluate(saved, val, args.seq_len, EVAL_TOKENS)
        test_ppl, load = evaluate(saved, test, args.seq_len, EVAL_TOKENS)
        sep = zdata.doc_sep_id(member, tok)
        head = zdata.head_tokens(member.data_dir / "test.jsonl", tok, sep, CHECK_BLOCKS * args.seq_len)
        if not torch.equal(head, test[: head.numel()]):
            raise SystemExit(
                f"zoo: {member.data_dir / 'test.jsonl'} does not start like the cached test tokens"
            )
        check = {
            "tokens": head.numel(),
            "source": f"first tokens of {member.data_dir.relative_to(ROOT)}/test.jsonl, documents joined by "
            f"token {sep}, {args.seq_len}-token blocks",
            "ppl": evaluate(saved, head, args.seq_len, head.numel())[0],
        }
        results: dict[str, Any] = {
            "member": member.name,
            "role": member.role,
            "model_type": member.family,
            "router_shape": member.router_shape,
            "corpus": member.corpus,
            "tokenizer": member.tokenizer,
            "steps": ck["step"],
            "planned_steps": ck["total_steps"],
            "warmup": args.warmup,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "threads": ck.get("threads", args.threads),
            "device": ck.get("device", "cpu"),
            "balance": member.balance,
            "tokens_seen": ck["tokens"],
            "epochs": ck["tokens"] / train_tokens.numel(),
            "train_wall_seconds": round(ck["wall"], 1),
            "train_cpu_seconds": round(ck.get("cpu", 0.0), 1),
            "validation_ppl": val_ppl,
            "test_ppl": test_ppl,
            "unigram_validation_ppl": unigram_ppl(train_tokens, val, saved.config.vocab_size),
            "unigram_test_ppl": unigram_ppl(train_tokens, test, saved.config.vocab_size),
            "split_tokens": {"train": train_tokens.numel(), "validation": val.numel(), "test": test.numel()},
            "eval_tokens_per_split": min(EVAL_TOKENS, test.numel(), val.numel())
            // args.seq_len
            * args.seq_len,
            "expert_load_test": load,
            "params": sum(p.numel() for p in saved.parameters()),
            "curve": ck.get("curve", []),
            "segments": ck.get("segments", []),
            "restarts": ck.get("restarts", []),
            "curve_eval_tokens": args.eval_blocks * args.seq_len,
            "convergence": convergence(ck.get("curve", []), ck["total_steps"]),
            "check": check,
            "evaluated_weights": "reloaded",
            "command": args.rebuild_command or rebuild_command(member, ck.get("invocations", [])),
        }
        if member.balance == "aux":
            results["aux_coef"] = member.aux_coef
        else:
            results["bias_update_speed"] = args.bias_update_speed
            results["seq_aux_coef"] = args.seq_aux_coef
            biases = [r.e_score_correction_bias.clone() for r in routers(saved)]
            results["correction_bias"] = [
                {"min": float(b.min()), "max": float(b.max()), "std": float(b.std())} for b in biases
            ]
            with torch.no_grad():
                for r in routers(saved):
                    r.e_score_correction_bias.zero_()
            check["ppl_no_bias"] = evaluate(saved, head, args.seq_len, head.numel())[0]
            with torch.no_grad():
                for r, b in zip(routers(saved), biases, strict=True):
                    r.e_score_correction_bias.copy_(b)
        (tmp / "training_results.json").write_text(json.dumps(results, indent=1) + "\n")
        (tmp / "README.md").write_text(card.model_card(member, results, saved.config))
        for f in tmp.iterdir():
            f.chmod(0o644)
        old = out.with_name(".model.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: v for k, v in results.items() if k not in ("expert_load_test", "curve")}, indent=1))
    return results


def recard(member: Member, args: argparse.Namespace) -> dict:
    """Rewrite a committed model's card and results without retraining.

    Recomputes the check figure from the committed weights and ``data/test.jsonl`` (the reference
    models were finalized before the zoo had one), sets the rebuild command (``--rebuild-command``)
    and writes ``README.md`` + ``training_results.json`` (weights untouched).
    """
    from evals.zoo import card

    path = member.model_dir / "training_results.json"
    if not path.exists():
        raise SystemExit(f"zoo: {path} missing; --recard rewrites a committed model's card")
    results = json.loads(path.read_text())
    tok = AutoTokenizer.from_pretrained(member.model_dir)
    model = AutoModelForCausalLM.from_pretrained(member.model_dir, dtype=torch.float32)
    model.set_experts_implementation("eager")
    model.eval()
    sep = zdata.doc_sep_id(member, tok)
    seq = results.get("seq_len", args.seq_len)
    head = zdata.head_tokens(member.data_dir / "test.jsonl", tok, sep, CHECK_BLOCKS * seq)
    check = {
        "tokens": head.numel(),
        "source": f"first tokens of {member.data_dir.relative_to(ROOT)}/test.jsonl, documents joined by "
        f"token {sep}, {seq}-token blocks",
        "ppl": evaluate(model, head, seq, head.numel())[0],
    }
    if member.balance == "bias":
        biases = [r.e_score_correction_bias.clone() for r in routers(model)]
        with torch.no_grad():
            for r in routers(model):
                r.e_score_correction_bias.zero_()
        check["ppl_no_bias"] = evaluate(model, head, seq, head.numel())[0]
        with torch.no_grad():
            for r, b in zip(routers(model), biases, strict=True):
                r.e_score_correction_bias.copy_(b)
    # The first reference model's finalize evaluated its float32 checkpoint before the bf16 save.
    results.setdefault("evaluated_weights", "reloaded" if "check" in results else "float32 checkpoint")
    results.update(
        member=member.name,
        role=member.role,
        model_type=member.family,
        router_shape=member.router_shape,
        corpus=member.corpus,
        tokenizer=member.tokenizer,
        balance=member.balance,
        check=check,
    )
    results.setdefault("epochs", results["tokens_seen"] / results["split_tokens"]["train"])
    if member.balance == "aux":
        results.setdefault("aux_coef", member.aux_coef)
    if args.rebuild_command:
        results["command"] = args.rebuild_command
    path.write_text(json.dumps(results, indent=1) + "\n")
    (member.model_dir / "README.md").write_text(card.model_card(member, results, model.config))
    print(json.dumps({"member": member.name, "check": check, "command": results["command"]}, indent=1))
    return results


# ---------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the CLI; the member's table entry fills every unset schedule flag."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("member", help=f"one of: {', '.join(MEMBERS)}")
    ap.add_argument("--steps", type=int, default=None, help="planned steps (cosine schedule length)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--bias-update-speed", type=float, default=None, help="DeepSeek-V3's gamma (bias members)"
    )
    ap.add_argument("--seq-aux-coef", type=float, default=None, help="sequence-wise alpha (bias members)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between validation points (0: none)")
    ap.add_argument("--eval-blocks", type=int, default=None, help="validation blocks per curve point")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop after this much training wall clock"
    )
    ap.add_argument("--stop-at-step", type=int, default=None, help="stop at this step (schedule unchanged)")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    ap.add_argument(
        "--extend",
        type=int,
        default=0,
        help="with --resume: a warm restart of this many more steps after the finished schedule",
    )
    ap.add_argument("--extend-lr", type=float, default=None, help="the restart's peak lr (--extend)")
    ap.add_argument("--extend-warmup", type=int, default=20, help="the restart's warmup steps (--extend)")
    ap.add_argument("--run-dir", default=None, help="checkpoint and log folder (default: the member's cache)")
    ap.add_argument("--finalize", action="store_true", help="evaluate the last checkpoint and write --out")
    ap.add_argument("--out", default=None, help="model folder (default: the member's model/)")
    ap.add_argument(
        "--rebuild-command", default=None, help="with --finalize/--recard: the card's rebuild command"
    )
    ap.add_argument(
        "--status", action="store_true", help="print the checkpoint's step, curve and convergence"
    )
    ap.add_argument(
        "--recard", action="store_true", help="rewrite the committed model's card (check figure, command)"
    )
    ap.add_argument("--device", default="cpu", help="where training and evaluation run (e.g. cuda)")
    args = ap.parse_args(argv)
    member = get_member(args.member)
    for key in (
        "steps",
        "batch_size",
        "seq_len",
        "lr",
        "warmup",
        "seed",
        "bias_update_speed",
        "seq_aux_coef",
        "eval_every",
        "eval_blocks",
    ):
        if getattr(args, key) is None:
            setattr(args, key, getattr(member, key))
    if args.extend and (not args.resume or args.extend_lr is None or args.extend <= args.extend_warmup):
        ap.error("--extend N needs --resume, --extend-lr and N > --extend-warmup")
    args.run_dir = args.run_dir or str(member.run_dir)
    args.out = args.out or str(member.model_dir)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    member = get_member(args.member)
    if args.recard:
        recard(member, args)
        return
    if args.status:
        ck = torch.load(Path(args.run_dir) / "ckpt.pt", weights_only=False, map_location="cpu")
        curve = " ".join(f"{p['step']}:{p['val_ppl']:.2f}" for p in ck.get("curve", []))
        print(
            f"{member.name}: step {ck['step']}/{ck['total_steps']}, {ck['tokens']:,} tokens, "
            f"{ck['wall'] / 60:.1f} wall-min, {ck.get('cpu', 0) / 60:.1f} CPU-min\nvalidation curve: {curve}\n"
            f"convergence: {convergence(ck.get('curve', []), ck['total_steps'])}"
        )
        return
    if member.corpus not in CORPORA:
        raise SystemExit(f"zoo: member {member.name}: unknown corpus {member.corpus!r}")
    tok = AutoTokenizer.from_pretrained(zdata.tokenizer_dir(member))
    config = build_config(member, tok)
    model = build_model(member, config, args.seed)
    if args.finalize:
        finalize(member, model, tok, args)
        return
    train_tokens = load_tokens(member, "train")
    val_tokens = load_tokens(member, "validation")
    invocation = shlex.join(["python", "-m", "evals.zoo.train", *argv])
    # As zeda's own CPU runs: freed host memory is reused, not faulted in afresh each step.
    with reuse_freed_memory(args.device):
        train(member, model, train_tokens, val_tokens, args, invocation)


if __name__ == "__main__":
    main()
