"""The share solve: find the knob value at which a measured skipped share hits a target.

One solver serves every calibration: the zero-logit bias of an injected model (an unbounded
knob: bracket outward from 0, then regula falsi), the training-free rules' values (a knob in
[0, 1] whose end points' shares are known without a forward: bisection, robust to the flat
steps a rule's share has), and the distillation start (which calibrates the bias).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["ShareSolution", "solve_share"]


class ShareSolution(NamedTuple):
    """The outcome of `solve_share`.

    Attributes:
        value: The knob value whose measured share is closest to the target.
        share: The share measured at ``value``.
        calls: Measurements made (each is a pass over the calibration data).
    """

    value: float
    share: float
    calls: int


def solve_share(
    measure: Callable[[float], float],
    target: float,
    *,
    tol: float,
    max_iter: int,
    ends: tuple[float, float] | None = None,
    increasing: bool = True,
) -> ShareSolution:
    """Solve ``measure(value) = target`` for a monotone ``measure``.

    Args:
        measure: Knob value -> measured skipped share (monotone in the value).
        target: The share to reach.
        tol: Stop once a measured share is within ``tol`` of the target.
        max_iter: Measurements at most (the bracketing steps of an unbounded knob included).
        ends: For a knob bounded to [0, 1]: the shares at 0 and at 1, known without measuring.
            None: an unbounded non-decreasing knob (the zero-logit bias).
        increasing: For a bounded knob, whether the share rises with the value (0 is then the
            end that skips least).

    Returns:
        The closest value found, its share and the measurements used. An end point of a
        bounded knob that wins is measured rather than trusted.
    """
    if ends is None:
        return _regula_falsi(measure, target, tol, max_iter)
    return _bisect(measure, target, tol, max_iter, ends, increasing)


def _regula_falsi(
    measure: Callable[[float], float], target: float, tol: float, max_iter: int
) -> ShareSolution:
    """Bracket the root from 0 outwards (doubling steps), then narrow it by regula falsi with the
    Illinois modification: the share is smooth in the bias over many tokens, so this needs far
    fewer measurements than bisection."""
    calls = 0
    best = (0.0, math.inf)

    def f(b: float) -> float:
        nonlocal calls, best
        calls += 1
        s = measure(b)
        if abs(s - target) < abs(best[1] - target):
            best = (b, s)
        return s - target

    f0 = f(0.0)
    step = 2.0 if f0 < 0 else -2.0
    a, fa = 0.0, f0
    b, fb = step, f(step)
    while (fb < 0) == (f0 < 0) and abs(b) < 1e3 and fb != 0:  # expand until the sign changes
        a, fa = b, fb
        step *= 2
        b, fb = b + step, f(b + step)
    if a > b:
        a, fa, b, fb = b, fb, a, fa
    side = 0
    while calls < max_iter and abs(best[1] - target) > tol and fb != fa:
        c = (a * fb - b * fa) / (fb - fa)
        fc = f(c)
        if fc < 0:
            a, fa = c, fc
            if side == -1:
                fb /= 2
            side = -1
        else:
            b, fb = c, fc
            if side == 1:
                fa /= 2
            side = 1
    return ShareSolution(best[0], best[1], calls)


def _bisect(
    measure: Callable[[float], float],
    target: float,
    tol: float,
    max_iter: int,
    ends: tuple[float, float],
    increasing: bool,
) -> ShareSolution:
    lo, hi = 0.0, 1.0
    least = 0 if increasing else 1  # ties go to the end that skips least
    cands = [(float(least), ends[least]), (float(1 - least), ends[1 - least])]
    calls = 0
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        s = measure(mid)
        calls += 1
        cands.append((mid, s))
        if abs(s - target) <= tol:
            break
        if (s < target) == increasing:
            lo = mid
        else:
            hi = mid
    value, share = min(cands, key=lambda c: abs(c[1] - target))
    if calls == 0 or value in (0.0, 1.0):
        share = measure(value)
        calls += 1
    return ShareSolution(value, share, calls)
