"""Controllers over real tiny engines (in-process hosts) and over scripted hosts."""

import asyncio

import pytest

from actors import zoo
from actors.engine import Counters, Engine, Result, Speculation
from actors.hosts import EngineHost
from rewards.verifiers import Always, Exact, RandomAccept, Verdict, Verifier
from speculative.clients import HostClient
from speculative.controllers import Controller, ControllerError, Settings
from speculative.metrics import summarize
from tests.test_engine import PROMPT

STEP_METHODS = ["lr_sync", "lr_async", "fpsr"]


@pytest.fixture(scope="module")
def hosts():
    target, tok = zoo.load_model("tiny-llama", device="cpu")
    draft, _ = zoo.load_model("tiny-llama-draft-l1", device="cpu")

    def host(model, drafter=None):
        return HostClient(EngineHost.from_engine(Engine(model, tok, draft_model=drafter)))

    return {"target": host(target, draft), "draft": host(draft), "same": host(target), "tok": tok}


def run(ctl, prompt=PROMPT):
    return asyncio.run(ctl.run("p0", "question", prompt))


def settings(method, **kw):
    base = dict(method=method, gamma=3, max_new_tokens=40, step_max_tokens=6, delimiter="\n\n",
                token_speculation=Speculation("draft", 3))
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def ar_tokens(hosts):
    return run(Controller(settings("ar"), hosts["target"])).token_ids


@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("sd", [False, True])
@pytest.mark.parametrize("method", STEP_METHODS)
@pytest.mark.parametrize("drafter", ["draft", "same"])
def test_exact_verifier_is_lossless(hosts, ar_tokens, method, sd, gamma, drafter):
    ctl = Controller(settings(method + ("+sd" if sd else ""), gamma=gamma), hosts["target"], hosts[drafter],
                     Exact("tokens"))
    trace = run(ctl)
    assert trace.token_ids == ar_tokens
    accepted = sum(v.accepted for v in trace.verifications)
    if drafter == "same":  # a draft identical to the target: every completed draft step passes
        assert accepted > 0 and any(s.origin == "draft" for s in trace.steps)
        assert all(v.accepted for v in trace.verifications if v.reason != "cut")
    assert sum(s.origin == "draft" for s in trace.steps) <= accepted
    if sd:
        assert trace.token_drafted > 0


@pytest.mark.parametrize("method", STEP_METHODS)
def test_always_accept_is_draft_only_and_never_accept_is_ar(hosts, ar_tokens, method):
    """lr_async and fpsr: always-accept is draft-only decoding. lr_sync follows Algorithm 1: every cycle commits its
    gamma drafts and then the target's step t_gamma."""
    draft_only = run(Controller(settings("ar"), hosts["draft"])).token_ids
    always = run(Controller(settings(method, cut_drafts="verify"), hosts["target"], hosts["draft"], Always()))
    if method == "lr_sync":
        origins = [s.origin for s in always.steps]
        assert len(origins) >= 4 and origins == ["target" if i % 4 == 3 else "draft" for i in range(len(origins))]
        assert always.token_ids[:len(always.steps[0].token_ids)] == draft_only[:len(always.steps[0].token_ids)]
    else:
        assert always.token_ids == draft_only
        assert all(s.origin == "draft" for s in always.steps)
    never = run(Controller(settings(method), hosts["target"], hosts["draft"], RandomAccept(0.0)))
    assert never.token_ids == ar_tokens
    assert all(s.origin == "target" for s in never.steps)


