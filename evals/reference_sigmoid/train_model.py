"""Train the second reference MoE (stock transformers ``glm4_moe``: the other router kind) on CPU.

The first reference model (``evals/reference``) is a softmax top-k router (``qwen3_moe``). This
one is the DeepSeek-V3 / GLM-4.5 kind: **sigmoid** expert scores, a per-expert
``e_score_correction_bias`` that is added to the scores for *choosing* experts only (the
weights stay the raw sigmoid scores), **group-limited** routing (32 experts in ``n_group`` 4
groups of 8, each token picks its ``topk_group`` 2 best groups then its top-4 experts inside
them), weights normalised and scaled by ``routed_scaling_factor``, and one **shared expert** that
every token uses. Same corpus, tokenizer, batch, sequence length, optimiser and schedule shape
as the first model (``build_data.py`` rebuilds the identical corpus and tokens offline-checked
against ``evals/reference/data``).

Load balancing is trained the way DeepSeek-V3 does it (arXiv 2412.19437, section 2.1.2):

- *auxiliary-loss-free* balancing: after every optimiser step, each layer's correction bias
  moves by ``--bias-update-speed`` (gamma, 1e-3 as in DeepSeek-V3) towards balance:
  ``b_i += gamma * sign(mean_load - load_i)``, where ``load_i`` is the number of top-k slots
  expert ``i`` received in that step's batch. The bias is a buffer, not a parameter: no
  gradient, no weight decay. It is checkpointed with the model and saved (float32) in the
  committed weights, so the routing it encodes is part of the model.
- a complementary *sequence-wise* balance loss with a tiny coefficient (``--seq-aux-coef``,
  1e-4 as in DeepSeek-V3): ``alpha * sum_i f_i P_i`` per sequence, ``f_i = E/(K T) * #slots of
  i``, ``P_i`` = mean over the sequence of the sum-normalised sigmoid scores.

Both read the router's own outputs through forward hooks on this model's router modules.

    python evals/reference_sigmoid/build_data.py                  # corpus + tokens (cache/)
    python evals/reference_sigmoid/train_model.py --steps 1000 --max-minutes 50 --threads 1
    python evals/reference_sigmoid/train_model.py --steps 1000 --threads 1 --resume   # continue
    python evals/reference_sigmoid/train_model.py --steps 1000 --finalize             # -> model/

The cosine schedule is defined over ``--steps``; ``--max-minutes`` (training wall clock, summed
over resumed runs) and ``--stop-at-step`` end a run early with a checkpoint. ``--finalize``
writes the model (bf16, routers and correction bias in float32 as GLM/DeepSeek checkpoints keep
them) to a temporary directory, **reloads it with the stock class** and evaluates that reloaded
model (so the card's figures are the committed weights'), then renames it over ``model/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    get_cosine_schedule_with_warmup,
)
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

HERE = Path(__file__).resolve().parent
REF = HERE.parent / "reference"
CACHE = HERE / "cache"
RUN = CACHE / "run"
log = logging.getLogger("train_sigmoid")

sys.path.insert(0, str(REF))
# The first reference model's data sampling, checkpointing and unigram baseline, unchanged.
from train_model import batch_at, save_ckpt, unigram_ppl  # noqa: E402


def model_config(vocab_size: int) -> Glm4MoeConfig:
    """The second reference model: the first one's size, with a GLM-4.5 / DeepSeek-V3 router."""
    return Glm4MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,  # unused: every layer is MoE (first_k_dense_replace=0)
        moe_intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=0,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        attention_bias=True,  # GLM-4.5 has q/k/v biases
        use_qk_norm=False,
        partial_rotary_factor=0.5,  # GLM-4.5: rotary on half of each head
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,  # GLM-4.5 / DeepSeek-V3 scale the normalised routed weights
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def routers(model: Glm4MoeForCausalLM) -> list[Glm4MoeTopkRouter]:
    """The router of every MoE layer, in layer order."""
    return [m for m in model.modules() if isinstance(m, Glm4MoeTopkRouter)]


