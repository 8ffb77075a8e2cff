"""ZEDA-reference checkpoints (TsinghuaC3I/ZEDA's ``...PlusPlusForCausalLM``) in and out.

The tiny reference checkpoints are written the way their ``scripts/convert-hf-to-ZCE.py`` and
README do it: an original checkpoint whose ``mlp.gate`` tensors grow to E + Z rows (Gaussian
rows from the old rows' statistics), with ``architectures``, ``zce_nums``, ``zce_types`` and
``use_zce_mask`` added to ``config.json``. Their MoE blocks are re-implemented below from their
modeling files to pin the routing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import token_batch
from safetensors.torch import load_file, save_file

import zeda
from zeda.io import load
from zeda.tiny import tiny_model
from zeda.zero.reference_format import MASK_BIAS

ARCH = {"qwen3_moe": "Qwen3MoePlusPlusForCausalLM", "glm4_moe_lite": "Glm4MoeLitePlusPlusForCausalLM"}
Z = 4


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _write_reference(
    family: str, out: Path, use_zce_mask: bool = False, zce_types=("zero",)
) -> torch.nn.Module:
    """Their conversion applied to a tiny original; returns the original model."""
    original = tiny_model(family)
    original.save_pretrained(out)
    e = original.config.num_local_experts
    g = torch.Generator().manual_seed(11)
    tensors = _weights(out)
    for key, old in list(tensors.items()):
        if key.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            new = torch.randn((e + Z, *old.shape[1:]), generator=g, dtype=old.dtype) * old.std(0) + old.mean(
                0
            )
            new[:e] = old
            tensors[key] = new
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(
        architectures=[ARCH[family]],
        zce_nums=[Z],
        zce_types=list(zce_types),
        use_zce_mask=use_zce_mask,
    )
    (out / "config.json").write_text(json.dumps(cfg))
    return original


def _their_block(family: str, block: torch.nn.Module, h: torch.Tensor, use_zce_mask: bool) -> torch.Tensor:
    """Their Qwen3MoePlusPlusSparseMoeBlock / Glm4MoeLitePlusPlusMoE forward, on zeda's tensors."""
    router, experts = block.gate, block.experts
    e, k = router.num_experts, router.top_k
    if family == "qwen3_moe":
        logits = F.linear(h, router.weight)
        if use_zce_mask:
            logits[:, e:] = float("-inf")
        w, idx = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), k, dim=-1)
        if router.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(h.dtype)
    else:
        logits = F.linear(h.float(), router.weight.float())
        if use_zce_mask:
            logits[:, e:] = float("-inf")
        scores = logits.sigmoid()
        idx = torch.topk(scores + router.e_score_correction_bias, k, dim=-1, sorted=False)[1]  # n_group = 1
        w = scores.gather(1, idx)
        if router.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * router.routed_scaling_factor
    out = torch.zeros_like(h)
    inter = experts.gate_up_proj.shape[1] // 2
    for t in range(h.shape[0]):
        for j, i in enumerate(idx[t].tolist()):
            if i < e:  # zero experts output zeros
                gate_up = experts.gate_up_proj[i] @ h[t]
                y = experts.down_proj[i] @ (F.silu(gate_up[:inter]) * gate_up[inter:])
                out[t] += w[t, j] * y
    if family == "glm4_moe_lite":
        out = out + block.shared_experts(h)
    return out


@pytest.mark.parametrize("family", sorted(ARCH))
def test_reference_checkpoint_loads_as_the_same_zeda_model(family: str, tmp_path: Path) -> None:
    original = _write_reference(family, tmp_path / "ref")
    model = load(tmp_path / "ref", attn_implementation="eager")
    assert type(model).__name__ == f"Zeda{type(original).__name__}"
    assert model.config.zeda["num_zero_experts"] == Z and "zero_logit_bias" not in model.config.zeda

    # The same model built in zeda's format: the original, injected, with the grown router rows.
    same = tiny_model(family)
    zeda.inject_zero_experts(same, Z)
    tensors = _weights(tmp_path / "ref")
    for layer in zeda.find_moe_layers(same):
        with torch.no_grad():
            prefix = f"model.layers.{layer.index}.mlp.gate."
            layer.router.weight.copy_(tensors[prefix + "weight"])
            if family == "glm4_moe_lite":
                layer.router.e_score_correction_bias.copy_(tensors[prefix + "e_score_correction_bias"])
    ids = token_batch(2, 16)
    with torch.no_grad():
        got = model(ids).logits
        assert torch.equal(got, same(ids).logits)
        assert not torch.equal(got, original(ids).logits)

    # Their MoE block math on every MoE layer.
    h = torch.randn(24, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer in zeda.find_moe_layers(model):
        with torch.no_grad():
            zeda_out = layer.block(h[None])[0]
            torch.testing.assert_close(
                zeda_out, _their_block(family, layer.block, h, False), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("family", sorted(ARCH))
def test_masked_reference_checkpoint_is_the_original(family: str, tmp_path: Path) -> None:
    original = _write_reference(family, tmp_path / "ref", use_zce_mask=True)
    model = load(tmp_path / "ref", attn_implementation="eager")
    assert model.config.zeda["zero_logit_bias"] == MASK_BIAS
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-6, atol=1e-6)
    h = torch.randn(24, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    layer = zeda.find_moe_layers(model)[0]
    with torch.no_grad():
        torch.testing.assert_close(layer.block(h[None])[0], _their_block(family, layer.block, h, True))


@pytest.mark.parametrize("family", sorted(ARCH))
@pytest.mark.parametrize("use_zce_mask", [False, True])
def test_export_writes_the_reference_format_back(family: str, use_zce_mask: bool, tmp_path: Path) -> None:
    _write_reference(family, tmp_path / "ref", use_zce_mask=use_zce_mask)
    model = load(tmp_path / "ref", attn_implementation="eager")
    zeda.export(model, tmp_path / "out", format="zeda-reference")
    cfg_in = json.loads((tmp_path / "ref" / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("architectures", "zce_nums", "zce_types", "use_zce_mask", "model_type", "hidden_size"):
        assert cfg_out[key] == cfg_in[key], key
    assert "zeda" not in cfg_out
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # And zeda's own format from the reference, reloaded through AutoModelForCausalLM.
    zeda.export(model, tmp_path / "zeda_fmt")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "zeda_fmt", attn_implementation="eager")
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_unsupported_reference_inputs_and_exports_refuse(tmp_path: Path) -> None:
    _write_reference("qwen3_moe", tmp_path / "copy", zce_types=("copy",))
    before = (tmp_path / "copy" / "config.json").read_bytes()
    with pytest.raises(zeda.ZedaError, match="only 'zero'") as err:
        load(tmp_path / "copy")
    assert "\n" not in str(err.value) and (tmp_path / "copy" / "config.json").read_bytes() == before
    mixtral = tiny_model("mixtral")
    zeda.inject_zero_experts(mixtral)
    with pytest.raises(zeda.ZedaError, match="not mixtral"):
        zeda.export(mixtral, tmp_path / "m", format="zeda-reference")
    qwen = tiny_model("qwen3_moe")
    zeda.inject_zero_experts(qwen)
    with (
        zeda.router_settings(qwen, zero_logit_bias=0.5),
        pytest.raises(zeda.ZedaError, match="no equivalent"),
    ):
        zeda.export(qwen, tmp_path / "q", format="zeda-reference")
    with pytest.raises(zeda.ZedaError, match="unknown export format"):
        zeda.export(qwen, tmp_path / "q", format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
