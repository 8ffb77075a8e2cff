"""Choose a router kind's default on the tuning members' validation text, never on test text.

Reads the finished runs of ``evals/transfer/distill.py`` under ``--runs``: candidate settings of
one variant and target share, each the router kind's current default plus the candidate's
``key=value`` overrides (the default itself has none), run on the kind's tuning members
(``evals/zoo/members.py``). It reads only each run's own validation verdict (``transfer.json``):
test scores are never opened, and a run of a validation member is refused, because settings may
be chosen on tuning members only. Where a run was also scored on its own validation text
(``python -m evals.transfer.score RUN --split validation``, ``validation_scores.json``), the table
shows its busiest real expert's load beside the original's (issue 25, goal 5); a scores file of
any other text is refused.

The choice rule is fixed before any run (`choose`): per router kind, variant and share, a candidate
qualifies when it ran on every tuning member of the group and beat every training-free rule on
validation perplexity ratio, top-1 agreement and KL on each; among those, the lowest mean
increase ratio (zeda's validation perplexity increase over the best rule's, below 0 when zeda's
perplexity fell) wins, and a candidate within `TIE` of the current default's, or with a higher mean
validation KL than the default's, does not replace it (a change must pay for its risk, and must not
buy a lower perplexity with a worse match to the original). The winner is then a lead: it becomes the default only after it
also wins on the validation members (``evals/transfer/results.md``).

    python -m evals.transfer.select --runs runs/select --out evals/transfer/selection.md
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evals.transfer.table import THEN, best_rule_load, emit, off_default, reverdict

ROOT = Path(__file__).resolve().parents[2]

TIE = 0.02
"""Mean increase ratios closer than this to the default's are a tie, and the default stays."""

DEFAULT = "the default"


@dataclass(frozen=True)
class Candidate:
    """One finished candidate run: its group, its label and its validation verdict.

    Attributes:
        member: Zoo member the run distilled.
        kind: Router kind of the member (the defaults file it tunes, ``zeda/defaults``).
        variant: ``lora`` or ``full_experts``.
        share: Target zero share.
        label: The overrides beyond the variant's own, joined; `DEFAULT` when none.
        verdict: The run's validation verdict, recomputed from its stored figures.
        record: The run's ``transfer.json``.
        loads: ``{"zeda": {layer: ratio}, "original": {...}[, "best_rule": {...}]}``: per MoE layer, the busiest real
            expert's load over the mean real-expert load on validation text
            (``validation_scores.json``), or None when the run was not scored there.
    """

    member: str
    kind: str
    variant: str
    share: float
    label: str
    verdict: dict
    record: dict
    loads: dict | None = None

    @property
    def increase(self) -> float:
        """Zeda's validation perplexity increase over the best rule's (below 0: zeda's fell)."""
        zeda, rule = self.verdict["zeda"]["ppl_ratio"] - 1.0, self.verdict["rule_figures"]["ppl_ratio"] - 1.0
        return zeda / rule if rule > 0 else math.inf


def _tuning_members(allow: Sequence[str]) -> dict[str, str]:
    """``{name: router kind}`` of the zoo's tuning members, plus ``allow`` (names outside the zoo)."""
    from evals.zoo.members import MEMBERS
    from zeda.defaults import router_kind_of

    out = {}
    for name, m in MEMBERS.items():
        if m.role == "tuning":
            kind = router_kind_of(str(m.model_dir))
            out[name] = kind[1] if kind else m.family
    return out | {name: "" for name in allow}


