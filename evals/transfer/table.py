"""Write the transfer table: the router-kind default, unchanged, on every zoo member it ran on.

Reads every finished run under ``--runs`` (``<runs>/<name>/share_<s>[_<variant>]/``, written by
``evals/transfer/distill.py``) and its one test scoring (``test_scores.json``, written by
``evals/transfer/score.py``), and writes one markdown table: per run the member's role (tuning or
validation, `evals/zoo/members.py`), the validation verdict the run itself reached, the test
figures of zeda and of the best training-free rule calibrated to zeda's measured share, zeda's
perplexity increase over the best rule's, whether zeda is at least as good as every rule on all
three figures, and the CPU time. The commands of every row follow the table.

    python -m evals.transfer.table --runs runs/transfer --out evals/transfer/results.md
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from evals.transfer.distill import VARIANTS as VARIANT_OVERRIDES
from evals.zoo.members import MEMBERS
from zeda.evaluation.verdict import compare

ROOT = Path(__file__).resolve().parents[2]

HEADER = (
    "| model | role | router | target | variant | steps (stop) | CPU-min | validation: zeda vs best rule "
    "(ppl ratio) | test: skipped | test: zeda ppl ratio / agr. / KL | test: best rule, ppl ratio / agr. / KL "
    "| increase / best rule's | better than every rule on all three | busiest expert / mean, zeda (original; best rule where scored) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


TITLE = "# The router-kind default on the zoo"
PREAMBLE = (
    TITLE
    + """

Written by `bash evals/transfer/keep.sh RUNS && python -m evals.transfer.table --out evals/transfer/results.md` (the records of every run are in `evals/transfer/records/`). Each row is
one run of `evals/transfer/distill.py` (the minimal recipe: model, data, target share and the
variant; every other key from `zeda/defaults/`), whose checkpoint was chosen on validation text,
then one scoring of its export on the member's test split by `evals/transfer/score.py` against
every training-free rule calibrated on validation text to the export's measured share. Roles come
from `evals/zoo/members.py`: settings may be chosen on *tuning* members only.

**How settings were chosen.** No setting in this table was chosen on these models: every row runs
the router kind's default (`zeda/defaults/`): the settings that won on the issue's outside glm4_moe,
except LoRA's learning rate (1e-3 instead of 5e-4), which was chosen on the tuning members'
validation text (`evals/transfer/selection.md`) and adopted after it also beat 5e-4 on the
validation text of every validation member it ran on (`evals/transfer/previous.md` holds the rows
at 5e-4; the adoption compared validation figures only), and the head budget (`stage1.head_budget`:
where the lm_head costs more than twice the rest of the model per token, only on `deepseek_v3` in
the zoo, each step trains the logits of a random share of the positions), a compute rule kept
after the tuning member `reference_sigmoid` still met the bar at that share of positions
(`evals/transfer/candidates.md`). Each run's checkpoint was
chosen on its member's validation split (validation KL at the target share), the training-free
rules were calibrated on validation text, and the test split was scored once per run, for this
table, after training had ended. So every setting and checkpoint here was chosen on validation text,
and each row's test tokens were scored once, for this table; a run redone (e.g. on a member's retrained weights) replaces its row, so no
row was picked among repeated runs. A variant cell names every setting a run took off today's default: an override fixed before
the run (`balance.md`), not chosen by comparing runs, or a key that ran at an earlier default
("the default then"); a run that named a lead which later became the default names nothing. CPU-min: all threads of every invocation of the distillation
(a 2-core machine shared with other jobs; the run at 1 thread).
The increase ratio is zeda's perplexity increase over the best rule's; below 0 means zeda's
perplexity fell below the original's on that text. A rule whose measured share is more than 2.5
points from the export's is not compared (`zeda.evaluation.verdict.SHARE_TOLERANCE`: keep-top-m on
a top-2 router reaches 0, 50 or 100% only); every verdict is recomputed from its stored figures.

