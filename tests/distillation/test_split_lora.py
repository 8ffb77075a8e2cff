"""Split LoRA: PEFT's adapters on fused experts applied per expert, never as a merged weight.

Against PEFT's own merged forward (``lora.split=false``) on every family: the same logits and
the same gradients of every trained tensor (LoRA A/B, router copies) in fp32, on both zeda
backends, with zero slots in the batch. The PEFT internals the split relies on are tested here
too (`zeda.distillation.split_lora` names them).
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, token_batch
from peft.tuners.lora.layer import ParamWrapper
from torch.nn.utils import parametrize

import zeda
from zeda.config import RunConfig, apply_overrides
from zeda.distillation.split_lora import SplitLoraParamWrapper, enable_split_lora
from zeda.distillation.student import build_student
from zeda.tiny import tiny_model
from zeda.zero.experts import splits_lora


def _student(family: str, backend: str = "zeda", **overrides: str):
    model = tiny_model(family)
    zeda.inject_zero_experts(model, experts_implementation=backend)
    cfg = apply_overrides(RunConfig(), [f"{k}={v}" for k, v in overrides.items()])
    student = build_student(model, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # LoRA B starts at 0: give the adapters something to do
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return student.train()


def _forward_backward(student, ids):
    student.zero_grad()
    with zeda.RouterTelemetry(student) as tel:
        out = student(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads, tel.zero_share


def _experts_modules(student):
    return [m for m in student.modules() if type(m) in (ParamWrapper, SplitLoraParamWrapper)]


@pytest.mark.parametrize("backend", ["zeda", "zeda_grouped"])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_peft_merged_forward_and_gradients(family, backend):
    student = _student(family, backend)
    ids = token_batch(3, 16)
    wrappers = _experts_modules(student)
    assert wrappers and all(type(w) is SplitLoraParamWrapper for w in wrappers)

    seen = []

    def check(module, args):  # inside the split forward: deltas attached, nothing parametrised
        seen.append((parametrize.is_parametrized(module), sorted(module.zeda_lora_deltas)))

    experts = {id(w.get_base_layer()): w.get_base_layer() for w in wrappers}.values()
    handles = [m.register_forward_pre_hook(check) for m in experts]
    logits, grads, share = _forward_backward(student, ids)
    for h in handles:
        h.remove()
    names = sorted(zeda.get_spec(family).lora_target_parameters)
    assert seen and all(s == (False, names) for s in seen)
    assert share > 0  # zero slots are in the batch (and skipped)

    enable_split_lora(student, False)  # PEFT's own forward: W + s*B@A, merged per layer
    ref_logits, ref_grads, ref_share = _forward_backward(student, ids)
    assert share == ref_share
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    assert any("modules_to_save" in n for n in grads)
    for n in grads:
        scale = ref_grads[n].abs().max().clamp_min(1e-6)
        assert (grads[n] - ref_grads[n]).abs().max() <= 1e-4 * scale, n
        assert ref_grads[n].abs().max() > 0, n  # every trained tensor gets a gradient


def test_peft_internals_the_split_relies_on():
    """The one PEFT assumption (`lora_delta_context`): ``ParamWrapper.forward`` applies its
    active adapters inside ``_activate_lora`` (skipped when adapters are disabled or merged), and
    ``get_delta_factors`` gives ``scaling * lhs @ rhs`` equal to the adapter's delta."""
    student = _student("qwen3_moe")
    wrappers = _experts_modules(student)
    for w in wrappers:
        lhs, rhs, scaling = w.get_delta_factors("default")
        torch.testing.assert_close(scaling * lhs @ rhs, w.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        assert lhs.shape[0] == rhs.shape[0] == w.num_experts > 1
    calls = []
    original = SplitLoraParamWrapper._activate_lora

    def spy(self, adapters):
        calls.append(list(adapters))
        return original(self, adapters)

    ids = token_batch(1, 8)
    SplitLoraParamWrapper._activate_lora = spy
    try:
        with torch.no_grad():
            student(input_ids=ids)
            assert calls == [["default"]] * len(wrappers)
            calls.clear()
            with zeda.teacher_mode(student):  # adapters off: PEFT calls the base layer directly
                student(input_ids=ids)
            assert calls == []
    finally:
        SplitLoraParamWrapper._activate_lora = original


def test_stock_backend_falls_back_to_peft_merged_path():
    split = _student("mixtral", "zeda")
    stock = _student("mixtral", "eager")  # the same weights: same seeds, same init
    assert splits_lora(split.get_base_model().model.layers[0].mlp.experts.get_base_layer())
    assert not splits_lora(stock.get_base_model().model.layers[0].mlp.experts.get_base_layer())
    ids = token_batch(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(split(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_merged_export_equals_the_split_student():
    student = _student("qwen3_moe")
    ids = token_batch(2, 12)
    with torch.no_grad():
        split = student.eval()(input_ids=ids).logits
        merged = student.merge_and_unload()  # PEFT merges at export, as always
        torch.testing.assert_close(merged(input_ids=ids).logits, split, rtol=1e-5, atol=1e-5)