def load(runs: Sequence[Path], allow: Sequence[str] = ()) -> list[Candidate]:
    """Every finished candidate run under ``runs``.

    Args:
        runs: Parents of ``<name>/<run>/transfer.json`` folders.
        allow: Run names outside the zoo to accept as tuning members (tests).

    Raises:
        SystemExit: A run distilled a validation member (or a model neither in the zoo nor allowed).
    """
    from zeda.defaults import router_kind_of

    tuning = _tuning_members(allow)
    out = []
    for folder in runs:
        for path in sorted(Path(folder).glob("*/*/transfer.json")):
            record = json.loads(path.read_text())
            if not record.get("finished"):
                continue
            name = record["name"]
            if name not in tuning:
                raise SystemExit(
                    f"{path}: {name!r} is not a tuning member (evals/zoo/members.py); settings may be "
                    "chosen on tuning members only, so move its run out of --runs"
                )
            kind = tuning[name] or (router_kind_of(record["model"]) or ("", "?"))[1]
            extra = [o + (THEN if then else "") for o, then in off_default(record, path.parent)]
            loads = None
            scores_path = path.parent / "validation_scores.json"
            if scores_path.is_file():
                scores = json.loads(scores_path.read_text())
                if scores.get("split") != "validation" or scores["test_file"] != scores["calibrated_on"]:
                    raise SystemExit(
                        f"{scores_path}: scored {scores.get('test_file')}, not the run's validation text; "
                        "rescore it with `python -m evals.transfer.score RUN --split validation`"
                    )
                loads = scores["expert_load_ratio"]
            out.append(
                Candidate(
                    member=name,
                    kind=kind,
                    variant=record["variant"],
                    share=record["share"],
                    label=" ".join(extra) or DEFAULT,
                    verdict=reverdict(record["verdict"]),
                    record=record,
                    loads=loads,
                )
            )
    return out


def choose(cands: Sequence[Candidate]) -> dict[tuple[str, str, float], dict]:
    """The choice per ``(router kind, variant, share)``: see the module docstring.

    Returns:
        Per group: ``members`` (sorted), ``qualified`` (label -> mean increase ratio), ``kl`` (label ->
        mean validation KL, for the qualified), ``chosen`` (a label, or None when no candidate
        qualifies) and ``changed`` (whether it is not `DEFAULT`).
    """
    groups: dict[tuple[str, str, float], list[Candidate]] = defaultdict(list)
    for c in cands:
        groups[(c.kind, c.variant, c.share)].append(c)
    out = {}
    for key, group in sorted(groups.items()):
        members = sorted({c.member for c in group})
        by_label: dict[str, list[Candidate]] = defaultdict(list)
        for c in group:
            by_label[c.label].append(c)
        qualified = {
            label: sum(c.increase for c in runs) / len(runs)
            for label, runs in by_label.items()
            if sorted(c.member for c in runs) == members and all(c.verdict.get("beats") for c in runs)
        }
        kl = {
            label: sum(c.verdict["zeda"]["mean_kl"] for c in by_label[label]) / len(by_label[label])
            for label in qualified
        }
        eligible = qualified
        if DEFAULT in qualified:
            eligible = {
                label: x
                for label, x in qualified.items()
                if label == DEFAULT or (x <= qualified[DEFAULT] - TIE and kl[label] <= kl[DEFAULT])
            }
        chosen = min(eligible, key=eligible.get) if eligible else None
        out[key] = {
            "members": members,
            "qualified": qualified,
            "kl": kl,
            "chosen": chosen,
            "changed": chosen not in (None, DEFAULT),
        }
    return out


def _loads(loads: dict | None) -> str:
    """``max zeda (max original); worst layer's zeda / original[; best rule max]``, or a dash."""
    if not loads:
        return "—"
    z, o = loads["zeda"], loads["original"]
    worst = max(z[i] / o[i] for i in z if o.get(i))
    return (
        f"{max(z.values()):.1f} ({max(o.values()):.1f}); {worst:.2f}× the original's in the worst layer"
        + best_rule_load(loads)
    )


def _figs(d: dict) -> str:
    return f"{d['ppl_ratio']:.4f} / {d['top1_agreement']:.3f} / {d['mean_kl']:.4f}"