@pytest.mark.parametrize("method", STEP_METHODS)
def test_draft_speculation_writes_the_same_draft_steps_in_fewer_passes(hosts, method):
    """n-gram lookup inside the draft's own steps is lossless: with every draft step accepted the answer is still
    the draft's own greedy text, from fewer draft passes than tokens (and one pass per token without it)."""
    draft_only = run(Controller(settings("ar"), hosts["draft"])).token_ids
    plain = run(Controller(settings(method, cut_drafts="verify"), hosts["target"], hosts["draft"], Always()))
    fast = run(Controller(settings(method, cut_drafts="verify", draft_speculation=Speculation("ngram", 4)),
                          hosts["target"], hosts["draft"], Always()))
    assert plain.token_ids == fast.token_ids  # the same draft steps either way
    if method != "lr_sync":  # lr_sync also commits the target's step after every gamma accepted drafts
        assert fast.token_ids == draft_only
    assert plain.draft_passes == plain.draft_tokens and plain.draft_token_accepted == 0
    assert fast.draft_token_accepted > 0
    # a pass keeps its accepted proposals plus one token of its own; a step's last pass may add none
    kept = fast.draft_tokens - fast.draft_token_accepted
    assert kept <= fast.draft_passes <= kept + fast.draft_requests and fast.draft_passes < fast.draft_tokens
    s = summarize([fast])
    assert s["draft_tokens_per_pass"] > 1
    if method != "lr_sync":
        assert s["draft_token_share"] == 1.0 and s["committed_draft_step_tokens"] == len(draft_only) / len(fast.steps)


def test_sd_method_matches_ar(hosts, ar_tokens):
    trace = run(Controller(settings("sd"), hosts["target"]))
    assert trace.token_ids == ar_tokens and trace.token_drafted > 0


def test_bad_settings_fail_before_any_model_call(hosts):
    with pytest.raises(ControllerError, match="unknown method"):
        Controller(settings("lookahead"), hosts["target"])
    with pytest.raises(ControllerError, match="gamma"):
        Controller(settings("lr_sync", gamma=0), hosts["target"], hosts["draft"], Always())
    with pytest.raises(ControllerError, match="needs a draft"):
        Controller(settings("fpsr"), hosts["target"])
    with pytest.raises(ControllerError, match="width > 1"):
        Controller(settings("lr_async", width=2), hosts["target"], hosts["draft"], Always())
    with pytest.raises(ControllerError, match="draft_speculation"):
        Controller(settings("lr_async", draft_speculation=Speculation("draft")), hosts["target"], hosts["draft"],
                   Always())
    with pytest.raises(ControllerError, match="late_drafts"):
        Controller(settings("lr_async", late_drafts="never"), hosts["target"], hosts["draft"], Always())


# ---------------------------------------------------------------- scripted hosts


class ScriptedHost:
    """Step i (counted in tokens after the prompt) is [i + 1] * 2 for the target; the draft writes the same
    step, or a wrong one at the positions in `wrong_at`. Every step ends with the delimiter."""

    def __init__(self, prompt_len, wrong_at=(), delay_s=0.0):
        self.prompt_len, self.wrong_at, self.delay_s = prompt_len, set(wrong_at), delay_s
        self.running = 0
        self.seen = []
        self.calls = 0

    async def generate(self, requests):
        out = []
        self.calls += 1
        self.running += len(requests)
        try:
            await asyncio.sleep(self.delay_s)
            for r in requests:
                pos = (len(r.prompt_ids) - self.prompt_len) // 2
                self.seen.append(pos)
                tok = 100 + pos + (50 if pos in self.wrong_at else 0)
                finish = "eos" if pos == 9 else "stop"
                out.append(Result("", [tok, tok], f"s{tok}\n\n", finish, Counters()))
        finally:
            self.running -= len(requests)
        return out


class FixedLengthHost:
    """Every step is `n` tokens ended by the delimiter, cut at the request's max_new_tokens."""

    def __init__(self, n):
        self.n = n

    async def generate(self, requests):
        return [Result("", [7] * min(self.n, r.max_new_tokens), "seven\n\n",
                       "stop" if self.n <= r.max_new_tokens else "length", Counters()) for r in requests]


