"""Speedup models (Lookahead Reasoning, arXiv 2506.19830): predicted speedups from measured rates.

a: acceptance rate (step-level: a draft step is accepted; token-level: a draft token is accepted),
c: draft cost / target cost for one step (or one token), gamma: lookahead depth, k: tokens per SD pass.

The models count time in target steps and assume a target step costs the same in every method (draft and target
on separate devices, a batched pass as cheap as one step). `device_adjusted` rescales a prediction by the
measured cost of the method's own target steps, for draft and target sharing a device.
"""

from __future__ import annotations

import math


def _check(a: float, c: float) -> None:
    if not 0 <= a <= 1:
        raise ValueError(f"acceptance rate must be in [0, 1], got {a}")
    if c < 0:
        raise ValueError(f"cost ratio must be >= 0, got {c}")


def g_token(a: float, c: float, k: int) -> float:
    """Token-level SD: expected tokens per pass over the cost of k draft tokens + one target pass."""
    _check(a, c)
    tokens = k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (1 + c * k)


def f_sync(a: float, c: float, gamma: int) -> float:
    """Synchronous LR as `lr_sync` runs it (Algorithm 1): gamma draft steps one after another (cost gamma c), then
    one batched target call (cost 1) for t_0..t_gamma; it commits the accepted drafts and the target's step at the
    first rejection, or all gamma drafts and t_gamma: 1 to gamma + 1 steps a cycle.
    (1 - a^(g+1)) / ((1 - a)(1 + c g))."""
    _check(a, c)
    steps = gamma + 1 if a == 1 else (1 - a ** (gamma + 1)) / (1 - a)
    return steps / (1 + c * gamma)


def f_sync_paper(a: float, c: float, gamma: int) -> float:
    """The Lookahead Reasoning paper's synchronous model: (1 - a^g) / ((1 - a)(1 - c + c g)) (its fixtures are in
    tests/test_theory.py); it counts gamma - 1 sequential drafts a cycle, where `lr_sync` drafts gamma."""
    _check(a, c)
    steps = gamma if a == 1 else (1 - a ** gamma) / (1 - a)
    return steps / (1 - c + c * gamma)


def f_async(a: float, c: float, gamma: int) -> float:
    """Asynchronous LR. With gamma >= ceil(1/c) drafting never stalls the target: 1 / (c + (1 - c)(1 - a));
    otherwise (1 - a^g) / ((1 - a) + c (a - a^(g+1) - g (1 - a) a^g)). The two agree at g = 1/c."""
    _check(a, c)
    if c > 0 and gamma >= math.ceil(1 / c):
        return 1 / (c + (1 - c) * (1 - a))
    if a == 1:
        return 1 / c if c > 0 else math.inf
    return (1 - a ** gamma) / ((1 - a) + c * (a - a ** (gamma + 1) - gamma * (1 - a) * a ** gamma))


def predicted_speedup(method: str, step_accept_rate: float, step_cost_ratio: float, gamma: int,
                      token_speedup: float = 1.0) -> float:
    """The speedup a method should reach at its measured rates; token-level SD inside steps multiplies."""
    base = method.split("+")[0]
    if base in ("ar", "sd"):
        f = 1.0
    elif base in ("lr_sync",):
        f = f_sync(step_accept_rate, step_cost_ratio, gamma)
    elif base in ("lr_async", "fpsr"):
        f = f_async(step_accept_rate, step_cost_ratio, gamma)
    else:
        raise ValueError(f"no speedup model for method {method!r}")
    return f * (token_speedup if ("+sd" in method or base == "sd") else 1.0)


def device_adjusted(speedup: float, target_step_slowdown: float) -> float:
    """A predicted speedup when the method's target steps take `target_step_slowdown` times as long as the
    baseline's (measured: the draft and concurrent requests share the device, a batched pass is not free)."""
    if target_step_slowdown <= 0:
        raise ValueError(f"target step slowdown must be > 0, got {target_step_slowdown}")
    return speedup / target_step_slowdown
