"""The vLLM plugin's family table against zeda's family specs (no vLLM needed).

``zeda_vllm`` imports nothing from ``zeda`` (the vLLM environment pins its own transformers), so it
names each served family's routing kind itself; this keeps that table equal to zeda's specs, and
every served family's MoE layers stated once, in `zeda_routing.MOE_LAYERS`.
"""

from __future__ import annotations

import pytest

import zeda
from zeda.zero.modeling import zeda_classes
from zeda_routing import KINDS, MOE_LAYERS
from zeda_routing.reference import ARCHITECTURES
from zeda_vllm.config import FAMILIES, REFERENCE_ARCHITECTURES, SUPPORTED_FAMILIES, UNSUPPORTED_FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_served_family_routes_with_zedas_kind(family: str) -> None:
    spec = zeda.get_spec(family)
    assert FAMILIES[family].router_kind == spec.router_kind
    assert FAMILIES[family].group_top == spec.router_attrs.get("group_top", 2)
    assert FAMILIES[family].router_kind in KINDS
    assert family in MOE_LAYERS
    # the architecture zeda's exports name is the one the plugin registers
    assert SUPPORTED_FAMILIES[family] == zeda_classes(family)[1].__name__


def test_every_zeda_family_is_served_or_refused() -> None:
    assert set(SUPPORTED_FAMILIES) | set(UNSUPPORTED_FAMILIES) == set(MOE_LAYERS)
    assert not set(SUPPORTED_FAMILIES) & set(UNSUPPORTED_FAMILIES)


def test_reference_architectures_are_served_when_their_family_is() -> None:
    assert set(REFERENCE_ARCHITECTURES) == {a for a, f in ARCHITECTURES.items() if f in SUPPORTED_FAMILIES}
