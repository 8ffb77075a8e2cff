"""`zeda.evaluation.head`: the output head's share of a token's FLOPs."""

from __future__ import annotations

import pytest

from zeda.evaluation.flops import flop_report
from zeda.evaluation.head import lm_head_ratio


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v3", "gpt-oss-20b"])
def test_lm_head_ratio_is_the_heads_flops_over_the_rest(name):
    native = flop_report(name, context_len=64).native_flops_by_component
    rest = sum(v for k, v in native.items() if k != "lm_head")
    assert lm_head_ratio(name, context_len=64) == pytest.approx(native["lm_head"] / rest)
    assert 0 < lm_head_ratio(name, context_len=64) < 0.25  # real checkpoints: the head is a small part
