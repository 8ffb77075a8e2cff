"""Train the reference MoE (stock transformers ``qwen3_moe``) on the reference corpus, on CPU.

    python evals/reference/train_model.py --steps 1600 --batch-size 8 --warmup 80 --max-minutes 60
    python evals/reference/train_model.py --steps 1600 --batch-size 8 --warmup 80 --resume   # continue
    python evals/reference/train_model.py --finalize      # evaluate + write evals/reference/model/

The cosine schedule is defined over ``--steps``; ``--max-minutes`` (training wall clock, summed
over resumed runs) and ``--stop-at-step`` end a run early with a checkpoint. Checkpoints are
written atomically every ``--save-every`` steps to ``--run-dir`` (gitignored); a killed run
continues where it stopped with ``--resume`` (the batch of step i depends only on the seed and i).
``--finalize`` evaluates the latest checkpoint (validation/test perplexity, unigram baseline,
per-layer expert load), and writes the bf16 model, tokenizer, ``training_results.json`` and the
model card to a temporary directory that is renamed over ``evals/reference/model`` only when
complete, so a partial build never replaces a good model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
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
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    get_cosine_schedule_with_warmup,
)

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RUN = CACHE / "run"
log = logging.getLogger("train_model")


def model_config(vocab_size: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def tokens_of(split: str, tok) -> torch.Tensor:
    """All tokens of a split, documents joined by EOS, cached as int16-safe int32 tensor."""
    path = CACHE / f"tokens_{split}.pt"
    if path.exists():
        return torch.load(path)
    ids: list[int] = []
    for line in open(CACHE / "corpus" / f"{split}.jsonl", encoding="utf-8"):
        ids.extend(tok(json.loads(line)["text"])["input_ids"])
        ids.append(tok.eos_token_id)
    t = torch.tensor(ids, dtype=torch.int32)
    torch.save(t, path)
    return t


def batch_at(data: torch.Tensor, step: int, bs: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq - 1, (bs,), generator=g)
    return torch.stack([data[s : s + seq] for s in starts.tolist()]).long()


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, max_tokens: int) -> tuple[float, list[dict]]:
    """Perplexity on consecutive blocks and per-layer expert load."""
    model.eval()
    n_blocks = min(max_tokens // seq, data.numel() // seq)
    nll, count = 0.0, 0
    e = model.config.num_experts
    loads = None
    for i in range(0, n_blocks, 8):
        ids = torch.stack([data[j * seq : (j + 1) * seq] for j in range(i, min(i + 8, n_blocks))]).long()
        out = model(ids, labels=ids, output_router_logits=True)
        n = ids.numel() - ids.shape[0]
        nll += (
            float(out.loss) * n
            if out.aux_loss is None
            else float(out.loss - model.config.router_aux_loss_coef * out.aux_loss) * n
        )
        count += n
        layer_counts = []
        for logits in out.router_logits:
            idx = logits.topk(model.config.num_experts_per_tok, -1).indices
            layer_counts.append(torch.bincount(idx.reshape(-1), minlength=e).float())
        loads = layer_counts if loads is None else [a + b for a, b in zip(loads, layer_counts, strict=True)]
    stats = []
    for layer, c in enumerate(loads):
        p = c / c.sum()
        ent = float(-(p * p.clamp_min(1e-12).log()).sum())
        stats.append(
            {
                "layer": layer,
                "entropy_nats": ent,
                "max_entropy_nats": math.log(e),
                "max_over_mean": float(c.max() / c.mean()),
                "min_over_mean": float(c.min() / c.mean()),
            }
        )
    return math.exp(nll / count), stats


def unigram_ppl(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train.long(), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[test.long()].mean()))


def save_ckpt(
    run: Path,
    model,
    opt,
    sched,
    step: int,
    tokens: int,
    wall: float,
    total_steps: int,
    threads: int,
    extra: dict | None = None,
) -> None:
    """Write the training state atomically (temp file + rename); ``extra`` adds keys to it."""
    tmp = run / "ckpt.pt.tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "step": step,
            "tokens": tokens,
            "wall": wall,
            "total_steps": total_steps,
            "threads": threads,
            **(extra or {}),
        },
        tmp,
    )
    os.replace(tmp, run / "ckpt.pt")


def train(args: argparse.Namespace, model, tok, train_tokens: torch.Tensor, run: Path) -> None:
    """Train from scratch or resume from ``run/ckpt.pt`` until a stop condition."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    step, tokens, wall = 0, 0, 0.0
    ckpt = run / "ckpt.pt"
    if ckpt.exists():
        if not args.resume:
            raise SystemExit(f"train_model: {ckpt} exists; pass --resume to continue it or delete {run}")
        ck = torch.load(ckpt, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, tokens, wall = ck["step"], ck["tokens"], ck["wall"]
        log.info("resumed at step %d (%d tokens, %.0f s)", step, tokens, wall)
    stop = min(args.steps, args.stop_at_step or args.steps)
    budget = args.max_minutes * 60 if args.max_minutes else math.inf
    model.train()
    with open(run / "train_log.jsonl", "a") as logf:
        bar = tqdm(range(step, stop), initial=step, total=stop, desc="train", mininterval=10)
        for step in bar:
            t0 = time.perf_counter()
            ids = batch_at(train_tokens, step, args.batch_size, args.seq_len, args.seed)
            out = model(ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            wall += time.perf_counter() - t0
            tokens += ids.numel()
            done = step + 1 == stop or wall >= budget
            if (step + 1) % 10 == 0 or done:
                loss = float(out.loss.detach())
                row = {
                    "step": step + 1,
                    "loss": loss,
                    "aux": float(out.aux_loss.detach()),
                    "lr": sched.get_last_lr()[0],
                    "tokens": tokens,
                    "wall_s": wall,
                }
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / wall:.0f}")
            if (step + 1) % args.save_every == 0 or done:
                save_ckpt(run, model, opt, sched, step + 1, tokens, wall, args.steps, args.threads)
            if done:
                break
    log.info("stopped at step %d of %d (%d tokens, %.0f s of training)", step + 1, args.steps, tokens, wall)


def model_card(results: dict) -> str:
    """The model card (README.md) of the reference model, from the finalize results."""
    rows = "\n".join(
        f"| {s['layer']} | {s['entropy_nats']:.3f} / {s['max_entropy_nats']:.3f} | {s['max_over_mean']:.2f} "
        f"| {s['min_over_mean']:.2f} |"
        for s in results["expert_load_test"]
    )
    lm_eval = HERE / "results_lm_eval.json"
    return f"""---
license: other
library_name: transformers
pipeline_tag: text-generation
---
# zeda reference MoE (qwen3_moe, {results["params"] / 1e6:.1f}M parameters, 32 experts, top-4)

A small Mixture-of-Experts language model trained **from scratch on CPU** by the zeda project on
public-domain English prose (State of the Union addresses, the Brown corpus, the King James Bible,
Shakespeare; see `evals/reference/manifest.json`). It is the default model of zeda's quickstart
and CPU regression evals. It loads with the stock classes:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("evals/reference/model")
tok = AutoTokenizer.from_pretrained("evals/reference/model")
```

Architecture: `Qwen3MoeForCausalLM`, vocab 8192 (byte-level BPE trained on the train split), hidden
256, 4 layers, 4 heads (head_dim 64), 2 KV heads, 32 experts of width 128 per layer, top-4 with
normalised top-k weights, no shared expert, tied embeddings, context 1024 (trained at 256).
Weights are stored in bfloat16 (trained in float32).

## Training

| | |
|---|---|
| optimiser steps | {results["steps"]} of a {results["planned_steps"]}-step cosine schedule (warmup {results["warmup"]}, peak lr {results["lr"]}) |
| batch | {results["batch_size"]} x {results["seq_len"]} tokens |
| tokens seen | {results["tokens_seen"]:,} |
| training wall time | {results["train_wall_seconds"] / 60:.1f} min on {results["threads"]} CPU thread(s) (shared machine) |
| load-balancing aux loss | coefficient 0.01 |

## Results (held-out documents, {results["eval_tokens_per_split"]:,} tokens per split, 256-token blocks)

| split | perplexity | unigram baseline (add-one, train counts) |
|---|---|---|
| validation | {results["validation_ppl"]:.2f} | {results["unigram_validation_ppl"]:.2f} |
| test | {results["test_ppl"]:.2f} | {results["unigram_test_ppl"]:.2f} |

Per-layer expert load on the test blocks (top-4 assignments per token; entropy in nats, uniform =
ln 32 = 3.466):

| layer | entropy / max | max/mean | min/mean |
|---|---|---|---|
{rows}

lm-eval results on the offline tasks `ref_perplexity` and `ref_cloze` are in
`evals/reference/results_lm_eval.json` ({"present" if lm_eval.exists() else "written by the command below"}).

## Rebuild

```bash
{results["command"]}
python evals/reference/run_lm_eval.py   # -> evals/reference/results_lm_eval.json
```

The corpus build needs npm, apt-get (Debian `bible-kjv`) and pip; everything else is offline.
Intended use: a deterministic, fast test subject for MoE tooling. It is a tiny model and not
suited to any real-world use.
"""


def finalize(args: argparse.Namespace, model, tok, train_tokens: torch.Tensor, run: Path) -> None:
    """Evaluate the latest checkpoint and write the model directory atomically."""
    ckpt = run / "ckpt.pt"
    if not ckpt.exists():
        raise SystemExit(f"train_model: no checkpoint at {ckpt}; train first")
    ck = torch.load(ckpt, weights_only=False, map_location="cpu")
    model.load_state_dict(ck["model"])
    val, test = tokens_of("validation", tok), tokens_of("test", tok)
    log.info("evaluating step %d on %d validation and %d test tokens", ck["step"], val.numel(), test.numel())
    val_ppl, _ = evaluate(model, val, args.seq_len, args.eval_tokens)
    test_ppl, load = evaluate(model, test, args.seq_len, args.eval_tokens)
    planned = ck.get("total_steps", args.steps)
    train_threads = ck.get("threads", args.train_threads or args.threads)
    results = {
        "steps": ck["step"],
        "planned_steps": planned,
        "warmup": args.warmup,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": train_threads,
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
        "params": sum(p.numel() for p in model.parameters()),
        "command": "python evals/reference/build_corpus.py && python evals/reference/train_tokenizer.py && "
        f"python evals/reference/train_model.py --steps {planned} --batch-size {args.batch_size} "
        f"--warmup {args.warmup} --threads {train_threads} --stop-at-step {ck['step']} && "
        f"python evals/reference/train_model.py --steps {planned} --batch-size {args.batch_size} "
        f"--warmup {args.warmup} --finalize",
    }
    if args.rebuild_command:
        results["command"] = args.rebuild_command
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.config.output_router_logits = False
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        ).save_pretrained(tmp)
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
    print(json.dumps({k: v for k, v in results.items() if k != "expert_load_test"}, indent=1))


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1600, help="planned steps (length of the cosine schedule)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop after this much training wall clock"
    )
    ap.add_argument("--stop-at-step", type=int, default=None, help="stop at this step (schedule unchanged)")
    ap.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    ap.add_argument("--run-dir", default=str(RUN), help="checkpoint and log directory (gitignored)")
    ap.add_argument("--tokenizer", default=str(CACHE / "tokenizer"))
    ap.add_argument(
        "--finalize", action="store_true", help="evaluate the last checkpoint and write evals/reference/model"
    )
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument(
        "--rebuild-command",
        default=None,
        help="with --finalize: the training commands as actually run (recorded in the model card)",
    )
    ap.add_argument("--out", default=str(HERE / "model"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    train_tokens = tokens_of("train", tok)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model = Qwen3MoeForCausalLM(model_config(len(tok)))
    model.set_experts_implementation("eager")
    if args.finalize:
        finalize(args, model, tok, train_tokens, run)
    else:
        train(args, model, tok, train_tokens, run)


if __name__ == "__main__":
    sys.exit(main())
