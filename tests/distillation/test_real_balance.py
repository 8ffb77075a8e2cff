"""Balance among the real experts: the optional loss term and the original's loads in the report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import metrics, run_config, token_batch

import zeda
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.balance import RouterCapture, RouterRecord, real_balance_loss
from zeda.distillation.loop import distill
from zeda.distillation.student import build_student
from zeda.evaluation.run_eval import evaluate
from zeda.tiny import tiny_corpus, tiny_model, tiny_tokenizer
from zeda.zero.routing import zero_routers


def _student(family):
    return build_student(tiny_model(family), apply_overrides(RunConfig(), ["inject.num_zero_experts=4"]))


def _captured(student, ids):
    with torch.no_grad(), zeda.teacher_mode(student), RouterCapture(student, teacher=True) as t:
        student(ids)
    with RouterCapture(student) as s:
        student(ids)
    return s.records, t.records


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_zero_when_the_student_routes_like_the_original(family):
    student, ids = _student(family), token_batch(2, 16)
    records, originals = _captured(student, ids)
    assert [r.router.zeda_layer_index for r in records] == [r.router.zeda_layer_index for r in originals]
    same = [RouterRecord(r.router, r.logits, o.indices) for r, o in zip(records, originals, strict=True)]
    assert float(real_balance_loss(same, originals, None, alpha=1.0).detach()) == 0.0


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_an_overloaded_expert_is_pushed_down_and_zero_logits_get_no_gradient(family):
    student, ids = _student(family), token_batch(2, 16)
    _, originals = _captured(student, ids)
    records = []
    for o in originals:  # every token sends its first slot to real expert 0, the rest as the original
        e = o.router.num_experts
        logits = torch.randn(o.indices.shape[0], e + 4, requires_grad=True)
        idx = o.indices.clone()
        idx[:, 0] = 0
        records.append(RouterRecord(o.router, logits, idx))
        assert idx.shape[1] >= 2
    mask = torch.ones(records[0].logits.shape[0])
    mask[-3:] = 0  # padding does not count
    loss = real_balance_loss(records, originals, mask, alpha=0.5)
    assert float(loss.detach()) > 0
    loss.backward()
    for r in records:
        e = r.router.num_experts
        grad = r.logits.grad
        assert torch.equal(grad[:, e:], torch.zeros_like(grad[:, e:]))  # no push on the zero experts
        assert torch.equal(grad[-3:], torch.zeros_like(grad[-3:]))  # padding has no gradient
        assert (grad[:-3, 0] > 0).all()  # lowering expert 0's logit lowers the loss
    # Twice the coefficient, twice the loss.
    assert float(real_balance_loss(records, originals, mask, alpha=1.0).detach()) == pytest.approx(
        2 * float(loss.detach())
    )


def _max_over_mean(student, ids):
    """Worst layer's busiest-real-expert load / mean load of the student on ``ids``."""
    with zeda.RouterTelemetry(student) as tel, torch.no_grad():
        student(ids)
    return max(tel.load_ratio.values())


def test_the_term_trains_and_keeps_the_busiest_expert_nearer_the_original(corpus, tmp_path):
    ids = token_batch(8, 32, seed=7)
    original = tiny_model("qwen3_moe")
    original.set_experts_implementation("eager")
    with torch.no_grad():
        ref = original(ids).logits

    def run(real_alpha):
        student = build_student(tiny_model("qwen3_moe"), apply_overrides(RunConfig(), []))
        # A hot expert the original does not have: the student's router copy turns expert 0's
        # row towards the mean hidden state its layer sees.
        trained = [r for r in zero_routers(student) if r.weight.requires_grad]
        seen = {}

        def keep(module, args, out):
            seen.setdefault(module, args[0].mean(0))

        handles = [r.register_forward_hook(keep) for r in trained]
        with torch.no_grad():
            student(ids)
            for r in trained:
                direction = seen[r].reshape(-1)
                r.weight[0] += 3 * r.weight.norm(dim=1).mean() * direction / direction.norm()
        for h in handles:
            h.remove()
        before = _max_over_mean(student, ids)
        cfg = run_config(
            corpus,
            tmp_path / f"run{real_alpha}",
            "train.eval_every=0",
            "train.verdict=false",
            "train.warmup_ratio=0.0",
            "train.lr_schedule=constant",
            "stage1.lr=0.02",
            "stage1.steps=12",
            "lora.enabled=false",  # only the routers train: the loads are theirs alone
            f"balance.real_alpha={real_alpha}",
        )
        student, _ = distill(student, cfg, tiny_tokenizer())
        rows = metrics(tmp_path / f"run{real_alpha}")
        with torch.no_grad(), zeda.teacher_mode(student):
            assert torch.equal(student(ids).logits, ref)  # the teacher stays the original
        return before, _max_over_mean(student, ids), rows

    before, without, rows0 = run(0.0)
    _, with_term, rows = run(2.0)
    assert all("real_balance" in r and r["real_balance"] > 0 for r in rows)
    assert not any("real_balance" in r for r in rows0)
    # The hot expert cools down with the term, not without it.
    assert with_term < before and with_term < without


def test_evaluation_reports_the_originals_loads_beside_zedas(tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus(24)))
    original = tiny_model("qwen3_moe")
    model = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(model, num_zero_experts=4)
    cfg = apply_overrides(RunConfig(), [f"data.eval_file={heldout}", "data.seq_len=32", "eval.baselines=[]"])
    result = evaluate(model, cfg, tiny_tokenizer(), tasks=[], progress=False)
    # The original's loads, counted independently with hooks on the untouched model's routers.
    from zeda.distillation.data import pack_texts, read_jsonl

    blocks = pack_texts(read_jsonl(heldout), tiny_tokenizer(), 32, max_tokens=cfg.eval.max_eval_tokens)
    loads = {}
    layers = zeda.find_moe_layers(original)

    def hook(i):
        def fn(module, args, out):
            loads[i] = loads.get(i, 0) + torch.bincount(out[2].reshape(-1), minlength=8)

        return fn

    handles = [layer.router.register_forward_hook(hook(layer.index)) for layer in layers]
    with torch.no_grad():
        for batch in torch.split(blocks, 8):
            original(input_ids=batch)
    for h in handles:
        h.remove()
    want = {i: float(v.max() * v.numel() / v.sum()) for i, v in loads.items()}
    assert result.original_expert_load_ratio == pytest.approx(want)
    assert set(result.expert_load_ratio) == set(want) and all(
        v >= 1 for v in result.expert_load_ratio.values()
    )
    out = result.save(tmp_path / "eval")
    saved = json.loads((out / "results.json").read_text())
    assert saved["original_expert_load_ratio"] == {
        str(k): v for k, v in result.original_expert_load_ratio.items()
    }
    assert "the original beside zeda" in (out / "report.md").read_text()