@pytest.mark.parametrize("step, expected", [(4, 4.0), (8, 6.0)])  # 8: every step stops at the step cap of 6
def test_draft_step_length_leaves_out_the_steps_the_answer_budget_cut(step, expected):
    def host():
        return HostClient(FixedLengthHost(step))

    trace = run(Controller(settings("lr_sync", max_new_tokens=10, token_speculation=Speculation("none")),
                           host(), host(), Exact("tokens")))
    # drafts from deep in the window ask for what is left of the answer's 10 tokens and get cut there
    assert trace.budget_cut_draft_steps >= 1 and trace.budget_cut_draft_tokens < step * trace.budget_cut_draft_steps
    assert trace.draft_tokens / trace.draft_requests < expected
    assert summarize([trace])["tokens_per_draft_step"] == pytest.approx(expected)


def test_sync_bookkeeping_on_scripted_hosts():
    target, draft = ScriptedHost(len(PROMPT)), ScriptedHost(len(PROMPT), wrong_at={2, 7})
    ctl = Controller(settings("lr_sync", max_new_tokens=100), HostClient(target), HostClient(draft), Exact("tokens"))
    trace = run(ctl)
    assert trace.token_ids == [t for i in range(10) for t in (100 + i, 100 + i)]
    # Algorithm 1. cycle 1: d0 d1 accepted, d2 wrong -> t2; cycle 2 from step 3: d3 d4 d5 accepted -> and t6;
    # cycle 3: d7 wrong -> t7; cycle 4: d8 ok, d9 (eos) ok, the answer ends
    assert [s.origin for s in trace.steps] == ["draft", "draft", "target", "draft", "draft", "draft", "target",
                                               "target", "draft", "draft"]
    assert [(v.cycle, v.depth, v.accepted) for v in trace.verifications if v.on_path] == [
        (0, 0, True), (0, 1, True), (0, 2, False), (1, 0, True), (1, 1, True), (1, 2, True),
        (2, 0, False), (3, 0, True), (3, 1, True)]
    # d8 and d9, judged in cycle 3's batch after d7's rejection: off the path (raw count only)
    assert [(v.cycle, v.depth, v.accepted) for v in trace.verifications if not v.on_path] == [(2, 1, True),
                                                                                               (2, 2, True)]
    assert trace.cycles == 4 and trace.finish_reason == "eos"
    # costs: one batched target call per cycle, one verifier call per cycle, every request counted, every
    # committed step with the latency of the call that wrote it
    assert target.calls == 4 and all(s.latency_s > 0 for s in trace.steps)
    assert trace.target_requests == len(target.seen) and trace.draft_requests == len(draft.seen)
    assert trace.verifier_calls == 4 and trace.verify_s > 0


def test_async_window_restarts_at_depth_zero_after_a_fallback():
    """After accepted steps then a rejection, the fresh root's window starts at depth 0 again (a stale window level
    once gave the next cycle negative depths and a window gamma + the previous cycle's accepted steps deep): every
    committed draft step is the accepted verification at its (cycle, depth), and depths count from 0 per cycle."""
    target, draft = ScriptedHost(len(PROMPT)), ScriptedHost(len(PROMPT), wrong_at={2, 7})
    ctl = Controller(settings("lr_async", max_new_tokens=100, gamma=3), HostClient(target), HostClient(draft),
                     Exact("tokens"))
    trace = run(ctl)
    assert trace.token_ids == [t for i in range(10) for t in (100 + i, 100 + i)]
    # cycle 0: d0 d1 accepted, d2 wrong -> t2; cycle 1 from step 3: d3..d6 accepted (the window slides), d7 wrong
    # -> t7; cycle 2: d8, d9 (eos)
    assert [(s.origin, s.cycle, s.depth) for s in trace.steps] == [
        ("draft", 0, 0), ("draft", 0, 1), ("target", 0, 2), ("draft", 1, 0), ("draft", 1, 1), ("draft", 1, 2),
        ("draft", 1, 3), ("target", 1, 4), ("draft", 2, 0), ("draft", 2, 1)]
    assert min(v.depth for v in trace.verifications) == 0
    accepted = {(v.cycle, v.depth) for v in trace.verifications if v.accepted}
    assert {(s.cycle, s.depth) for s in trace.steps if s.origin == "draft"} <= accepted
    assert trace.cycles == 3