class RouterTap:
    """Forward hooks on this model's routers that keep each call's scores and chosen experts.

    ``records[layer]`` is ``(router_logits (N, E) float32, topk_indices (N, K))`` of the last
    forward, ``N`` = batch * seq tokens. Used for the balance statistics, the sequence-wise loss
    and the bias update; the hooks only read outputs.
    """

    def __init__(self, model: Glm4MoeForCausalLM) -> None:
        self.records: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._handles = []
        for i, r in enumerate(routers(model)):
            self.records.append(None)
            self._handles.append(r.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(_module, _inputs, outputs) -> None:
            router_logits, _weights, topk_indices = outputs
            self.records[i] = (router_logits, topk_indices)

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
def update_bias(model: Glm4MoeForCausalLM, records, gamma: float) -> list[float]:
    """Aux-loss-free balancing: ``b_i += gamma * sign(mean_load - load_i)`` per layer.

    Returns:
        Per layer, max/mean of the step's expert load (before the update).
    """
    ratios = []
    for r, (_logits, idx) in zip(routers(model), records, strict=True):
        load = torch.bincount(idx.reshape(-1), minlength=r.num_experts).float()
        r.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))
        ratios.append(float(load.max() / load.mean()))
    return ratios


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, max_tokens: int) -> tuple[float, list[dict]]:
    """Perplexity on consecutive ``seq``-token blocks and per-layer load of the *chosen* experts.

    The load counts the router's actual top-k choice (sigmoid + correction bias, group-limited).
    """
    model.eval()
    n_blocks = min(max_tokens // seq, data.numel() // seq)
    e = model.config.n_routed_experts
    nll, count, loads = 0.0, 0, None
    with RouterTap(model) as tap:
        for i in range(0, n_blocks, 8):
            ids = torch.stack([data[j * seq : (j + 1) * seq] for j in range(i, min(i + 8, n_blocks))])
            ids = ids.long().to(model.device)
            out = model(ids, labels=ids)
            n = ids.numel() - ids.shape[0]
            nll += float(out.loss) * n
            count += n
            layer_counts = [torch.bincount(idx.reshape(-1), minlength=e).float() for _, idx in tap.records]
            loads = (
                layer_counts if loads is None else [a + b for a, b in zip(loads, layer_counts, strict=True)]
            )
    stats = []
    for layer, c in enumerate(loads):
        p = c / c.sum()
        stats.append(
            {
                "layer": layer,
                "entropy_nats": float(-(p * p.clamp_min(1e-12).log()).sum()),
                "max_entropy_nats": math.log(e),
                "max_over_mean": float(c.max() / c.mean()),
                "min_over_mean": float(c.min() / c.mean()),
                "experts_under_1pct_of_mean": int((c < 0.01 * c.mean()).sum()),
            }
        )
    return math.exp(nll / count), stats


def train(args: argparse.Namespace, model, train_tokens: torch.Tensor, run: Path) -> None:
    """Train from scratch or resume from ``run/ckpt.pt`` until a stop condition."""
    model.to(args.device)
    device = device_name(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    step, tokens, wall = 0, 0, 0.0
    ckpt = run / "ckpt.pt"
    if ckpt.exists():
        if not args.resume:
            raise SystemExit(f"train_model: {ckpt} exists; pass --resume to continue it or delete {run}")
        ck = torch.load(ckpt, weights_only=False, map_location=args.device)
        if ck.get("device", "cpu") != device:
            raise SystemExit(
                f"train_model: {ckpt} was trained on {ck.get('device', 'cpu')}, not {device}; "
                "resume on the same device"
            )
        if ck["total_steps"] != args.steps:
            raise SystemExit(
                f"train_model: {ckpt} has a {ck['total_steps']}-step schedule, not --steps {args.steps}"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, tokens, wall = ck["step"], ck["tokens"], ck["wall"]
        log.info("resumed at step %d (%d tokens, %.0f s)", step, tokens, wall)
    stop = min(args.steps, args.stop_at_step or args.steps)
    budget = args.max_minutes * 60 if args.max_minutes else math.inf
    cfg = model.config
    model.train()
    with RouterTap(model) as tap, open(run / "train_log.jsonl", "a") as logf:
        bar = tqdm(range(step, stop), initial=step, total=stop, desc="train", mininterval=10)
        for step in bar:
            t0 = time.perf_counter()
            ids = batch_at(train_tokens, step, args.batch_size, args.seq_len, args.seed).to(args.device)
            out = model(ids, labels=ids)
            aux = seq_aux_loss(tap.records, cfg.n_routed_experts, cfg.num_experts_per_tok, ids.shape[0])
            (out.loss + args.seq_aux_coef * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ratios = update_bias(model, tap.records, args.bias_update_speed)
            wall += time.perf_counter() - t0
            tokens += ids.numel()
            done = step + 1 == stop or wall >= budget
            if (step + 1) % 10 == 0 or done:
                loss = float(out.loss.detach())
                row = {
                    "step": step + 1,
                    "loss": loss,
                    "seq_aux": float(aux.detach()),
                    "load_max_over_mean": [round(x, 3) for x in ratios],
                    "bias_abs_max": [float(r.e_score_correction_bias.abs().max()) for r in routers(model)],
                    "lr": sched.get_last_lr()[0],
                    "tokens": tokens,
                    "wall_s": wall,
                }
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / wall:.0f}")
            if (step + 1) % args.save_every == 0 or done:
                save_ckpt(
                    run,
                    model,
                    opt,
                    sched,
                    step + 1,
                    tokens,
                    wall,
                    args.steps,
                    args.threads,
                    extra={"device": device},
                )
            if done:
                break
    log.info("stopped at step %d of %d (%d tokens, %.0f s of training)", step + 1, args.steps, tokens, wall)


def _load_rows(stats: list[dict]) -> str:
    return "\n".join(
        f"| {s['layer']} | {s['entropy_nats']:.3f} / {s['max_entropy_nats']:.3f} | {s['max_over_mean']:.2f} "
        f"| {s['min_over_mean']:.2f} | {s['experts_under_1pct_of_mean']} |"
        for s in stats
    )


def model_card(r: dict) -> str:
    """The model card (README.md), from the finalize results."""
    bias_rows = "\n".join(
        f"| {i} | {b['min']:+.3f} | {b['max']:+.3f} | {b['std']:.3f} |"
        for i, b in enumerate(r["correction_bias"])
    )
    return f"""---
license: other
library_name: transformers
pipeline_tag: text-generation
---
# zeda reference MoE, sigmoid router (glm4_moe, {r["params"] / 1e6:.1f}M parameters, 32 experts in 4 groups, top-4, 1 shared expert)

The second reference model of the zeda project: the other router kind. Where the first
(`evals/reference/model`, `qwen3_moe`) has a softmax top-k router, this one routes like
DeepSeek-V3 and GLM-4.5: **sigmoid** scores, a learned per-expert **correction bias** used only
to choose experts, **group-limited** routing and a **shared expert**. It was trained from scratch
{"on CPU" if r.get("device", "cpu") == "cpu" else "on a GPU"} on the same public-domain English corpus (State of the Union addresses, the Brown corpus,
the King James Bible, Shakespeare; `evals/reference/manifest.json`) with the same tokenizer,
batch, sequence length and optimiser as the first. It loads with the stock classes:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("evals/reference_sigmoid/model")
tok = AutoTokenizer.from_pretrained("evals/reference_sigmoid/model")
```

Architecture: `Glm4MoeForCausalLM`, vocab 8192 (the first reference model's byte-level BPE),
hidden 256, 4 layers, all MoE (`first_k_dense_replace` 0), 4 heads (head_dim 64, rotary on half
of each head, q/k/v biases), 2 KV heads, tied embeddings, context 1024 (trained at 256).
Each MoE layer: 32 routed experts of width 128 in `n_group` 4 groups of 8; a token keeps its
`topk_group` 2 best groups (group score = sum of its two best biased scores), then its top-4
experts inside them by `sigmoid(logit) + e_score_correction_bias`; the weights are the four
*unbiased* sigmoid scores, normalised to sum 1 and scaled by `routed_scaling_factor` 2.5; plus
one shared expert of width 128. Weights are stored in bfloat16 except the routers
(`gate.weight`) and `e_score_correction_bias`, kept in float32 as GLM/DeepSeek checkpoints do
(trained in float32).

## Training

| | |
|---|---|
| optimiser steps | {r["steps"]} of a {r["planned_steps"]}-step cosine schedule (warmup {r["warmup"]}, peak lr {r["lr"]}, AdamW 0.9/0.95, wd 0.1) |
| batch | {r["batch_size"]} x {r["seq_len"]} tokens |
| tokens seen | {r["tokens_seen"]:,} |
| training wall time | {r["train_wall_seconds"] / 60:.1f} min on {_trained_on(r)} |
| balancing | DeepSeek-V3 aux-loss-free bias update, speed {r["bias_update_speed"]}, + sequence-wise loss, coefficient {r["seq_aux_coef"]} |

The correction bias is a buffer updated after every step from that step's expert load
(`b_i += gamma * sign(mean load - load_i)`, per layer), exactly DeepSeek-V3's rule; it receives no
gradient. Learned bias per layer:

| layer | min | max | std |
|---|---|---|---|
{bias_rows}

## Results (held-out documents, {r["eval_tokens_per_split"]:,} tokens per split, 256-token blocks; the committed weights reloaded in float32)

| split | perplexity | unigram baseline (add-one, train counts) |
|---|---|---|
| validation | {r["validation_ppl"]:.2f} | {r["unigram_validation_ppl"]:.2f} |
| test | {r["test_ppl"]:.2f} | {r["unigram_test_ppl"]:.2f} |

For comparison, the first reference model (`qwen3_moe`, {r["first_model"]["params_m"]:.1f}M parameters,
{r["first_model"]["steps"]} steps, same data and batch; `evals/reference/model/training_results.json`) has
validation / test perplexity {r["first_model"]["validation_ppl"]:.2f} / {r["first_model"]["test_ppl"]:.2f}.

Per-layer load of the chosen experts on the test blocks (top-4 slots per token; entropy in
nats, uniform = ln 32 = 3.466):

| layer | entropy / max | max/mean | min/mean | experts under 1% of mean |
|---|---|---|---|---|
{_load_rows(r["expert_load_test"])}

Ablation, the learned bias switched off: with every `e_score_correction_bias` set to zero (same
weights, first {r["no_bias_eval_tokens"]:,} test tokens) test perplexity is {r["no_bias_test_ppl"]:.2f}
(vs {r["test_ppl_same_tokens"]:.2f} with the bias on the same tokens) and the load of the chosen experts becomes:

| layer | entropy / max | max/mean | min/mean | experts under 1% of mean |
|---|---|---|---|---|
{_load_rows(r["expert_load_test_no_bias"])}

## Rebuild

```bash
{r["command"]}
```

The corpus build needs npm, apt-get (Debian `bible-kjv`) and pip; everything else is offline.
Intended use: a deterministic, fast test subject for MoE tooling (the sigmoid/group-limited router
kind). It is a tiny model and not suited to any real-world use.
"""


def head_tokens(tok, path: Path, n: int) -> torch.Tensor:
    """The first ``n`` tokens of a jsonl split, documents joined by EOS (as ``build_data.tokenize``).

    Returns:
        ``(n,)`` int32.
    """
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids.extend(tok(json.loads(line)["text"])["input_ids"])
            ids.append(tok.eos_token_id)
            if len(ids) >= n:
                break
    return torch.tensor(ids[:n], dtype=torch.int32)


def device_name(device: str) -> str:
    """What a run's device is called in its checkpoint and model card: ``cpu`` or the GPU's name."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def _device_flag(args: argparse.Namespace) -> str:
    return "" if args.device == "cpu" else f" --device {args.device}"


def _trained_on(r: dict) -> str:
    """The card's training-hardware wording (CPU threads, or the GPU a run used)."""
    if r.get("device", "cpu") == "cpu":
        return f"{r['threads']} CPU thread(s) (shared machine, `nice -n 19`)"
    return f"one {r['device']}"


def _first_model() -> dict:
    """The first reference model's figures, for the card's comparison line."""
    r = json.loads((REF / "model" / "training_results.json").read_text())
    return {
        "params_m": r["params"] / 1e6,
        "steps": r["steps"],
        "validation_ppl": r["validation_ppl"],
        "test_ppl": r["test_ppl"],
    }


def save_model(model, tok, out: Path) -> None:
    """bf16 weights, routers and correction bias in float32 (``_keep_in_fp32_modules_strict``)."""
    keep = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("gate.weight")}
    bias = {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    model.to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in keep:
                p.data = keep[n]
        for n, b in model.named_buffers():
            if n in bias:
                b.data = bias[n]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(out)


def finalize(args: argparse.Namespace, model, tok, train_tokens: torch.Tensor, run: Path) -> None:
    """Save the latest checkpoint, reload it with the stock class, evaluate it, write ``--out``."""
    ckpt = run / "ckpt.pt"
    if not ckpt.exists():
        raise SystemExit(f"train_model: no checkpoint at {ckpt}; train first")
    ck = torch.load(ckpt, weights_only=False, map_location="cpu")
    model.load_state_dict(ck["model"])
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        save_model(model, tok, tmp)
        saved = Glm4MoeForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        saved.set_experts_implementation("eager")
        saved.to(args.device)
        val = torch.load(CACHE / "tokens_validation.pt")
        test = torch.load(CACHE / "tokens_test.pt")
        log.info(
            "evaluating step %d on %d validation and %d test tokens", ck["step"], val.numel(), test.numel()
        )
        val_ppl, _ = evaluate(saved, val, args.seq_len, args.eval_tokens)
        test_ppl, load = evaluate(saved, test, args.seq_len, args.eval_tokens)
        # The same weights with the correction bias switched off, on fewer tokens.
        same_ppl, _ = evaluate(saved, test, args.seq_len, args.no_bias_eval_tokens)
        biases = [r.e_score_correction_bias.clone() for r in routers(saved)]
        with torch.no_grad():
            for r in routers(saved):
                r.e_score_correction_bias.zero_()
        nob_ppl, nob_load = evaluate(saved, test, args.seq_len, args.no_bias_eval_tokens)
        # A small figure the test recomputes from the committed files alone (model + data/test.jsonl).
        head = head_tokens(tok, REF / "data" / "test.jsonl", args.check_blocks * args.seq_len)
        if not torch.equal(head, test[: head.numel()]):
            raise SystemExit(
                "train_model: evals/reference/data/test.jsonl does not start like cache/tokens_test.pt"
            )
        check_ppl_no_bias, _ = evaluate(saved, head, args.seq_len, head.numel())
        with torch.no_grad():
            for r, b in zip(routers(saved), biases, strict=True):
                r.e_score_correction_bias.copy_(b)
        check_ppl, _ = evaluate(saved, head, args.seq_len, head.numel())
        planned = ck["total_steps"]
        threads = ck.get("threads", args.threads)
        results = {
            "model_type": "glm4_moe",
            "steps": ck["step"],
            "planned_steps": planned,
            "warmup": args.warmup,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "threads": threads,
            "device": ck.get("device", "cpu"),
            "bias_update_speed": args.bias_update_speed,
            "seq_aux_coef": args.seq_aux_coef,
            "tokens_seen": ck["tokens"],
            "train_wall_seconds": round(ck["wall"], 1),
            "validation_ppl": val_ppl,
            "test_ppl": test_ppl,
            "unigram_test_ppl": unigram_ppl(train_tokens, test, len(tok)),
            "unigram_validation_ppl": unigram_ppl(train_tokens, val, len(tok)),
            "split_tokens": {"train": train_tokens.numel(), "validation": val.numel(), "test": test.numel()},
            "eval_tokens_per_split": min(args.eval_tokens, test.numel(), val.numel())
            // args.seq_len
            * args.seq_len,
            "expert_load_test": load,
            "no_bias_eval_tokens": args.no_bias_eval_tokens // args.seq_len * args.seq_len,
            "test_ppl_same_tokens": same_ppl,
            "no_bias_test_ppl": nob_ppl,
            "expert_load_test_no_bias": nob_load,
            "correction_bias": [
                {"min": float(b.min()), "max": float(b.max()), "std": float(b.std())} for b in biases
            ],
            "check": {
                "tokens": head.numel(),
                "source": "first tokens of evals/reference/data/test.jsonl, documents joined by EOS",
                "ppl": check_ppl,
                "ppl_no_bias": check_ppl_no_bias,
            },
            "params": sum(p.numel() for p in saved.parameters()),
            "first_model": _first_model(),
            "command": args.rebuild_command
            or (
                "python evals/reference_sigmoid/build_data.py && "
                f"python evals/reference_sigmoid/train_model.py --steps {planned} --batch-size {args.batch_size} "
                f"--warmup {args.warmup} --threads {threads} --stop-at-step {ck['step']}{_device_flag(args)} && "
                f"python evals/reference_sigmoid/train_model.py --steps {planned} --batch-size {args.batch_size} "
                f"--warmup {args.warmup}{_device_flag(args)} --finalize"
            ),
        }
        (tmp / "training_results.json").write_text(json.dumps(results, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(results))
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
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("expert_load")}, indent=1))


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="planned steps (length of the cosine schedule)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bias-update-speed", type=float, default=1e-3, help="DeepSeek-V3's gamma")
    ap.add_argument("--seq-aux-coef", type=float, default=1e-4, help="DeepSeek-V3's sequence-wise alpha")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop after this much training wall clock"
    )
    ap.add_argument("--stop-at-step", type=int, default=None, help="stop at this step (schedule unchanged)")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    ap.add_argument("--run-dir", default=str(RUN), help="checkpoint and log directory (gitignored)")
    ap.add_argument("--tokenizer", default=str(REF / "model"), help="the first reference model's tokenizer")
    ap.add_argument("--finalize", action="store_true", help="evaluate the last checkpoint and write --out")
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument("--no-bias-eval-tokens", type=int, default=50_000)
    ap.add_argument(
        "--check-blocks", type=int, default=8, help="blocks of the small figure the test recomputes"
    )
    ap.add_argument(
        "--rebuild-command",
        default=None,
        help="with --finalize: the training commands as actually run (recorded in the model card)",
    )
    ap.add_argument("--out", default=str(HERE / "model"))
    ap.add_argument("--device", default="cpu", help="where training and the evaluation run (e.g. cuda)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    path = CACHE / "tokens_train.pt"
    if not path.exists():
        raise SystemExit(
            f"train_model: {path} missing; run python evals/reference_sigmoid/build_data.py first"
        )
    train_tokens = torch.load(path)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model = Glm4MoeForCausalLM(model_config(len(tok)))
    model.set_experts_implementation("eager")
    if args.finalize:
        finalize(args, model, tok, train_tokens, run)
    else:
        train(args, model, train_tokens, run)


if __name__ == "__main__":
    sys.exit(main())
