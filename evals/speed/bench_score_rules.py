"""Scoring the training-free rules: one shared pass (`HeldOut.score_many`) against one pass per rule.

Every rule (`zeda.evaluation.baselines.POLICY_KINDS`) is calibrated to the target share on a zoo
member's validation text (outside the timing), then scored on the same text both ways, side by
side (A, B, A, B ...): each rule alone with `HeldOut.score` (two output-head passes and two
log-softmaxes per chunk and rule) and all rules together with `HeldOut.score_many` (the teacher's
side of each chunk once). The figures must be equal; the table gives the times and their ratio.
This is the work at the start and the end of every distillation run with validation and in
`evals/transfer/score.py`.

    python evals/speed/bench_score_rules.py [--member deepseek_v3] [--tokens 4096] [--reps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--member", default="deepseek_v3")
    ap.add_argument("--tokens", type=int, default=4096, help="validation tokens scored")
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import zeda
    from evals.zoo.members import get_member
    from zeda.data import pack_texts, read_jsonl
    from zeda.evaluation.baselines import POLICY_KINDS, apply_policy, calibrate_rule
    from zeda.evaluation.heldout import HeldOut

    m = get_member(args.member)
    model = zeda.load(m.model_dir)
    zeda.inject_zero_experts(model, None)
    tok = zeda.load_tokenizer(m.model_dir)
    seq = 256
    blocks = pack_texts(read_jsonl(m.data_dir / "validation.jsonl", "text"), tok, seq, args.tokens)
    blocks = blocks[: max(1, args.tokens // seq)]
    held = HeldOut(blocks, model, lambda: zeda.teacher_mode(model), batch_size=8, progress=False)
    held.prepare()
    ctxs = []
    for kind in POLICY_KINDS:
        with zeda.teacher_mode(model):
            cal = calibrate_rule(model, kind.removesuffix("_no_renorm"), args.share, [blocks[:8]])
        policy = type(cal)(kind, cal.value, cal.target_share, cal.achieved_share, cal.evaluations).policy

        @contextlib.contextmanager
        def ctx(policy=policy):
            with zeda.teacher_mode(model), apply_policy(model, policy):
                yield

        ctxs.append(ctx)

    alone_s, together_s = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        alone = [held.score(model, c, "alone")[0] for c in ctxs]
        alone_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        together = [r[0] for r in held.score_many(model, ctxs, "together")]
        together_s.append(time.perf_counter() - t0)
        if alone != together:
            raise SystemExit("score_many differs from score: a defect")
    a, t = statistics.median(alone_s), statistics.median(together_s)
    vocab = int(model.config.vocab_size)
    print(
        f"Command (repo root): `python evals/speed/bench_score_rules.py --member {args.member} --tokens {args.tokens} "
        f"--reps {args.reps} --threads {args.threads}`\n\n"
        f"{len(ctxs)} rules at {args.share:.0%} on {int(blocks[:, 1:].numel())} validation tokens of `{args.member}` "
        f"(V = {vocab:,}), {args.threads} thread(s), median of {args.reps}; figures equal both ways. A speed "
        "benchmark: no setting or checkpoint is chosen from it, the rules are calibrated and scored on "
        "validation text, and no test tokens are read.\n\n"
        "| each rule alone (s) | all rules in one pass (s) | one pass / alone |\n|---|---|---|\n"
        f"| {a:.1f} | {t:.1f} | {t / a:.2f}x |"
    )


if __name__ == "__main__":
    main()