class WrongStepVerifier(Verifier):
    """Knows the script: rejects the draft's wrong steps (token >= 150) without the target's step."""

    needs_target_step = False

    async def verify(self, items):
        return [Verdict(it.draft_ids[0] < 150, 0.5) for it in items]


@pytest.mark.parametrize("method", ["fpsr", "lr_async"])
def test_early_stop_cancels_and_falls_back_cleanly(method):
    target, draft = ScriptedHost(len(PROMPT), delay_s=0.05), ScriptedHost(len(PROMPT), wrong_at={1}, delay_s=0.01)
    ctl = Controller(settings(method, max_new_tokens=100, gamma=4), HostClient(target), HostClient(draft),
                     WrongStepVerifier())
    trace = run(ctl)
    assert trace.token_ids == [t for i in range(10) for t in (100 + i, 100 + i)]
    assert trace.steps[1].origin == "target"  # the rejected position's target step is committed
    assert target.running == 0 and draft.running == 0  # nothing left running
    assert trace.cancelled_requests > 0 or trace.wasted_target_tokens > 0


@pytest.mark.parametrize("method", ["ar", "lr_sync", "lr_async", "fpsr"])
def test_length_cap_eos_and_nothing_left_running(hosts, method):
    ctl = Controller(settings(method, max_new_tokens=13), hosts["target"], hosts["draft"], Exact("tokens"))
    trace = run(ctl)
    assert len(trace.token_ids) <= 13 + 6 and trace.finish_reason in ("length", "eos")
    for key in ("target", "draft"):
        engine = hosts[key].host.engine
        assert not engine.live and not engine.pending and not engine.target.active
    target, draft = ScriptedHost(len(PROMPT)), ScriptedHost(len(PROMPT))
    trace = run(Controller(settings(method, max_new_tokens=100), HostClient(target), HostClient(draft),
                           Exact("tokens")))
    assert trace.finish_reason == "eos" and len(trace.token_ids) == 20  # the scripted answer ends at step 9
    assert target.running == 0 and draft.running == 0


def test_commit_wait_measures_a_fallback_held_up_by_a_slow_draft():
    """With late_drafts="wait" (the default), lr_async decides a root only when its draft step is judged: with a
    draft 4x slower than the target and a verifier that rejects everything, every committed target step waits
    ~(draft - target) after its call returns, and the summary reports it; `ar` commits as soon as its call
    returns."""
    from speculative.metrics import summarize

    target, draft = ScriptedHost(len(PROMPT), delay_s=0.05), ScriptedHost(len(PROMPT), delay_s=0.2)
    trace = run(Controller(settings("lr_async", max_new_tokens=8, gamma=1), HostClient(target),
                           HostClient(draft), RandomAccept(0.0)))
    assert [s.origin for s in trace.steps] == ["target"] * 4
    waits = [s.wait_s for s in trace.steps[:-1]]  # the last (the budget's end) has no draft to wait for
    assert all(0.1 < w < 0.3 for w in waits), waits
    wait = summarize([trace])["commit_wait"]
    assert wait["draft_s"] == 0.0 and 0.1 < wait["target_s"] < 0.3
    assert 0.3 < wait["target_share_of_wall"] < 0.9
    ar = run(Controller(settings("ar", max_new_tokens=8), HostClient(ScriptedHost(len(PROMPT), delay_s=0.05))))
    assert all(s.wait_s < 0.02 for s in ar.steps) and summarize([ar])["commit_wait"]["target_share_of_wall"] < 0.1