def render(cands: Sequence[Candidate], choice: dict) -> str:
    """The markdown: the validation table, the choice per group and the commands."""
    with_loads = any(c.loads for c in cands)
    lines = [
        "| router kind | variant | target | candidate | member | steps (stop) | CPU-min | validation: skipped "
        "| zeda ppl ratio / agr. / KL | best rule, ppl ratio / agr. / KL | increase / best rule's | beats every "
        "rule on all three |"
        + (
            " busiest real expert / mean, validation: zeda (original), at most over layers; best rule where scored |"
            if with_loads
            else ""
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_loads else ""),
    ]
    for c in sorted(cands, key=lambda c: (c.kind, c.variant, c.share, c.label != DEFAULT, c.label, c.member)):
        v, r = c.verdict, c.record
        steps = r["steps"]["stage1"] + r["steps"].get("stage2", 0)
        inc = "n/a" if not math.isfinite(c.increase) else f"{c.increase:.2f}×"
        lines.append(
            f"| {c.kind} | {c.variant} | {c.share:.0%} | {'`' + c.label + '`' if c.label != DEFAULT else DEFAULT} "
            f"| `{c.member}` | {steps} ({r.get('stop_reason') or 'done'}) | {r['cpu_seconds'] / 60:.0f} "
            f"| {v['zero_share']:.1%} | {_figs(v['zeda'])} | {v['rule']}: {_figs(v['rule_figures'])} | {inc} "
            f"| {'yes' if v.get('beats') else 'no'} |" + (f" {_loads(c.loads)} |" if with_loads else "")
        )
    lines += [
        "",
        "Choice per router kind, variant and target (mean validation increase ratio of each candidate "
        "that beat every rule on every tuning member of the group; a candidate replaces the default only "
        f"with a mean increase ratio lower by at least {TIE} and a mean validation KL no higher):",
        "",
    ]
    for (kind, variant, share), ch in choice.items():
        q = ", ".join(
            f"{label}: {x:.3f} (KL {ch['kl'][label]:.5f})"
            for label, x in sorted(ch["qualified"].items(), key=lambda kv: kv[1])
        )
        verdict = (
            "no candidate qualifies"
            if ch["chosen"] is None
            else f"**{ch['chosen']}**"
            + (" (a lead: confirm on the validation members)" if ch["changed"] else "")
        )
        lines.append(
            f"- {kind}, {variant}, {share:.0%} (tuning members: {', '.join(ch['members'])}): {verdict}"
            + (f"; qualified: {q}" if q else "")
        )
    lines += ["", "Commands, one per run:", "", "```bash"]
    lines += [c.record["command"] for c in sorted(cands, key=lambda c: c.record["command"])]
    lines += ["```", ""]
    return "\n".join(lines)


PREAMBLE = """# Choosing the defaults on the tuning members' validation text

Written by

```bash
{command}
```

Every figure below is a run's own validation verdict (its checkpoint chosen on validation KL at the target share, every training-free rule calibrated on validation text to
the run's measured share); no test text was read for this file. Candidates run on the tuning
members only (`evals/zoo/members.py`); a winner other than the current default is a lead until it
also wins on the validation members, which report its test figures in `evals/transfer/results.md`.
The choice rule, fixed before any result of these runs was read, is in `evals/transfer/select.py`.

"""


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs", action="append", required=True, help="parent of candidate run folders (repeatable)"
    )
    ap.add_argument("--allow", action="append", default=[], help=argparse.SUPPRESS)  # tests: a tiny model
    ap.add_argument("--note", action="append", default=[], help="a paragraph after the preamble (repeatable)")
    ap.add_argument("--out", help="write the markdown here (default: print it)")
    args = ap.parse_args(argv)
    cands = load([Path(r) for r in args.runs], args.allow)
    if not cands:
        raise SystemExit(f"no finished run under {', '.join(args.runs)}; run evals/transfer/distill.py first")
    command = shlex.join(
        ["python", "-m", "evals.transfer.select"]
        + [x for r in args.runs for x in ("--runs", r)]
        + [x for n in args.note for x in ("--note", n)]
        + (["--out", args.out] if args.out else [])
    )
    text = PREAMBLE.format(command=command) + "".join(f"{n.strip()}\n\n" for n in args.note)
    text += render(cands, choose(cands))
    return emit(text, args.out)


if __name__ == "__main__":
    main()
