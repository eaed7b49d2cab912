"""Metrics of one method over many problems, computed from traces only.

Names follow the papers and vLLM: step_accept_rate (accepted draft steps / verified draft steps on the accepted
path, i.e. those whose earlier drafts in the window were all accepted, as the theory's alpha; a cut draft counts as
rejected; `step_accept_rate_raw` counts every verdict that finished), acceptance by depth (conditional: a depth is judged only while every earlier draft in the window
passed), token-level acceptance_rate (accepted / drafted tokens) and mean_acceptance_length (1 + accepted tokens
per target verification pass).
"""

from __future__ import annotations

from collections import defaultdict

from speculative.theory import device_adjusted, predicted_speedup
from speculative.trace import Trace


def summarize(traces: list[Trace], gamma: int = 1) -> dict:
    n = len(traces)
    tokens = sum(len(t.token_ids) for t in traces)
    wall = sum(t.wall_s for t in traces)
    judged = [v for t in traces for v in t.verifications]
    verifs = [v for v in judged if v.on_path]  # the conditional acceptance the theory's alpha is
    by_depth: dict[int, list[bool]] = defaultdict(list)
    for v in verifs:
        by_depth[v.depth].append(v.accepted)
    cycles = sum(t.cycles for t in traces)
    draft_steps = sum(s.origin == "draft" for t in traces for s in t.steps)
    draft_step_tokens = sum(len(s.token_ids) for t in traces for s in t.steps if s.origin == "draft")
    draft_passes = sum(t.draft_passes for t in traces)
    steps = sum(len(t.steps) for t in traces)
    target_req = sum(t.target_requests for t in traces)
    draft_req = sum(t.draft_requests for t in traces)
    draft_tok = sum(t.draft_tokens for t in traces)
    cut_req = sum(t.budget_cut_draft_steps for t in traces)
    cut_tok = sum(t.budget_cut_draft_tokens for t in traces)
    target_cost = sum(t.target_step_s for t in traces) / max(target_req, 1)
    draft_s = sum(t.draft_step_s for t in traces)
    draft_cost = draft_s / max(draft_req, 1)
    committed = _latency_line([(s.latency_s, len(s.token_ids)) for t in traces for s in t.steps
                               if s.origin == "target" and s.latency_s > 0])
    # the method's own target step, the theory's unit: the mean latency of the target steps it committed (the
    # ones it waited for); traces without latencies per step fall back to the mean target request
    unit = committed["latency_s"] / committed["n"] if committed["n"] else target_cost
    calls = sum(t.verifier_calls for t in traces)
    verify_cost = sum(t.verify_s for t in traces) / max(calls, 1)
    drafted = sum(t.token_drafted for t in traces)
    accepted = sum(t.token_accepted for t in traces)
    passes = sum(t.token_passes for t in traces)
    return {
        "num_problems": n,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,  # one problem at a time; evaluate replaces it by
        # tokens / elapsed when problems run concurrently
        "steps": steps,
        "draft_steps_committed": draft_steps,
        "cycles": cycles,
        "accepted_steps_per_cycle": draft_steps / cycles if cycles else 0.0,
        "step_accept_rate": sum(v.accepted for v in verifs) / len(verifs) if verifs else 0.0,
        "verifications": len(verifs),
        # every verdict that finished, also on drafts after one that was rejected (lr_async, fpsr judge those
        # concurrently; lr_sync judges its window in one batch)
        "step_accept_rate_raw": sum(v.accepted for v in judged) / len(judged) if judged else 0.0,
        "verifications_raw": len(judged),
        "accept_rate_by_depth": {d: sum(a) / len(a) for d, a in sorted(by_depth.items())},
        "verifier_calls": calls,
        "target_requests": target_req,
        "draft_requests": draft_req,
        # the draft's step length in this run: tokens per draft step, leaving out the steps the answer's budget cut
        # short (a step the step cap stopped counts at the cap). Censored: a run-on step the budget stopped is left
        # out too, so with a tight budget it favours drafts that write short steps
        "tokens_per_draft_step": (draft_tok - cut_tok) / (draft_req - cut_req) if draft_req > cut_req else None,
        "budget_cut_draft_steps": cut_req,
        "draft_tokens": draft_tok,
        "cancelled_requests": sum(t.cancelled_requests for t in traces),
        "wasted_target_tokens": sum(t.wasted_target_tokens for t in traces),
        "wasted_draft_tokens": sum(t.wasted_draft_tokens for t in traces),
        "target_step_s": target_cost,
        "committed_target_steps": committed,
        "commit_wait": _commit_wait(traces),
        "draft_step_s": draft_cost,
        # the draft's cost per token it wrote, and what the answer took from it: accepted draft steps are often the
        # short ones, so their share of the tokens can sit well below the step accept rate
        "draft_token_s": draft_s / draft_tok if draft_tok else None,
        "draft_tokens_per_pass": draft_tok / draft_passes if draft_passes else None,
        "draft_token_share": draft_step_tokens / tokens if tokens else 0.0,
        "committed_draft_step_tokens": draft_step_tokens / draft_steps if draft_steps else None,
        # None when no target step of the method finished (every one cancelled): add_speedups takes ar's step
        "step_cost_ratio": (draft_cost / unit if unit else None) if draft_req else 0.0,
        "verify_s": verify_cost,
        "verify_cost_ratio": verify_cost / unit if unit and calls else 0.0,
        "token_acceptance_rate": accepted / drafted if drafted else 0.0,
        "token_mean_acceptance_length": 1 + accepted / passes if passes and drafted else 1.0,
        "gamma": gamma,
        # the theory's schedule for lr_async and fpsr: a verdict also waits for the target's step it compares with
        "verifier_waits_for_target": any(t.verifier_waits for t in traces),
    }