@pytest.mark.parametrize("method", ["lr_async", "fpsr"])
@pytest.mark.parametrize("verifier", [Always(), Exact("tokens")])
def test_late_drafts_lose_to_the_root_target_step(verifier, method):
    """With late_drafts="lose", a root whose target step returns before any draft child exists commits that step at
    once: the same text as `ar`, no commit wait, the late drafts cancelled (nothing left running) and counted as
    rejected, even by a verifier that would have accepted them."""
    target, draft = ScriptedHost(len(PROMPT), delay_s=0.05), ScriptedHost(len(PROMPT), delay_s=0.2)
    trace = run(Controller(settings(method, max_new_tokens=8, gamma=2, late_drafts="lose"), HostClient(target),
                           HostClient(draft), verifier))
    assert trace.token_ids == [t for i in range(4) for t in (100 + i, 100 + i)]
    assert [s.origin for s in trace.steps] == ["target"] * 4 and all(s.wait_s < 0.03 for s in trace.steps)
    assert [(v.cycle, v.depth, v.accepted, v.reason) for v in trace.verifications] == [
        (c, 0, False, "late") for c in range(4)]
    assert trace.cancelled_requests >= 3 and draft.running == 0 and target.running == 0
    assert trace.wall_s < 0.05 * 4 + 0.1  # the target's pace, not the draft's


class SlowOnWrongVerifier(WrongStepVerifier):
    """Judges a wrong step slowly, the rest at once: drafts after a wrong one are judged before it is rejected."""

    async def verify(self, items):
        if any(it.draft_ids[0] >= 150 for it in items):
            await asyncio.sleep(0.3)
        return await super().verify(items)


@pytest.mark.parametrize("method", ["fpsr", "lr_async", "lr_sync"])
def test_step_acceptance_counts_only_verdicts_on_the_accepted_path(method):
    """The theory's alpha is conditional: a verdict counts only when every earlier draft of its window was accepted.
    fpsr and lr_async judge d2, d3 (accepted) while the wrong d1 is still being judged; those verdicts stay in the
    raw count only. Here every on-path verdict passes but the one on d1."""
    target, draft = ScriptedHost(len(PROMPT), delay_s=0.02), ScriptedHost(len(PROMPT), wrong_at={1}, delay_s=0.01)
    ctl = Controller(settings(method, max_new_tokens=100, gamma=4), HostClient(target), HostClient(draft),
                     SlowOnWrongVerifier())
    trace = run(ctl)
    assert trace.token_ids == [t for i in range(10) for t in (100 + i, 100 + i)]
    on = [v for v in trace.verifications if v.on_path]
    off = [v for v in trace.verifications if not v.on_path]
    assert [v.accepted for v in on].count(False) == 1 and not on[1].accepted  # d1, the second draft
    if method != "lr_sync":  # lr_sync judges its window in one batch: its d2, d3 are judged and off the path too
        assert off and all(v.accepted for v in off)
    s = summarize([trace])
    assert s["step_accept_rate"] == pytest.approx((len(on) - 1) / len(on))
    assert s["verifications"] == len(on) and s["verifications_raw"] == len(trace.verifications)
    assert s["step_accept_rate_raw"] == pytest.approx(sum(v.accepted for v in trace.verifications)
                                                      / len(trace.verifications))
    assert s["step_accept_rate_raw"] > s["step_accept_rate"]


# ---------------------------------------------------------------- against the theory (speculative.scripted)