"""
)


def _role(name: str) -> tuple[str, str]:
    m = MEMBERS.get(name)
    return (m.role, m.router_shape) if m else ("outside the zoo", "?")


def _figs(d: dict) -> str:
    return f"{d['ppl_ratio']:.4f} / {d['top1_agreement']:.3f} / {d['mean_kl']:.4f}"


def _ratio(x: float | None, zeda_ppl_ratio: float) -> str:
    if zeda_ppl_ratio <= 1.0:
        return "< 0 (ppl fell)"
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}×"


def _loads(scores: dict) -> str:
    loads = scores.get("expert_load_ratio")
    if not loads:
        return "—"
    z, o = loads["zeda"], loads["original"]
    return f"{max(z.values()):.1f} ({max(o.values()):.1f}{best_rule_load(loads)}) at most over layers"


def best_rule_load(loads: dict) -> str:
    """``"; best rule <its busiest expert's load at most over layers>"``, or "" for runs scored before
    the rules' loads were recorded."""
    return f"; best rule {max(loads['best_rule'].values()):.1f}" if loads.get("best_rule") else ""


def reverdict(verdict: dict) -> dict:
    """The verdict recomputed from its stored figures with today's `compare` (which rules count
    as matched to zeda's share may have changed since the run); ``{}`` stays ``{}``."""
    if not verdict:
        return {}
    zeda = {**verdict["zeda"], "zero_share": verdict["zero_share"]}
    return compare(zeda, verdict["rules"], verdict["split"], tokens=verdict.get("tokens", 0)).to_dict()


def _rule(verdict: dict) -> str:
    """The best rule's label and measured share; flagged when no rule reached zeda's share."""
    far = " (no rule reaches zeda's share)" if verdict["rule"] in verdict.get("unmatched", {}) else ""
    return f"{verdict['rule']} at {verdict['rule_figures']['zero_share']:.1%}{far}"


def _beats(verdict: dict) -> str:
    if verdict.get("beats"):
        return "yes"
    by = "; ".join(f"{rule} on {', '.join(figs)}" for rule, figs in verdict.get("beaten_by", {}).items())
    return f"no: {by}"


def _today(record: dict) -> dict:
    """``dotted key -> value`` of today's default for the run's router kind and variant ({} if the
    model's config cannot be read)."""
    from zeda.defaults import default_values, router_kind_of

    member = MEMBERS.get(record["name"])
    found = router_kind_of(str(member.model_dir) if member else record["model"])
    return default_values(found[1], record["variant"]) if found else {}


THEN = " (the default then)"
"""Marks a key that a run did not set but ran at an earlier default."""


def off_default(record: dict, run: Path | None = None) -> list[tuple[str, bool]]:
    """Every setting the run took off *today's* default of its router kind and variant, as
    ``(key=value, whether it was the default then)``.

    An override is named unless it is the variant's own or sets a key of the default to today's
    value (a lead that later became the default). A key of the default that the run did not
    override but ran at another value (the default of its day, read from the run's stored
    resolved ``recipe.yaml`` in ``run``) is named with "(the default then)", so a run never passes
    for today's default when it is not.
    """
    import yaml

    own = set(VARIANT_OVERRIDES.get(record["variant"], ()))
    today = _today(record)
    stored_path = run / "recipe.yaml" if run is not None else None
    stored = yaml.safe_load(stored_path.read_text()) if stored_path and stored_path.is_file() else None

    def ran(key: str):
        section, name = key.split(".", 1)
        return (stored or {}).get(section, {}).get(name)

    named, extra = set(), []
    for o in record.get("overrides", []):
        key = o.split("=", 1)[0]
        named.add(key)
        if o in own or (stored is not None and key in today and ran(key) == today[key]):
            continue
        extra.append((o, False))
    if stored is not None:
        extra += [
            (f"{k}={ran(k)}", True)
            for k, v in today.items()
            if k not in named and not _same_effect(record, k, ran(k), v, ran("data.seq_len"))
        ]
    return extra


