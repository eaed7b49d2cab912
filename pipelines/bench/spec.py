"""`python -m pipelines.bench spec`: every speculative method on the same actors and held-out problems.

The evaluate preset `--preset` (demo: SmolLM2 target, early-exit draft, TBVM at alpha 0.7) on `--num-problems`
held-out problems, every method on the same actors, at 1 and 4 problems in flight; per method (`methods.<m>.*`):
speedup, step_accept_rate, answer_agreement, accuracy, predicted_speedup (on the measured cost of the method's
committed target steps), predicted_speedup_ideal (the papers' model: a target step costs what it costs alone),
target_step_slowdown, verify_s (latency of one verifier call), commit_wait (mean wait from a committed step's call
returning to its commit, per origin, and the committed target steps' summed waits as a share of the wall),
tokens_per_s_1, tokens_per_s_4, plus the checks within_20pct_of_predicted / _of_ideal and fpsr_ge_lr_sync;
theory_check: the same predictions at a known accept rate (a random verifier accepting half the drafts,
`--theory-problems` problems, one in flight).

On scripted hosts with fixed latencies (speculative.scripted; no model, ~1 min; `--scripted-only` runs only this):
`scripted_theory_max_rel_error`, the largest |measured / predicted - 1| of the speedup over every step method,
alpha in {0.3, 0.6, 0.9} and gamma in {2, 4} (draft cost 0.3 target steps; also with a verifier that does not wait
for the target's step), and `fpsr_vs_lr_async_all_accept`, fpsr's wall time over lr_async's when every draft
passes (draft 0.02 s, target 0.1 s, gamma 4, 12 steps; median of 3 runs); every run is under `scripted`.
"""

from __future__ import annotations

import torch

from pipelines.bench.common import device_name

KEYS = ("methods", "run_dir_1", "run_dir_4", "target", "draft", "verifier", "gamma", "num_problems", "theory_check",
        "fpsr_ge_lr_sync", "best_speedup", "device", "scripted", "scripted_theory_max_rel_error",
        "fpsr_vs_lr_async_all_accept")
SCRIPTED_KEYS = ("scripted", "scripted_theory_max_rel_error", "fpsr_vs_lr_async_all_accept")

SPEC_METHODS = ["ar", "sd", "lr_sync", "lr_async", "lr_async+sd", "fpsr", "fpsr+sd"]


def _within_20pct(summary: dict, key: str) -> bool:
    return abs(summary["speedup"] - summary[key]) <= 0.2 * summary[key]


def scripted(steps: int = 120) -> dict:
    """The controllers against the theory on scripted hosts (no model), `steps` committed steps a run."""
    import asyncio
    import statistics

    from speculative.scripted import all_accept_ratio, theory_grid

    waits = asyncio.run(theory_grid(steps=steps))
    free = asyncio.run(theory_grid(("lr_async", "fpsr"), gammas=(2,), waits=False, seed=100, steps=steps))
    all_accept = [asyncio.run(all_accept_ratio()) for _ in range(3)]
    return {"scripted": {"theory": waits, "theory_verifier_free": free, "all_accept_runs": all_accept},
            "scripted_theory_max_rel_error": max(waits["max_rel_error"], free["max_rel_error"]),
            "fpsr_vs_lr_async_all_accept": statistics.median(r["ratio"] for r in all_accept)}


def run(args) -> dict:
    from pipelines.config import load_config
    from pipelines.schema import EvaluateConfig
    from pipelines.evaluate import evaluate

    out: dict = scripted(args.scripted_steps)
    if args.scripted_only:
        return out
    out["methods"] = {}
    for in_flight in (1, 4):
        cfg = load_config(EvaluateConfig, "evaluate", [
            args.preset, f"run.storage={args.run_dir}", f"run.name=bench-spec-{in_flight}",
            f"data.num_problems={args.num_problems}", f"data.offset={args.offset}",
            f"generation.max_new_tokens={args.max_new_tokens}", f"problems_in_flight={in_flight}",
            "methods=[" + ",".join(SPEC_METHODS) + "]"])
        run_dir, summary = evaluate(cfg)
        out[f"run_dir_{in_flight}"] = str(run_dir)
        for method, s in summary["methods"].items():
            row = out["methods"].setdefault(method, {})
            row[f"tokens_per_s_{in_flight}"] = s["tokens_per_s"]
            if in_flight == 1:
                row.update({k: s.get(k) for k in ("speedup", "step_accept_rate", "answer_agreement", "accuracy",
                                                  "predicted_speedup", "predicted_speedup_ideal",
                                                  "target_step_slowdown", "step_cost_ratio", "token_acceptance_rate",
                                                  "target_step_s", "draft_step_s", "verify_s", "commit_wait")})
                row["within_20pct_of_predicted"] = _within_20pct(s, "predicted_speedup")
                row["within_20pct_of_ideal"] = _within_20pct(s, "predicted_speedup_ideal")
            else:
                row["speedup_4_in_flight"] = s.get("speedup")
        out.update(target=summary["target"], draft=summary["draft"], verifier=summary["verifier"],
                   gamma=summary["gamma"], num_problems=summary["num_problems"])
    if args.theory_problems:  # the theory at a known accept rate: a random verifier accepts half the drafts
        cfg = load_config(EvaluateConfig, "evaluate", [
            args.preset, f"run.storage={args.run_dir}", "run.name=bench-spec-theory",
            f"data.num_problems={args.theory_problems}", f"data.offset={args.offset}",
            f"generation.max_new_tokens={args.max_new_tokens}", "problems_in_flight=1", "verifier.kind=random",
            "verifier.p=0.5", "methods=[ar,sd,lr_sync,lr_async,fpsr,lr_async+sd]"])
        run_dir, summary = evaluate(cfg)
        out["theory_check"] = {"verifier": "random(p=0.5)", "run_dir": str(run_dir), "methods": {
            method: {k: s.get(k) for k in ("speedup", "predicted_speedup", "predicted_speedup_ideal",
                                           "target_step_slowdown", "step_accept_rate", "step_cost_ratio",
                                           "accepted_steps_per_cycle")}
            | {"within_20pct_of_predicted": _within_20pct(s, "predicted_speedup")}
            for method, s in summary["methods"].items()}}
    m = out["methods"]
    out["fpsr_ge_lr_sync"] = m["fpsr"]["speedup"] >= m["lr_sync"]["speedup"]
    out["best_speedup"] = max((v["speedup"], k) for k, v in m.items())
    out["device"] = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return out
