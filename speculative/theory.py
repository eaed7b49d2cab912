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


def chain_times(c: float, gamma: int, n: int, waits_for_target: bool = True) -> tuple[list[float], list[float]]:
    """The schedule of a chain (`lr_async` at width 1, `fpsr`) that starts at time 0, in target steps, for k = 0..n:
    V_k, when draft step d_k's verdict comes (with every earlier draft accepted, d_k is committed then), and E_k,
    when the fallback t_k is committed if d_k is rejected.

    d_k starts when d_{k-1} ends and fewer than gamma drafts wait for a verdict (d_{k-gamma} judged) and takes c;
    t_k (the target's step from the prefix before d_k) starts when d_{k-1} ends and takes 1; d_k's verdict comes
    when d_k ends, and also not before t_k ends for a verifier that compares the two (`waits_for_target`); the
    fallback t_k is committed when both its verdict and t_k are in. Verification itself is free."""
    verdict, ends, draft_end = [], [], []
    for k in range(n + 1):
        launched = draft_end[k - 1] if k else 0.0  # t_k
        start = max(launched, verdict[k - gamma] if k >= gamma else 0.0)
        draft_end.append(start + c)
        verdict.append(max(draft_end[k], launched + 1) if waits_for_target else draft_end[k])
        ends.append(max(verdict[k], launched + 1))
    return verdict, ends


def f_async(a: float, c: float, gamma: int, waits_for_target: bool = True) -> float:
    """The step methods that pipeline the chain (`lr_async` at width 1, `fpsr`), as the controllers run them:
    expected steps over expected time of a chain, a renewal from one rejection to the next. A chain with k
    drafts accepted commits k + 1 steps (the drafts and the fallback t_k) at time E_k (`chain_times`), so
    the speedup is (1 / (1 - a)) / sum_k a^k (1 - a) E_k. When drafting never waits for the window (gamma >= 1/c,
    or a verifier that does not wait for the target's step) this is 1 / (1 - a + a c), the paper's bound; below
    that the window stalls the draft (at a = 1: (1 + gamma) / (1 + c) steps per target step for a verifier that
    waits). The paper's own closed form is `f_async_paper`."""
    _check(a, c)
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if c == 0 and not waits_for_target:  # free drafts, judged at once: only rejections cost
        return math.inf if a == 1 else 1 / (1 - a)
    n = 4000
    ends = chain_times(c, gamma, n, waits_for_target)[1]
    pace = (ends[n] - ends[n // 2]) / (n - n // 2)  # time per accepted step once the chain is long
    if a == 1:
        return 1 / pace if pace > 0 else math.inf
    time = sum(a ** k * (1 - a) * e for k, e in enumerate(ends))
    time += a ** (n + 1) * (ends[n] + pace / (1 - a))  # the chains longer than n, continued at that pace
    return (1 / (1 - a)) / time


def f_async_paper(a: float, c: float, gamma: int) -> float:
    """The Lookahead Reasoning paper's asynchronous model. With gamma >= ceil(1/c) drafting never stalls the
    target: 1 / (c + (1 - c)(1 - a)); otherwise (1 - a^g) / ((1 - a) + c (a - a^(g+1) - g (1 - a) a^g)). The two
    agree at g = 1/c. Below 1/c it describes another schedule than the controllers' (at a = 1 it gives gamma
    where the controllers reach (1 + gamma) / (1 + c)); `f_async` is theirs."""
    _check(a, c)
    if c > 0 and gamma >= math.ceil(1 / c):
        return 1 / (c + (1 - c) * (1 - a))
    if a == 1:
        return 1 / c if c > 0 else math.inf
    return (1 - a ** gamma) / ((1 - a) + c * (a - a ** (gamma + 1) - gamma * (1 - a) * a ** gamma))


def predicted_speedup(method: str, step_accept_rate: float, step_cost_ratio: float, gamma: int,
                      token_speedup: float = 1.0, waits_for_target: bool = True) -> float:
    """The speedup a method should reach at its measured rates; token-level SD inside steps multiplies.
    `waits_for_target`: the verifier compares a draft step with the target's (lr_async, fpsr)."""
    base = method.split("+")[0]
    if base in ("ar", "sd"):
        f = 1.0
    elif base in ("lr_sync",):
        f = f_sync(step_accept_rate, step_cost_ratio, gamma)
    elif base in ("lr_async", "fpsr"):
        f = f_async(step_accept_rate, step_cost_ratio, gamma, waits_for_target)
    else:
        raise ValueError(f"no speedup model for method {method!r}")
    return f * (token_speedup if ("+sd" in method or base == "sd") else 1.0)


def device_adjusted(speedup: float, target_step_slowdown: float) -> float:
    """A predicted speedup when the method's target steps take `target_step_slowdown` times as long as the
    baseline's (measured: the draft and concurrent requests share the device, a batched pass is not free)."""
    if target_step_slowdown <= 0:
        raise ValueError(f"target step slowdown must be > 0, got {target_step_slowdown}")
    return speedup / target_step_slowdown
