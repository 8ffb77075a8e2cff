"""The model zoo (evals/zoo): one trainer for every member, committed models and disjoint splits.

- every member's config builds with the shared trainer (its family), and a tiny version of it
  (same layers, experts, top-k, groups; tiny widths) trains: every parameter moves, sigmoid
  routers' correction biases move by the DeepSeek-V3 rule, and a run stopped and resumed ends
  bit-equal to an uninterrupted one;
- every committed member reloads with stock transformers and reproduces its card's check figure;
- every member's committed splits are disjoint by document and follow the split rule.
A member listed with a committed model that is missing fails (never skips).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.zoo import data as zdata
from evals.zoo import train as ztrain
from evals.zoo.members import CORPORA, MEMBERS, ROOT
from zeda.families import get_spec
from zeda.tiny import tiny_tokenizer

COMMITTED = [m for m in MEMBERS.values() if (m.model_dir / "config.json").exists() or m.role == "tuning"]
WITH_DATA = [m for m in MEMBERS.values() if (m.data_dir / "test.jsonl").exists() or m.role == "tuning"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on one thread: on a busy machine two OpenMP threads make tiny ops far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(member, tmp_path: Path, *flags: str):
    tok = tiny_tokenizer()
    config = ztrain.build_config(member, tok, vocab_size=128, **ztrain.tiny_overrides(member))
    args = ztrain.parse_args(
        [member.name, "--run-dir", str(tmp_path), "--batch-size", "2", "--seq-len", "16", "--threads", "1"]
        + ["--eval-every", "2", "--eval-blocks", "2", "--save-every", "1", "--steps", "3", *flags]
    )
    model = ztrain.build_model(member, config, args.seed)
    return model, args


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_member_config_builds_and_a_tiny_version_trains_and_resumes(name, tmp_path):
    member = MEMBERS[name]
    spec = get_spec(member.family)
    data = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(0)).int()
    model, args = _tiny(member, tmp_path / "a", "--stop-at-step", "2")
    assert model.config.model_type == member.family and isinstance(model, spec.causal_lm_class)
    assert spec.num_experts(model.config) == spec.num_experts(spec.config_class(**member.config))
    assert len(ztrain.routers(model)) == len(spec.moe_layer_indices(model.config))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    biases = (
        [r.e_score_correction_bias.clone() for r in ztrain.routers(model)] if member.balance == "bias" else []
    )
    state = ztrain.train(member, model, data, data, args, "test")
    assert state["step"] == 2 and [p["step"] for p in state["curve"]] == [0, 2]
    assert all(math.isfinite(p["val_ppl"]) for p in state["curve"])
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    for r, b in zip(ztrain.routers(model) if biases else [], biases, strict=True):
        moved = (r.e_score_correction_bias - b).abs()  # two steps of +-gamma (or 0) per expert
        assert 0 < moved.max() <= 2 * args.bias_update_speed + 1e-7
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and math.isfinite(log[-1]["loss"])

    # Resume to step 3 == an uninterrupted 3-step run (same batches, same init, same updates).
    resumed, args_r = _tiny(member, tmp_path / "a", "--resume")
    ztrain.train(member, resumed, data, data, args_r, "test")
    straight, args_s = _tiny(member, tmp_path / "b")
    ztrain.train(member, straight, data, data, args_s, "test")
    for (n, p), q in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def _lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows}


def test_warm_restart_continues_a_finished_schedule_and_resumes_bit_equal(tmp_path):
    member = MEMBERS["gpt_oss"]
    data = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(0)).int()
    extend = (
        "--resume",
        "--extend",
        "12",
        "--extend-lr",
        "1e-3",
        "--extend-warmup",
        "2",
        "--save-every",
        "10",
    )
    finished = {}
    for run in ("a", "b"):
        model, args = _tiny(member, tmp_path / run, "--eval-every", "0")
        ztrain.train(member, model, data, data, args, "test")
        finished[run] = copy.deepcopy(model.state_dict())
    # --extend before the schedule has finished, or without a checkpoint, is refused.
    with pytest.raises(SystemExit, match="finished"):
        model, args = _tiny(member, tmp_path / "c", "--stop-at-step", "2", "--eval-every", "0")
        ztrain.train(member, model, data, data, args, "test")
        model, args = _tiny(member, tmp_path / "c", *extend)
        ztrain.train(member, model, data, data, args, "test")
    with pytest.raises(SystemExit, match="does not exist"):
        model, args = _tiny(member, tmp_path / "d", *extend)
        ztrain.train(member, model, data, data, args, "test")

    # a: the restart in one go; b: stopped at step 9 and resumed by repeating the command.
    model_a, args = _tiny(member, tmp_path / "a", *extend, "--eval-every", "5")
    state = ztrain.train(member, model_a, data, data, args, "test")
    assert state["step"] == 15 and state["restarts"] == [
        {"from_step": 3, "steps": 12, "lr": 1e-3, "warmup": 2}
    ]
    assert [p["step"] for p in state["curve"]] == [5, 10, 15]
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    assert ck["step"] == ck["total_steps"] == 15
    lrs = _lrs(tmp_path / "a")
    assert lrs[10] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lrs[15] == 0.0
    model_b, args = _tiny(member, tmp_path / "b", *extend, "--stop-at-step", "9", "--eval-every", "5")
    ztrain.train(member, model_b, data, data, args, "test")
    model_b, args = _tiny(member, tmp_path / "b", *extend, "--eval-every", "5")
    ztrain.train(member, model_b, data, data, args, "test")
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["restarts"] == ck["restarts"]
    moved = [n for n, p in model_a.state_dict().items() if not torch.equal(p, finished["a"][n])]
    assert moved, "the restart did not train"
    for (n, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_saved_model_reloads_with_stock_class(name, tmp_path):
    member = MEMBERS[name]
    tok = tiny_tokenizer()
    config = ztrain.build_config(member, tok, vocab_size=128, **ztrain.tiny_overrides(member))
    model = ztrain.build_model(member, config, 0).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    # What the saved weights should be: bf16-rounded, routers of fp32_router members exact.
    keep = {id(p) for r in ztrain.routers(model) for p in r.parameters()} if member.fp32_router else set()
    want = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), want.parameters(), strict=True):
            if id(p) not in keep:
                q.copy_(p.bfloat16().float())
        want_logits = want(ids).logits
    ztrain.save_model(member, model, tok, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reloaded.set_experts_implementation(member.experts_implementation)
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want_logits, rtol=0, atol=0)
    if member.fp32_router:
        for r in ztrain.routers(reloaded):
            assert r.weight.dtype == torch.float32


def _check_tokens(member, tok, n: int) -> torch.Tensor:
    """The first ``n`` test tokens, documents joined by the member's separator (independent of evals.zoo)."""
    sep = tok.eos_token_id if member.doc_sep is None else tok.convert_tokens_to_ids(member.doc_sep)
    ids: list[int] = []
    with open(member.data_dir / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            ids += tok(json.loads(line)["text"])["input_ids"] + [sep]
            if len(ids) >= n:
                break
    return torch.tensor(ids[:n])


@pytest.mark.parametrize("name", [m.name for m in COMMITTED])
def test_committed_model_reproduces_its_cards_check_figure(name):
    member = MEMBERS[name]
    results = json.loads((member.model_dir / "training_results.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(member.model_dir, dtype=torch.float32)
    model.set_experts_implementation("eager")
    model.eval()
    assert model.config.model_type == member.family == results["model_type"]
    assert sum(p.numel() for p in model.parameters()) == results["params"]
    tok = AutoTokenizer.from_pretrained(member.model_dir)
    check = results["check"]
    seq = results["seq_len"]
    blocks = _check_tokens(member, tok, check["tokens"]).view(-1, seq).long()
    with torch.no_grad():
        losses = [float(model(b[None], labels=b[None]).loss) for b in blocks]
    assert math.exp(sum(losses) / len(losses)) == pytest.approx(check["ppl"], rel=1e-4)
    card = (member.model_dir / "README.md").read_text()
    assert f"| test | {results['test_ppl']:.2f} |" in card and f"python -m evals.zoo.train {name}" in card
    assert results["test_ppl"] < results["unigram_test_ppl"] / 3  # it learned more than unigrams


def _doc_hash(text: str) -> str:
    return hashlib.sha1(re.sub(r"\W+", " ", text.lower()).strip().encode()).hexdigest()


@pytest.mark.parametrize("name", [m.name for m in WITH_DATA])
def test_committed_splits_are_disjoint_documents(name):
    member = MEMBERS[name]
    corpus = CORPORA[member.corpus]
    rows = {
        s: zdata.read_jsonl(member.data_dir / f)
        for s, f in (("train", member.train_file), ("validation", "validation.jsonl"), ("test", "test.jsonl"))
    }
    ids = {s: {r["id"] for r in rs} for s, rs in rows.items()}
    texts = {s: {_doc_hash(r["text"]) for r in rs} for s, rs in rows.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not ids[a] & ids[b] and not texts[a] & texts[b], (a, b)
    for split, rs in rows.items():
        assert rs and all(zdata.split_of(r["id"], corpus.val_frac, corpus.test_frac) == split for r in rs)
        assert all(r["source"] in corpus.sources for r in rs)
    assert member.train_path.stat().st_size < 8e6, "keep the committed train text to a few MB"


def test_zoo_table_names_every_member_and_its_role():
    table = (ROOT / "evals" / "zoo" / "README.md").read_text()
    for m in MEMBERS.values():
        assert re.search(rf"\| `{m.name}` \| {m.role} \| `{m.family}` \|", table), m.name
    assert {m.name for m in MEMBERS.values() if m.role == "tuning"} == {"reference", "reference_sigmoid"}


@pytest.mark.parametrize("name", [m.name for m in COMMITTED])
def test_zeda_injects_the_committed_model_and_teacher_mode_is_bit_exact(name):
    """What the distillation runs on: zeda loads the member, grows every router by E/2 zero experts,
    and teacher mode reproduces the original logits exactly."""
    import zeda
    from zeda.zero.inject import teacher_mode

    member = MEMBERS[name]
    original = zeda.load(member.model_dir, experts_implementation="eager")
    injected = zeda.load(member.model_dir)
    report = zeda.inject_zero_experts(injected)
    spec = get_spec(member.family)
    e = spec.num_experts(original.config)
    assert (report.num_experts, report.num_zero_experts, report.top_k) == (
        e,
        e // 2,
        spec.top_k(original.config),
    )
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = original(ids).logits
        student = injected(ids).logits
        with teacher_mode(injected):
            teacher = injected(ids).logits
    assert torch.equal(teacher, ref)
    assert not torch.equal(student, ref)  # the zero experts are live outside teacher mode