def _same_effect(record: dict, key: str, ran: object, today: object, seq_len: int | None) -> bool:
    """Whether a run that ran ``key`` at ``ran`` trained as today's value would have.

    ``stage1.head_budget`` (added to the defaults after most runs, which ran with every position)
    acts only through the share of positions it gives the member's model (`logit_fraction`), so
    a run counts as today's default wherever both values give the same share.
    """
    if ran == today:
        return True
    member = MEMBERS.get(record["name"])
    if key != "stage1.head_budget" or member is None or seq_len is None:
        return False
    from zeda.evaluation.flops import load_config
    from zeda.evaluation.head import logit_fraction

    config = load_config(str(member.model_dir))
    return logit_fraction(config, ran, seq_len) == logit_fraction(config, today, seq_len)


def _variant(record: dict, run: Path | None = None) -> str:
    """The variant, plus every setting the run took off today's default (`off_default`)."""
    return record["variant"] + "".join(
        f" + `{o}`" + (THEN if then else "") for o, then in off_default(record, run)
    )


def rows(runs: Path, members: Sequence[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """Table rows, the commands behind them, and the runs not finished or not scored yet.

    Args:
        runs: Parent of ``<name>/<run>/transfer.json`` folders (runs or their kept records).
        members: Keep only these run names (all when empty).
    """
    out, commands, pending = [], [], []
    for record_path in sorted(runs.glob("*/*/transfer.json")):
        run = record_path.parent
        record = json.loads(record_path.read_text())
        if members and record["name"] not in members:
            continue
        scores_path = run / "test_scores.json"
        if not record.get("finished") or not scores_path.is_file():
            pending.append(str(run))
            continue
        scores = json.loads(scores_path.read_text())
        test, val = reverdict(scores["verdict"]), reverdict(record.get("verdict") or {})
        role, router = _role(record["name"])
        steps = record["steps"]["stage1"] + record["steps"].get("stage2", 0)
        val_cell = (
            f"{val['zeda']['ppl_ratio']:.4f} vs {val['rule_figures']['ppl_ratio']:.4f} ({val['rule']}), "
            f"{'beats all' if val.get('beats') else 'beaten'}"
            if val
            else "—"
        )
        out.append(
            f"| `{record['name']}` | {role} | {router} | {record['share']:.0%} | {_variant(record, run)} | "
            f"{steps} ({record.get('stop_reason') or 'done'}) | {record['cpu_seconds'] / 60:.0f} | {val_cell} | "
            f"{test['zero_share']:.1%} | {_figs(test['zeda'])} | {_rule(test)}: {_figs(test['rule_figures'])} | "
            f"{_ratio(test.get('increase_ratio'), test['zeda']['ppl_ratio'])} | {_beats(test)} | {_loads(scores)} |"
        )
        commands.append(f"{record['command']}\n{scores['command']}")
    return out, commands, pending


def emit(text: str, out: str | None) -> str:
    """Write ``text`` to ``out`` (saying so), or print it when ``out`` is None; return it."""
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs",
        action="append",
        help="parent of the run directories (or of their records); repeat to join several "
        "(default: evals/transfer/records)",
    )
    ap.add_argument("--member", action="append", default=[], help="only this run name (repeatable)")
    ap.add_argument("--title", default=None, help="the first line (default: the default's table title)")
    ap.add_argument(
        "--note",
        action="append",
        default=[],
        help="a paragraph after the preamble, e.g. which weights the runs read (repeatable)",
    )
    ap.add_argument("--out", help="write the markdown here (default: print it)")
    args = ap.parse_args(argv)
    table, commands, pending = [], [], []
    for runs in args.runs or [str(ROOT / "evals/transfer/records")]:
        t, c, p = rows(Path(runs), args.member)
        table, commands, pending = table + t, commands + c, pending + p
    preamble = PREAMBLE if args.title is None else PREAMBLE.replace(TITLE, args.title, 1)
    notes = "".join(f"{n.strip()}\n\n" for n in args.note)
    text = preamble + notes + "\n".join([HEADER, *table]) + "\n"
    if commands:
        text += "\nCommands (distillation, then the one test scoring), row by row:\n\n```bash\n"
        text += "\n\n".join(commands) + "\n```\n"
    if pending:
        text += "\nNot finished or not scored yet: " + ", ".join(f"`{p}`" for p in pending) + "\n"
    return emit(text, args.out)


if __name__ == "__main__":
    main()
