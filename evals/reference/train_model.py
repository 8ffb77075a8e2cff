"""Train the reference MoE (stock transformers ``qwen3_moe``) on the reference corpus, on CPU.

    python evals/reference/train_model.py                 # train (resumes from cache/run/ if present)
    python evals/reference/train_model.py --finalize      # evaluate + write evals/reference/model/

Checkpoints are written atomically every ``--save-every`` steps to ``cache/run/``; a killed run
continues where it stopped (the batch of step i depends only on the seed and i). The final model
is written to a temporary directory and renamed over ``evals/reference/model`` only when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM, get_cosine_schedule_with_warmup

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RUN = CACHE / "run"


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


def save_ckpt(model, opt, sched, step: int, tokens: int, wall: float) -> None:
    tmp = RUN / "ckpt.pt.tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "step": step,
            "tokens": tokens,
            "wall": wall,
        },
        tmp,
    )
    os.replace(tmp, RUN / "ckpt.pt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", default=str(CACHE / "tokenizer"))
    ap.add_argument(
        "--finalize", action="store_true", help="evaluate the last checkpoint and write evals/reference/model"
    )
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument("--out", default=str(HERE / "model"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    train = tokens_of("train", tok)
    RUN.mkdir(parents=True, exist_ok=True)
    model = Qwen3MoeForCausalLM(model_config(len(tok)))
    model.set_experts_implementation("eager")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    step, tokens, wall = 0, 0, 0.0
    if (RUN / "ckpt.pt").exists():
        ck = torch.load(RUN / "ckpt.pt", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, tokens, wall = ck["step"], ck["tokens"], ck["wall"]
        print(f"resumed at step {step}", flush=True)
    if not args.finalize:
        model.train()
        log = open(RUN / "train_log.jsonl", "a")
        bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", mininterval=10)
        for step in bar:
            t0 = time.perf_counter()
            ids = batch_at(train, step, args.batch_size, args.seq_len, args.seed)
            out = model(ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            wall += time.perf_counter() - t0
            tokens += ids.numel()
            if (step + 1) % 10 == 0:
                row = {
                    "step": step + 1,
                    "loss": float(out.loss),
                    "aux": float(out.aux_loss),
                    "lr": sched.get_last_lr()[0],
                    "tokens": tokens,
                    "wall_s": wall,
                }
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{float(out.loss):.3f}", tok_s=f"{tokens / wall:.0f}")
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                save_ckpt(model, opt, sched, step + 1, tokens, wall)
        return
    # ---- finalize: evaluate and write the model atomically ----
    val, test = tokens_of("validation", tok), tokens_of("test", tok)
    val_ppl, _ = evaluate(model, val, args.seq_len, args.eval_tokens)
    test_ppl, load = evaluate(model, test, args.seq_len, args.eval_tokens)
    results = {
        "steps": step,
        "tokens_seen": tokens,
        "train_wall_seconds": round(wall, 1),
        "validation_ppl": val_ppl,
        "test_ppl": test_ppl,
        "unigram_test_ppl": unigram_ppl(train, test, len(tok)),
        "unigram_validation_ppl": unigram_ppl(train, val, len(tok)),
        "eval_tokens_per_split": min(args.eval_tokens, test.numel()),
        "expert_load_test": load,
        "params": sum(p.numel() for p in model.parameters()),
        "command": "python evals/reference/build_corpus.py && python evals/reference/train_tokenizer.py && "
        f"python evals/reference/train_model.py --steps {args.steps} && python evals/reference/train_model.py --finalize",
    }
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out.parent))
    try:
        model.config.output_router_logits = False
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training_results.json").write_text(json.dumps(results, indent=1))
        if out.exists():
            shutil.rmtree(out.with_name(".model.old"), ignore_errors=True)
            out.rename(out.with_name(".model.old"))
        tmp.rename(out)
        shutil.rmtree(out.with_name(".model.old"), ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: v for k, v in results.items() if k != "expert_load_test"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