def _commit_wait(traces: list[Trace]) -> dict:
    """Where wall time goes besides the committed calls: the mean wait from a committed step's call returning to its
    commit (the controller waiting on draft steps and verdicts), per origin, and the summed waits of committed
    target steps as a share of the wall (time the theory's unit does not cover; ~0 for `ar`)."""
    waits: dict[str, list[float]] = {"target": [], "draft": []}
    for t in traces:
        for s in t.steps:
            waits[s.origin].append(s.wait_s)
    out = {f"{origin}_s": sum(w) / len(w) if w else 0.0 for origin, w in waits.items()}
    wall = sum(t.wall_s for t in traces)
    out["target_share_of_wall"] = sum(waits["target"]) / wall if wall else 0.0
    return out


def _latency_line(calls: list[tuple[float, int]]) -> dict:
    """Target steps as (call latency, tokens): count, summed latency and tokens, and a least-squares fit of
    latency = fixed_s + per_token_s * tokens (what a step of a given length costs; through the origin when the
    fit would give a negative part)."""
    n, lat, tok = len(calls), sum(c[0] for c in calls), sum(c[1] for c in calls)
    out = {"n": n, "latency_s": lat, "tokens": tok, "fixed_s": 0.0, "per_token_s": lat / tok if tok else 0.0}
    if n >= 2:
        mt, ml = tok / n, lat / n
        var = sum((c[1] - mt) ** 2 for c in calls)
        if var > 0:
            slope = sum((c[1] - mt) * (c[0] - ml) for c in calls) / var
            if slope > 0 and ml - slope * mt >= 0:
                out["fixed_s"], out["per_token_s"] = ml - slope * mt, slope
    return out


def target_slowdown(method: dict, alone: dict) -> float:
    """How much longer the method's committed target steps took than the baseline's would have for the same
    lengths: their summed call latency over what the baseline's fitted line gives for each (same work, measured
    on both sides). Committed steps only: those are the ones on the critical path; early stop cancels long
    speculative target steps and lets short ones finish, so a mean over all requests would mix in work whose
    latency no committed step waited for. Falls back to the mean request latency for traces without latencies
    per step."""
    m, a = method.get("committed_target_steps") or {}, alone.get("committed_target_steps") or {}
    if m.get("n") and a.get("n"):
        expected = m["n"] * a["fixed_s"] + m["tokens"] * a["per_token_s"]
        if expected > 0:
            return m["latency_s"] / expected
    if method.get("target_step_s") and alone.get("target_step_s"):
        return method["target_step_s"] / alone["target_step_s"]
    return 1.0


