"""Independent instruments for the rehearsal suite: plain forward hooks, a tensor-size recorder
and a peak-RSS reader. Nothing here uses zeda's own counters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from zeda.zero.routing import zero_routers

ASSETS = Path(__file__).parents[1] / "assets"
REPO = Path(__file__).parents[2]
CONFIGS = REPO / "zeda" / "configs"


def real_config(name: str, **small: object) -> dict:
    """A built-in real config (``zeda/configs/<name>.json``) with the given fields made small."""
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg.pop("_source", None)
    cfg.update(small)
    return cfg


@dataclass
class Forward:
    """One call of the student's decoder, with what its zero-routing routers chose.

    Attributes:
        phase: The test's label when the forward ran ("distill", "eval", ...).
        grad: Whether autograd was recording (the student's training forwards).
        ids: ``(B, T)`` the token ids it received.
        mask: ``(B, T)`` the matching slice of its attention mask (all ones when none).
        zero: Selected slots that went to zero experts (real tokens only, all layers).
        slots: Selected slots (real tokens only, all layers).
        routed: Whether any router ran with zero experts on.
    """

    phase: str
    grad: bool
    ids: torch.Tensor
    mask: torch.Tensor
    zero: int = 0
    slots: int = 0
    routed: bool = False

    def rows(self) -> list[tuple[int, ...]]:
        """Each row's real (unpadded) tokens."""
        return [tuple(r[m.bool()].tolist()) for r, m in zip(self.ids, self.mask, strict=True)]


@dataclass
class RouterProbe:
    """Forward hooks on the student's decoder and on every zeda router.

    The decoder pre-hook records the tokens and attention mask of each call; the router hooks
    count, from the routers' returned indices, how many selected slots of real tokens went to
    zero experts (index >= E). Teacher-mode forwards (zero experts off) are marked not routed.
    """

    model: nn.Module
    phase: str = "setup"
    forwards: list[Forward] = field(default_factory=list)

    def __post_init__(self) -> None:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._handles = [base.model.register_forward_pre_hook(self._decoder, with_kwargs=True)]
        self._handles += [r.register_forward_hook(self._router) for r in zero_routers(self.model)]

    def _decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask[:, -ids.shape[1] :]
        self.forwards.append(Forward(self.phase, torch.is_grad_enabled(), ids.detach().clone(), mask.clone()))

    def _router(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if not module.routes_to_zero:
            return
        cur = self.forwards[-1]
        idx = output[2].reshape(cur.mask.numel(), -1)[cur.mask.reshape(-1).bool()]
        cur.zero += int((idx >= module.num_experts).sum())
        cur.slots += idx.numel()
        cur.routed = True

    def select(self, phase: str, grad: bool | None = None) -> list[Forward]:
        """Routed forwards of ``phase`` (optionally only with / without autograd)."""
        return [
            f for f in self.forwards if f.phase == phase and f.routed and (grad is None or f.grad == grad)
        ]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def share(forwards: list[Forward]) -> float:
    """Pooled zero share of the slots of ``forwards``."""
    return sum(f.zero for f in forwards) / sum(f.slots for f in forwards)


class LargestTensor(TorchDispatchMode):
    """Records the largest floating-point tensor any op produces while active (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                n = t.numel() * t.element_size()
                if n > self.largest:
                    self.largest, self.shape = n, tuple(t.shape)
        return out


def reset_peak_rss() -> int:
    """Reset this process's peak-RSS counter (Linux); returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_rss() -> int:
    """Peak RSS in bytes since the last `reset_peak_rss`."""
    return _status("VmHWM")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")
