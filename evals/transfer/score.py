"""Score a finished run once on test text: its export and every training-free rule at its share.

For a run of ``evals/transfer/distill.py`` (or any ``zeda run`` / ``zeda distill`` directory with
an export), on the model's test split, against the original model:

- the exported model: perplexity ratio, top-1 agreement, KL(original ‖ model) and the measured
  share of routed slots it skipped;
- every training-free rule (`zeda.evaluation.baselines.POLICY_KINDS`) calibrated on the run's
  validation text to that measured share (matched routed-expert FLOPs), scored on the same test
  tokens;
- the comparison (`zeda.evaluation.verdict.compare`): the best rule, zeda's perplexity increase
  divided by that rule's, and whether zeda is at least as good as every rule on all three;
- per MoE layer, the busiest real expert's load over the mean real-expert load of the export, the
  original (``expert_load_ratio``), every rule (``rule_load_ratio``) and the best rule
  (``expert_load_ratio.best_rule``), and the share each MoE layer skipped in the export and under
  the best rule (``zero_share_per_layer``).

Scoring is `zeda.evaluation.heldout.HeldOut` (the evaluation's own scorer) and
`zeda.evaluation.curve.score_rules` (the evaluation's own calibration); the original's test
logits are never held whole. The validation verdict of the run (``result.json``) is copied beside
the test figures. Writes ``<run>/test_scores.json`` (or ``--out``).

``--split validation`` scores the run's own validation text the same way and writes
``<run>/validation_scores.json``: figures a setting may be chosen on (``evals/transfer/select.py``
shows its expert loads), since no test token is read.

    python -m evals.transfer.score runs/transfer/mixtral/share_0.5 --threads 1
    python -m evals.transfer.score runs/select/reference/share_0.5_lora --split validation
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished run directory (recipe.yaml, export/)")
    ap.add_argument("--test", help="test JSONL (default: test.jsonl beside the run's data.eval_file)")
    ap.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="validation: score the run's own validation text (data.eval_file) instead of test text",
    )
    ap.add_argument("--tokens", type=int, default=32768, help="test tokens scored")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per test block")
    ap.add_argument(
        "--calibration-tokens", type=int, default=8192, help="validation tokens the rules are calibrated on"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="results JSON (default: <run>/<split>_scores.json)")
    args = ap.parse_args(argv)
    if args.test and args.split == "validation":
        ap.error("--test names test text; --split validation scores the run's validation text: give one")
    import torch

    torch.set_num_threads(args.threads)
    import zeda
    from zeda.config import load_recipe
    from zeda.distillation.data import pack_texts, read_jsonl
    from zeda.evaluation.baselines import POLICY_KINDS, attach_router_policy
    from zeda.evaluation.curve import score_rules
    from zeda.evaluation.heldout import HeldOut
    from zeda.evaluation.verdict import compare
    from zeda.zero.telemetry import RouterTelemetry

    run = Path(args.run)
    cfg = load_recipe(run / "recipe.yaml")
    export = Path(cfg.export.out_dir) if cfg.export.out_dir else run / "export"
    if not (export / "config.json").is_file():
        raise SystemExit(f"{export} holds no export; finish the run first (evals/transfer/distill.py)")
    validation = Path(cfg.data.eval_file)
    test = validation if args.split == "validation" else Path(args.test or validation.with_name("test.jsonl"))
    tokenizer = zeda.load_tokenizer(cfg.model.name_or_path)
    blocks = pack_texts(read_jsonl(test, cfg.data.text_field), tokenizer, args.seq_len, args.tokens)
    blocks = blocks[: max(1, args.tokens // args.seq_len)]
    calibration = pack_texts(
        read_jsonl(validation, cfg.data.text_field), tokenizer, args.seq_len, args.calibration_tokens
    )

    original = zeda.load(cfg.model.name_or_path)
    held = HeldOut(blocks, original, contextlib.nullcontext, args.batch_size, progress=True)
    # The rules' hooks go on the original later; attached now, they count its own expert loads.
    attach_router_policy(original)
    original_tel = RouterTelemetry(original, count_original=True)
    held.prepare(telemetry=[original_tel])
    model = zeda.load(export)
    metrics, tel = held.score(model, contextlib.nullcontext, f"zeda ({args.split})")
    zeda_row = {
        "zero_share": tel.zero_share,
        **{k: metrics[k] for k in ("ppl", "ppl_ratio", "top1_agreement", "mean_kl")},
    }
    # Busiest real expert's load / mean real-expert load, per MoE layer (issue 25, goal 5).
    loads = {"zeda": tel.load_ratio, "original": original_tel.load_ratio}
    del model
    rules = score_rules(
        original,
        held,
        POLICY_KINDS,
        [tel.zero_share],
        contextlib.nullcontext,
        calibration_tokens=args.calibration_tokens,
        calibration_blocks=calibration,
    )
    rule_rows = [
        {**r.row(), "ppl": r.metrics["ppl"], "calibrated_share": r.calibration.achieved_share} for r in rules
    ]
    verdict = compare(zeda_row, rule_rows, args.split, tokens=metrics["tokens"])
    # Skipping by rank concentrates the real slots on each token's first choices whoever skips,
    # so the best rule's loads at the same share are the fair measure of what training adds.
    by_label = {r.label: r.telemetry for r in rules}
    rule_loads = {label: t.load_ratio for label, t in by_label.items()}
    # A layer that skips more than the others keeps fewer real slots a token, so its load is
    # read beside its share.
    shares = {"zeda": tel.per_layer}
    if verdict.rule in by_label:
        loads["best_rule"] = rule_loads[verdict.rule]
        shares["best_rule"] = by_label[verdict.rule].per_layer
    result_json = run / "result.json"
    validation_verdict = json.loads(result_json.read_text()).get("verdict") if result_json.is_file() else None
    out = {
        "run": str(run),
        "model": cfg.model.name_or_path,
        "export": str(export),
        "split": args.split,
        "test_file": str(test),
        "calibrated_on": str(validation),
        "tokens": metrics["tokens"],
        "original_ppl": math.exp(held.teacher_nll),
        "zeda": zeda_row,
        "rules": rule_rows,
        "verdict": verdict.to_dict(),
        "expert_load_ratio": {k: {str(i): v for i, v in d.items()} for k, d in loads.items()},
        "rule_load_ratio": {k: {str(i): v for i, v in d.items()} for k, d in rule_loads.items()},
        "zero_share_per_layer": {k: {str(i): v for i, v in d.items()} for k, d in shares.items()},
        "validation_verdict": validation_verdict,
        "command": "python -m evals.transfer.score " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    path = Path(args.out) if args.out else run / f"{args.split}_scores.json"
    path.write_text(json.dumps(out, indent=1))
    print(verdict.summary())
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