def token_model_speedup(method: dict, ar_token_s: float) -> float | None:
    """The speedup if the wall held only the committed work, counted in tokens: the answer's draft tokens at the
    draft's measured pace and its target tokens at the pace of the method's committed target steps, over `ar`'s
    per-token time `ar_token_s` (1 / (share * draft / ar + (1 - share) * target / ar)). The step model counts
    steps; when accepted steps are shorter than the target's (they often are), this is the better account, and the
    rest of the gap to the measured speedup is waiting (`commit_wait`) and overhead."""
    committed = method.get("committed_target_steps") or {}
    share, draft_s = method.get("draft_token_share"), method.get("draft_token_s")
    if share is None or not draft_s or not committed.get("tokens"):
        return None
    target_s = committed["latency_s"] / committed["tokens"]
    return ar_token_s / (share * draft_s + (1 - share) * target_s)


def _token_latency(ar: dict) -> float | None:
    """`ar`'s seconds per token inside its calls (with several problems in flight: per request, not the
    throughput), the pace the token views compare with."""
    c = ar.get("committed_target_steps") or {}
    if c.get("tokens"):
        return c["latency_s"] / c["tokens"]
    return 1 / ar["tokens_per_s"] if ar.get("tokens_per_s") else None


def _unit(summary: dict) -> float:
    """The mean latency of the target steps a run committed (the theory's unit)."""
    c = summary.get("committed_target_steps") or {}
    return c["latency_s"] / c["n"] if c.get("n") else summary["target_step_s"]


def add_speedups(summaries: dict[str, dict]) -> None:
    """Speedup vs `ar` (tokens/s on the same problems and actors) and the speedup the theory predicts from each
    method's measured step accept rate and cost ratio (token-level SD multiplies by `sd`'s measured speedup).

    `predicted_speedup_ideal` is the papers' model as written: the target's step costs what it costs alone and a
    batched pass costs one step (separate devices for draft and target, free batching). `predicted_speedup`
    takes the measured cost of the method's own target steps as the unit instead (theory.device_adjusted): on a
    shared device (one CPU, one GPU) the draft and the concurrent target requests slow every target step, which
    the ideal model cannot see; `target_step_slowdown` is that factor (`target_slowdown`)."""
    ar = summaries.get("ar")
    if not ar or not ar["tokens_per_s"]:
        return
    token_speedup = summaries["sd"]["tokens_per_s"] / ar["tokens_per_s"] if "sd" in summaries else 1.0
    ar_token_s = _token_latency(ar)
    for method, s in summaries.items():
        s["speedup"] = s["tokens_per_s"] / ar["tokens_per_s"]
        if s["step_cost_ratio"] is None:  # none of its target steps finished: ar's committed step is the unit
            s["step_cost_ratio"] = s["draft_step_s"] / _unit(ar)
        ideal = predicted_speedup(method, s["step_accept_rate"], s["step_cost_ratio"], s["gamma"], token_speedup,
                                  s.get("verifier_waits_for_target", True))
        alone = summaries["sd"] if "+sd" in method and "sd" in summaries else ar  # the same kind of target step
        slowdown = 1.0 if method.split("+")[0] in ("ar", "sd") else target_slowdown(s, alone)
        s["predicted_speedup_ideal"] = ideal
        s["target_step_slowdown"] = slowdown
        s["predicted_speedup"] = device_adjusted(ideal, slowdown)
        if s.get("draft_token_s") and ar_token_s:
            # every step accepted: tokens come at the draft's pace (lr_async, fpsr), a ceiling on any acceptance
            # (per request: with several problems in flight, latency, not throughput)
            s["draft_bound_speedup"] = ar_token_s / s["draft_token_s"]
            s["token_model_speedup"] = token_model_speedup(s, ar_token_s)
