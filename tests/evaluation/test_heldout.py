"""Held-out scoring: chunked metrics equal the full-logit ones, only the model under test is counted,
and memory stays bounded at a real vocabulary (issue 16, defects 1 and 6)."""

from __future__ import annotations

import contextlib
import gc
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import token_batch

import zeda
from zeda.evaluation import heldout
from zeda.evaluation.heldout import HeldOut
from zeda.evaluation.run_eval import evaluate
from zeda.tiny import tiny_model, tiny_tokenizer
from zeda.zero.telemetry import RouterTelemetry


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _injected(family: str = "qwen3_moe", **overrides) -> torch.nn.Module:
    model = tiny_model(family, num_experts_per_tok=4, **overrides)
    zeda.inject_zero_experts(model, 4, seed=3)
    return model.eval()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_chunked_scores_equal_full_logits(family: str) -> None:
    model = _injected(family)
    blocks = token_batch(5, 12)
    held = HeldOut(
        blocks, model, lambda: zeda.teacher_mode(model), batch_size=2, progress=False, chunk_tokens=7
    )
    held.prepare()
    metrics, _ = held.score(model, contextlib.nullcontext, "test")
    with torch.no_grad():
        with zeda.teacher_mode(model):
            t_lp = F.log_softmax(model(input_ids=blocks).logits[:, :-1].float(), -1)
        s_lp = F.log_softmax(model(input_ids=blocks).logits[:, :-1].float(), -1)
    labels = blocks[:, 1:, None]
    n = labels.numel()
    t_nll = float(-t_lp.gather(-1, labels).sum()) / n
    s_nll = float(-s_lp.gather(-1, labels).sum()) / n
    assert held.teacher_nll == pytest.approx(t_nll, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(s_nll), rel=1e-5)
    assert metrics["top1_agreement"] == pytest.approx(
        float((s_lp.argmax(-1) == t_lp.argmax(-1)).float().mean())
    )
    kl = float((t_lp.exp() * (t_lp - s_lp)).sum()) / n
    assert metrics["mean_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert metrics["tokens"] == n


def test_share_counts_the_model_under_test_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no teacher cache, the teacher is recomputed per batch; its slots must not be counted."""
    monkeypatch.setattr(heldout, "TEACHER_CACHE_BYTES", 0)
    tok = tiny_tokenizer()
    from zeda.tiny import tiny_corpus

    (tmp_path / "heldout.jsonl").write_text("".join(f'{{"text": "{d}"}}\n' for d in tiny_corpus(16)))
    cfg = zeda.RunConfig()
    cfg.data.eval_file = str(tmp_path / "heldout.jsonl")
    cfg.data.seq_len = 32
    cfg.eval.max_eval_tokens = 256
    cfg.eval.tasks = []
    cfg.eval.baselines = ["top_p"]
    model = _injected()
    r = evaluate(model, cfg, tok, progress=False)
    # An independent count of the converted model's own routing on the same blocks.
    from zeda.distillation.data import pack_texts, read_jsonl

    blocks = pack_texts(read_jsonl(tmp_path / "heldout.jsonl", "text"), tok, 32, max_tokens=256)[: 256 // 32]
    with torch.no_grad(), RouterTelemetry(model) as tel:
        for ids in torch.split(blocks, 8):
            model(input_ids=ids)
    assert tel.zero_share > 0.05
    assert r.zero_share == pytest.approx(tel.zero_share, abs=1e-9)
    assert r.curve[1].label == "zeda" and r.curve[1].zero_share == pytest.approx(tel.zero_share, abs=1e-9)
    assert r.measured_tokens == blocks.numel()
    top_p = next(p for p in r.curve if p.method == "top_p")
    assert abs(top_p.zero_share - tel.zero_share) <= 0.05  # calibrated to the true share, not half of it


def _peak_rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")
def test_memory_bounded_at_real_vocabulary() -> None:
    """Vocabulary 151,936 (Qwen3): no full fp32 (B, T, V) copy of logits is ever held."""
    vocab, b, t = 151_936, 8, 256
    model = _injected(vocab_size=vocab, hidden_size=16, num_hidden_layers=1)
    blocks = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))
    full_copy = b * t * vocab * 4  # one fp32 (B, T, V) tensor: 1.2 GB
    held = HeldOut(blocks, model, lambda: zeda.teacher_mode(model), batch_size=b, progress=False)
    gc.collect()
    before = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter of this process
    held.prepare()
    metrics, tel = held.score(model, contextlib.nullcontext, "zeda")
    peak = _peak_rss_bytes() - before
    assert metrics["tokens"] == b * (t - 1) and tel.zero_share > 0
    assert peak < full_copy / 4, (
        f"peak {peak / 2**20:.0f} MiB vs one (B,T,V) copy {full_copy / 2**20:.0f} MiB"
    )


# PEFT reads transformers' deprecated alias (zeda's own get_peft_model call filters it the same way).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_chunked_scores_of_a_peft_student() -> None:
    """Adapters live inside the modules: the decoder-then-head path sees them, teacher mode does not."""
    from peft import LoraConfig, get_peft_model

    model = _injected()
    student = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    blocks = token_batch(4, 12)
    held = HeldOut(blocks, student, lambda: zeda.teacher_mode(student), 2, False, chunk_tokens=5)
    held.prepare()
    metrics, _ = held.score(student, contextlib.nullcontext, "peft")
    with torch.no_grad():
        s_lp = F.log_softmax(student(input_ids=blocks).logits[:, :-1].float(), -1)
        with zeda.teacher_mode(student):
            t_lp = F.log_softmax(student(input_ids=blocks).logits[:, :-1].float(), -1)
    labels = blocks[:, 1:, None]
    assert metrics["ppl"] == pytest.approx(math.exp(float(-s_lp.gather(-1, labels).mean())), rel=1e-5)
    assert held.teacher_nll == pytest.approx(float(-t_lp.gather(-1, labels).mean()), rel=1e-5)
    assert metrics["mean_kl"] > 0  # the adapters change the student


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_scoring_settings_together_equals_scoring_each_alone(family: str) -> None:
    """`score_many` shares the teacher's side of each chunk; each setting's figures and counted
    routing are exactly what `score` gives it alone, and `score_rules` takes the shared pass."""
    from zeda.evaluation import curve
    from zeda.evaluation.baselines import apply_policy, calibrate_rule
    from zeda.zero.routing import router_settings

    model = _injected(family)
    blocks = token_batch(5, 12)
    held = HeldOut(
        blocks, model, lambda: zeda.teacher_mode(model), batch_size=2, progress=False, chunk_tokens=7
    )
    held.prepare()
    with zeda.teacher_mode(model):
        cal = calibrate_rule(model, "top_p", 0.3, [blocks])

    @contextlib.contextmanager
    def rule():
        with zeda.teacher_mode(model), apply_policy(model, cal.policy):
            yield

    ctxs = [contextlib.nullcontext, lambda: router_settings(model, zero_logit_bias=2.0), rule]
    together = held.score_many(model, ctxs, "together")
    alone = [held.score(model, c, "alone") for c in ctxs]
    for (m_t, tel_t), (m_a, tel_a) in zip(together, alone, strict=True):
        assert m_t == m_a
        assert tel_t.zero_share == tel_a.zero_share and tel_t.zero_share >= 0
    assert len({m["mean_kl"] for m, _ in together}) == 3  # three different settings
    assert held.score_many(model, [], "none") == []

    rows = curve.score_rules(model, held, ["top_p", "threshold"], [0.3], lambda: zeda.teacher_mode(model))
    for r in rows:

        @contextlib.contextmanager
        def ctx(cal=r.calibration):
            with zeda.teacher_mode(model), apply_policy(model, cal.policy):
                yield

        assert held.score(model, ctx, "alone")[0] == r.metrics
