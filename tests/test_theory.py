import math
import random

import pytest

from speculative.metrics import summarize
from speculative.theory import (device_adjusted, f_async, f_async_paper, f_sync, f_sync_paper, g_token,
                                predicted_speedup)
from speculative.trace import Committed, Trace, Verification


@pytest.mark.parametrize("a, c, g, want_sync, want_async", [
    (0.5, 0.1, 6, 1.312, 1.808), (0.63, 0.1, 6, 1.689, 2.258), (0.6, 0.2, 3, 1.400, 1.773), (0.5, 0.1, 12, 0.952, 1.818),
])
def test_reference_fixtures(a, c, g, want_sync, want_async):
    assert f_sync_paper(a, c, g) == pytest.approx(want_sync, abs=1e-3)
    assert f_async_paper(a, c, g) == pytest.approx(want_async, abs=1e-3)


def test_async_branches_agree_at_one_over_c():
    a, c = 0.55, 0.25
    below = (1 - a ** 4) / ((1 - a) + c * (a - a ** 5 - 4 * (1 - a) * a ** 4))
    assert below == pytest.approx(1 / (c + (1 - c) * (1 - a)), rel=1e-9)
    assert f_async_paper(a, c, 4) == pytest.approx(below)


def test_sync_model_matches_a_monte_carlo_of_the_controllers_cycle():
    """As lr_sync runs a cycle: gamma draft steps one after another (c each), one batched target call (1), then
    commit the drafts up to the first rejection and the target's step there, or all gamma and t_gamma."""
    a, c, gamma = 0.6, 0.15, 4
    rng = random.Random(0)
    steps = cost = 0.0
    for _ in range(200_000):
        j = 0
        while j < gamma and rng.random() < a:
            j += 1
        steps += j + 1
        cost += gamma * c + 1
    assert steps / cost == pytest.approx(f_sync(a, c, gamma), rel=3e-3)
    # the paper's model counts gamma - 1 sequential drafts: at gamma 3, c 0.3 it predicts 19% more for lr_sync's
    # cycle shape than the controller's own
    assert f_sync_paper(0.6, 0.3, 3) / ((1 - 0.6 ** 3) / (0.4 * (1 + 0.3 * 3))) == pytest.approx(1.19, abs=0.01)


def test_async_model_of_the_pipelined_chain():
    """f_async is the controllers' schedule: without a stalled draft (gamma >= 1/c, or a verifier that does not
    wait for the target's step) every accepted step costs c and a rejected one 1: 1 / (1 - a + a c), the paper's
    bound; below 1/c the window stalls the draft: at a = 1, (1 + gamma) / (1 + c) steps per target step (d_k
    waits for d_{k-gamma}'s verdict, which comes one target step after d_{k-gamma-1})."""
    for a in (0.0, 0.3, 0.9):
        assert f_async(a, 0.25, 4) == pytest.approx(1 / (1 - a + a * 0.25), rel=1e-6)
        assert f_async(a, 0.25, 1, waits_for_target=False) == pytest.approx(1 / (1 - a + a * 0.25), rel=1e-6)
    for gamma in (1, 2, 3):
        assert f_async(1.0, 0.25, gamma) == pytest.approx((1 + gamma) / 1.25, rel=2e-3)
    assert f_async(0.9, 0.3, 2) < f_async(0.9, 0.3, 3) < f_async(0.9, 0.3, 4) == pytest.approx(1 / 0.37, rel=1e-6)
    assert f_async(0.6, 0.3, 2) != pytest.approx(f_async_paper(0.6, 0.3, 2), rel=0.05)  # another schedule
    with pytest.raises(ValueError, match="gamma"):
        f_async(0.5, 0.3, 0)


def test_token_sd_bounds_and_combination():
    assert g_token(0.0, 0.1, 4) == pytest.approx(1 / 1.4)
    assert g_token(0.8, 0.0, 1000) == pytest.approx(1 / (1 - 0.8), rel=1e-6)
    assert g_token(1.0, 0.0, 4) == 5
    assert predicted_speedup("lr_async+sd", 0.5, 0.1, 6, token_speedup=1.5) == pytest.approx(f_async(0.5, 0.1, 6) * 1.5)
    assert predicted_speedup("ar", 0.3, 0.1, 6) == 1.0
    assert math.isinf(f_async(1.0, 0.0, 3, waits_for_target=False))
    assert f_async(1.0, 0.0, 3) == pytest.approx(4.0, rel=2e-3)  # free drafts, but each verdict waits for t_k
    with pytest.raises(ValueError):
        f_sync(1.2, 0.1, 3)