def test_controllers_reach_the_theory_on_scripted_hosts():
    """Scripted hosts with fixed latencies (draft c = 0.3, target 1, a batched call costs one step, verification
    free) and a verifier that accepts with probability alpha: for every step method, alpha in {0.3, 0.6, 0.9} and
    gamma in {2, 4}, the speedup of the run's wall time over `ar`'s is within 5% of what the summary predicts
    from the run's measured rates. Also with a verifier that does not wait for the target's step. (An FPSR that
    stopped at every window boundary, or an lr_sync theory that counted gamma - 1 drafts, was 10-50% off.)"""
    from speculative.scripted import theory_grid

    waits = asyncio.run(theory_grid())
    free = asyncio.run(theory_grid(("lr_async", "fpsr"), gammas=(2,), waits=False, seed=100))
    runs = waits["runs"] | {k + "/free": v for k, v in free["runs"].items()}
    assert len(runs) == 24 and all(r["steps"] == 120 and r["left_running"] == 0 for r in runs.values())
    off = {k: round(r["rel_error"], 3) for k, r in runs.items() if abs(r["rel_error"]) > 0.05}
    for key in list(off):  # a run another process slowed down here gets one more try, alone (a wrong schedule or
        m, a, g = key.split("/")[:3]  # theory is off on every try: 10-50% before this was fixed)
        again = asyncio.run(theory_grid((m,), (float(a.split("=")[1]),), (int(g.split("=")[1]),),
                                        waits=not key.endswith("/free"), seed=7))
        if abs(again["max_rel_error"]) <= 0.05:
            del off[key]
    assert not off, off
    # the runs span the regimes: window-bound gamma 2 below fpsr's gamma 4, lr_sync below both
    assert runs["fpsr/alpha=0.9/gamma=2"]["speedup"] < runs["fpsr/alpha=0.9/gamma=4"]["speedup"]
    assert runs["lr_sync/alpha=0.9/gamma=4"]["speedup"] < runs["fpsr/alpha=0.9/gamma=4"]["speedup"]


@pytest.mark.parametrize("method", ["fpsr", "lr_async"])
def test_all_accept_runs_overlap_drafting_target_and_verification(method):
    """Every draft passes, the verifier waits for the target's step: drafting runs ahead while the target's steps
    and the verdicts follow, so the run takes the draft's chain plus one target step (d_k's verdict comes when t_k,
    started when d_{k-1} ended, returns; the window of gamma steps can hold the draft back), as the theory's
    schedule gives it, far below the sum of its calls' latencies. fpsr does not stop at window
    boundaries: its wall time is lr_async's."""
    from speculative.scripted import scripted_run
    from speculative.theory import chain_times

    steps = 12
    trace, target, draft = asyncio.run(scripted_run(method, 1.0, 4, 0.2, 0.1, steps))
    assert [s.origin for s in trace.steps] == ["draft"] * steps and trace.draft_requests == steps
    unit = trace.target_step_s / trace.target_requests
    verdicts, _ = chain_times(trace.draft_step_s / trace.draft_requests / unit, 4, steps - 1)
    assert trace.wall_s == pytest.approx(verdicts[-1] * unit, rel=0.1)  # the last step is committed at its verdict
    # gamma 4, c 0.2: the window holds the draft back, one step every (1 + c) / (1 + gamma) target steps
    assert chain_times(0.2, 4, steps - 1)[0][-1] == pytest.approx(1 + 11 * 0.2 + 2 * 0.2)  # two stalls of c
    assert trace.wall_s < 0.5 * (trace.draft_step_s + trace.target_step_s)
    assert target.running == 0 and draft.running == 0


def test_fpsr_without_early_stop_runs_the_window_past_a_rejection_and_discards_it():
    """DREAM-R's ablation (fpsr.early_stop=false): past the first rejection nothing is cancelled, the window's
    drafts, target steps and verdicts run to completion and are thrown away: the same text, more waste, later."""
    def once(early_stop):
        target, draft = ScriptedHost(len(PROMPT), delay_s=0.05), ScriptedHost(len(PROMPT), wrong_at={1}, delay_s=0.01)
        ctl = Controller(settings("fpsr", max_new_tokens=100, gamma=4, early_stop=early_stop), HostClient(target),
                         HostClient(draft), Exact("tokens"))
        trace = run(ctl)
        assert target.running == 0 and draft.running == 0
        return trace

    stop, full = once(True), once(False)
    assert full.token_ids == stop.token_ids == [t for i in range(10) for t in (100 + i, 100 + i)]
    assert [s.origin for s in full.steps] == [s.origin for s in stop.steps]
    assert stop.cancelled_requests > 0 and full.cancelled_requests == 0
    assert full.wasted_draft_tokens >= stop.wasted_draft_tokens and full.wasted_target_tokens > stop.wasted_target_tokens
    assert full.wall_s > stop.wall_s
    # past the rejection at depth 1, the window's verdicts were judged and are off the accepted path
    assert [v for v in full.verifications if not v.on_path and v.cycle == 0]