def test_token_view_of_a_run_whose_accepted_steps_are_short():
    """Half the steps accepted, but they are the short ones: a fifth of the tokens came from the draft. The step
    model promises far more than the token model, which counts each token at its writer's measured pace."""
    from speculative.metrics import add_speedups

    draft = [Committed([1] * 5, "x", "draft", 0, 0, "stop", 0.0)] * 2
    target = [Committed([1] * 20, "x", "target", 0, 0, "stop", 2.4)] * 2  # 0.12 s per token; ar: 0.1
    trace = Trace("p", "lr_async", 10, steps=draft + target, draft_requests=4, draft_tokens=40, draft_step_s=2.0,
                  wall_s=6.0, verifications=[Verification(0, 0, a, 1.0) for a in (True, True, False, False)])
    ar = Trace("p", "ar", 10, steps=[Committed([1] * 50, "x", "target", 0, 0, "stop", 5.0)], wall_s=5.0)
    sums = {"ar": summarize([ar]), "lr_async": summarize([trace], gamma=4)}
    add_speedups(sums)
    s = sums["lr_async"]
    assert s["step_accept_rate"] == 0.5 and s["draft_token_share"] == pytest.approx(0.2)
    assert s["committed_draft_step_tokens"] == 5 and s["draft_token_s"] == pytest.approx(0.05)
    assert s["draft_bound_speedup"] == pytest.approx(2.0)  # the draft writes a token in half ar's time
    assert s["token_model_speedup"] == pytest.approx(1 / (0.2 * 0.5 + 0.8 * 1.2))
    assert s["token_model_speedup"] < s["predicted_speedup"]
    assert s["speedup"] == pytest.approx((50 / 6.0) / 10.0)  # below both: the rest of the wall is waiting
    assert sums["ar"].get("token_model_speedup") is None and sums["ar"]["draft_token_share"] == 0


def test_add_speedups_rescales_the_prediction_by_the_measured_target_step_cost():
    from speculative.metrics import add_speedups

    def steps(fixed_s, per_token_s, lengths):  # a trace's committed target steps on a noiseless latency line
        trace = Trace("p", "m", 10, steps=[Committed([1] * n, "x", "target", 0, 0, "stop", fixed_s + per_token_s * n)
                                           for n in lengths] + [Committed([1] * 50, "x", "draft", 0, 0, "stop", 9.0)])
        return summarize([trace])["committed_target_steps"]

    def row(tps, a=0.0, c=0.0, t_step=0.1, slow=1.0, lengths=(8, 16, 32, 48), base=(0.05, 0.01)):
        return {"tokens_per_s": tps, "step_accept_rate": a, "step_cost_ratio": c, "gamma": 4, "target_step_s": t_step,
                "committed_target_steps": steps(base[0] * slow, base[1] * slow, lengths)}

    sums = {"ar": row(10.0), "sd": row(15.0, t_step=0.07, base=(0.05, 0.007)),
            # its committed target steps take 1.25x what ar's line gives for the same lengths; they are short,
            # so its mean request latency is below ar's and would show no slowdown
            "lr_async": row(9.0, a=0.5, c=0.25, t_step=0.09, slow=1.25, lengths=(4, 8, 8, 12)),
            "lr_async+sd": row(12.0, a=0.5, c=0.25, t_step=0.07, base=(0.05, 0.007)),  # as fast as sd's
            "lr_sync": row(8.0, a=0.0, c=0.25, t_step=0.2, slow=2.0)}
    assert sums["ar"]["committed_target_steps"]["fixed_s"] == pytest.approx(0.05)  # draft steps do not count
    assert sums["ar"]["committed_target_steps"]["per_token_s"] == pytest.approx(0.01)
    add_speedups(sums)
    ideal = f_async(0.5, 0.25, 4)  # gamma >= 1/c: 1 / (0.25 + 0.75 * 0.5)
    assert ideal == pytest.approx(1.6)
    s = sums["lr_async"]
    assert s["speedup"] == pytest.approx(0.9)
    assert s["predicted_speedup_ideal"] == pytest.approx(ideal)
    assert s["target_step_slowdown"] == pytest.approx(1.25)
    assert s["predicted_speedup"] == pytest.approx(ideal / 1.25)
    t = sums["lr_async+sd"]  # token-level SD multiplies; its steps are compared with sd's own
    assert t["target_step_slowdown"] == pytest.approx(1.0)
    assert t["predicted_speedup"] == pytest.approx(ideal * 1.5)
    u = sums["lr_sync"]  # a = 0: 1 / (1 + c * gamma) = 1 / 2 (gamma 4), and its batched pass costs 2 ar steps
    assert u["predicted_speedup"] == pytest.approx(1 / 2.0 / 2.0)
    assert sums["ar"]["predicted_speedup"] == 1.0 and sums["sd"]["predicted_speedup"] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        device_adjusted(1.0, 0.0)
    # the draft's cost is counted in the same unit: the mean committed target step (1.0 s here), not the mean
    # target request (0.2 s: short speculative steps that finished and were never used)
    trace = Trace("p", "fpsr", 10, target_requests=4, target_step_s=0.8, draft_requests=2, draft_step_s=1.0,
                  steps=[Committed([1] * 20, "x", "target", 0, 0, "stop", 1.0)] * 2)
    assert summarize([trace])["step_cost_ratio"] == pytest.approx(0.5)
    old = {"ar": row(10.0, lengths=()), "lr_async": row(9.0, a=0.5, c=0.25, t_step=0.125, lengths=())}
    add_speedups(old)  # traces without call records: the mean request latency is the unit
    assert old["lr_async"]["target_step_slowdown"] == pytest.approx(1.25)