class SiblingHost(ScriptedHost):
    """A sampling draft: a request's seed picks its step. Even seeds write the right step after 0.01 s, odd seeds
    a wrong one (token + 50) after 0.08 s; sibling w of a node is seeded with offset w, so siblings differ."""

    def __init__(self, prompt_len):
        super().__init__(prompt_len)
        self.seeds = []

    async def generate(self, requests):
        [r] = requests
        self.seeds.append(r.sampling.seed)
        wrong = r.sampling.seed % 2 == 1
        self.running += 1
        try:
            await asyncio.sleep(0.08 if wrong else 0.01)
        finally:
            self.running -= 1
        pos = (len(r.prompt_ids) - self.prompt_len) // 2
        tok = 100 + pos + (50 if wrong else 0)
        return [Result("", [tok, tok], f"s{tok}\n\n", "eos" if pos == 9 else "stop", Counters())]


def test_width_two_siblings_differ_the_first_accepted_wins_the_others_are_cancelled():
    """lookahead.width = 2 with draft sampling: every node launches two sibling draft steps from differently seeded
    requests (they write different steps); the first one accepted is committed and its slower sibling cancelled."""
    from actors.engine import Sampling

    target, draft = ScriptedHost(len(PROMPT), delay_s=0.03), SiblingHost(len(PROMPT))
    ctl = Controller(settings("lr_async", max_new_tokens=100, gamma=2, width=2,
                              draft_sampling=Sampling(temperature=1.0, seed=3)),
                     HostClient(target), HostClient(draft), WrongStepVerifier())
    trace = run(ctl)
    assert trace.token_ids == [t for i in range(10) for t in (100 + i, 100 + i)]
    assert all(s.origin == "draft" for s in trace.steps)  # a right sibling always passes
    assert len(draft.seeds) >= 2 * len(trace.steps) and len(set(draft.seeds)) == len(draft.seeds)  # two a node
    assert trace.draft_requests == len(trace.steps)  # the wrong, slower siblings never finished:
    assert trace.cancelled_requests >= len(trace.steps)  # each was cancelled when its sibling won
    assert draft.running == 0 and target.running == 0


def test_a_run_whose_target_steps_were_all_cancelled_is_still_predicted():
    """Every draft accepted by a verifier that does not wait for the target's step: every target step is cancelled
    unfinished, so the run has no target step of its own to measure the draft's cost against; `ar`'s is the
    unit (the prediction was infinite)."""
    from speculative.scripted import ar_run, scripted_run

    async def both():
        return await asyncio.gather(scripted_run("fpsr", 1.0, 2, 0.3, 0.06, 30, waits=False), ar_run(0.06, 30))

    (trace, *_), ar = asyncio.run(both())
    assert trace.target_requests == 0 and trace.cancelled_requests > 0
    sums = {"ar": summarize([ar]), "fpsr": summarize([trace], 2)}
    assert sums["fpsr"]["step_cost_ratio"] is None
    from speculative.metrics import add_speedups

    add_speedups(sums)
    s = sums["fpsr"]
    assert 0.25 < s["step_cost_ratio"] < 0.4
    assert s["predicted_speedup"] == pytest.approx(1 / s["step_cost_ratio"], rel=0.01)
    assert s["speedup"] == pytest.approx(s["predicted_speedup"], rel=0.1)
