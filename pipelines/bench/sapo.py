"""The SAPO benchmark: does SAPO make the draft's steps acceptable to the target? (`python -m pipelines.bench sapo`)

One run, side by side, on the demo models:
1. collect: the target's greedy step-by-step answers on --train-problems training problems of the demo dataset
   (gsm_symbolic rows from --train-offset; or reuse --trajectories);
2. evaluate *before*: `ar` and `lr_async+sd` (--verifier: by default the embedding verifier, MiniLM cosine >
   --threshold 0.9, with the exact-match short circuit; steps capped at --step-max-tokens 100; n-gram SD inside
   steps) with the untrained early-exit draft on --num-problems held-out problems (rows from --offset, disjoint
   from the training rows). TBVM (`--verifier tbvm`) asks the 135M target, which says no to everything here;
3. sapo: the `--sapo-preset` recipe (warm start SFT on the trajectories, then GRPO on SAPO's rewards);
4. evaluate *after*: the same problems, methods and verifier with the exported draft, and with the warm-start
   draft alone (before GRPO), so the gain splits into the warm start's and GRPO's;
5. GRPO throughput with 1 and 2 Ray Train workers (short runs without warm start, 0.95 CPU and 1 thread each).
`--sapo-run DIR` skips steps 1 and 3 with a finished SAPO run of the same recipe (its draft and trajectories), to
re-measure the evaluations (stage 3 is most of the hour on 2 CPU cores).

Writes token_agreement_before/after (teacher-forced: the share of the target's greedy answer tokens on the
held-out problems that the draft's argmax predicts), accept_rate_before/after (step accept rate of lr_async+sd: accepted / verified draft steps),
accept_gain_points, tokens_per_draft_step_before/after (the draft's step length as a lookahead window drafts:
gamma greedy steps in a row from each prefix of the target's held-out answers, each capped at --step-max-tokens and
none at the answer's budget; `step_agreement` window_step_tokens),
accept_rate_warm_start, tokens_per_draft_step_warm_start, and the gain split by stage: sft_gain_points (the warm
start's: warm start - before), grpo_gain_points (GRPO's: after - warm start); accept_gain_points is both,
lr_speedup_before/after (lr_async+sd tokens/s over ar's, same actors and run), samples_per_s_1_worker,
samples_per_s_2_workers, plus the per-run summaries and wall times of every stage. With the embedding verifier,
also step_match_rate_{before,after,warm_start} and draft_step_tokens_{...} (`step_agreement`: the draft's greedy
step from each of the target's own prefixes on the held-out problems, judged against the target's next step;
target_step_tokens is the target's mean). lr_tokens_per_draft_step_* and draft_tokens_per_request_* are the
step lengths in lr_async's traces, without and with the steps the answer's remaining budget cut: at 128 tokens that
budget stops most steps drafted deep in a window, so they measure the budget more than the draft (the key
tokens_per_draft_step_* was draft_tokens_per_request_* until 2026-12-04).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.bench.agreement import draft_step_agreement, token_agreement
from pipelines.bench.common import stage

LR_METHOD = "lr_async+sd"
KEYS = ("held_out_offset", "num_problems", "method", "max_new_tokens", "step_max_tokens", "verifier", "threshold",
        "sapo_preset", "draft_before", "trajectories", "train_problems", "train_offset", "collect", "sapo_run_reused",
        *(f"{k}_{tag}" for k in ("accept_rate", "tokens_per_draft_step", "lr_tokens_per_draft_step",
                                  "draft_tokens_per_request", "lr_speedup", "draft_bound_speedup", "draft_token_share",
                                  "token_agreement", "step_match_rate", "draft_step_tokens")
          for tag in ("before", "after")),
        "accept_gain_points", "samples_per_s_1_worker", "samples_per_s_2_workers", "accept_rate_warm_start",
        "tokens_per_draft_step_warm_start", "grpo_gain_points", "sft_gain_points", "step_match_rate_warm_start",
        "draft_step_tokens_warm_start", "target_step_tokens", "targets_met", "before", "after", "warm_start",
        "draft_after", "sapo", "stage_wall_s")
# Ray CPUs per GRPO worker in the throughput runs: 2 workers fit a 2-CPU instance beside the encoder actor (0.1 CPU);
# each worker runs 1 torch thread either way
THROUGHPUT_WORKER_CPUS = 0.95


def _ar_trajectories(eval_run_dir: Path, data_cfg, tok) -> list[dict]:
    """The `ar` traces of an evaluation as trajectory rows (prompt ids, steps and their token ids)."""
    from pipelines.data import load_problems, prompt_ids
    from pipelines.runs import read_jsonl

    problems = {p.id: p for p in load_problems(data_cfg).items}
    return [{"prompt_ids": prompt_ids(tok, problems[r["problem_id"]], data_cfg), "question": "", "answer": "",
             "steps": [s["text"] for s in r["steps"]], "step_token_ids": [s["token_ids"] for s in r["steps"]],
             "finish_reason": r["finish_reason"]} for r in read_jsonl(eval_run_dir / "traces" / "ar.jsonl")]


def _evaluate(args, draft: str, tag: str) -> dict:
    import ray

    from pipelines.config import load_config
    from pipelines.schema import EvaluateConfig
    from pipelines.evaluate import evaluate

    cfg = load_config(EvaluateConfig, "evaluate", [
        args.preset, f"run.storage={args.run_dir}", f"run.name=bench-sapo-{tag}", f"draft.model.name={draft}",
        f"data.num_problems={args.num_problems}", f"data.offset={args.offset}",
        f"generation.max_new_tokens={args.max_new_tokens}", f"generation.step_max_tokens={args.step_max_tokens}",
        f"methods=[ar,{LR_METHOD}]", f"verifier.kind={args.verifier}", f"verifier.threshold={args.threshold}",
        "wandb.mode=disabled"])
    run_dir, summary = evaluate(cfg)
    ray.shutdown()
    s = summary["methods"][LR_METHOD]
    from actors import zoo

    # the draft on the target's path (ar's answers): teacher-forced token agreement, its greedy step from each prefix
    # (matched only with the embedding verifier: TBVM would ask the target again) and a lookahead window of gamma
    # steps from there (the step lengths)
    model, tok = zoo.load_model(draft, device="cpu")
    rows = _ar_trajectories(run_dir, cfg.data, tok)
    agreement = token_agreement(model, tok, rows)
    steps = draft_step_agreement(model, tok, rows, args.threshold, args.step_max_tokens,
                                  cfg.generation.step_delimiter, window=cfg.lookahead.gamma,
                                  match=args.verifier == "embedding")
    del model
    return {**agreement, **steps, "run_dir": str(run_dir), "draft": draft, "step_accept_rate": s["step_accept_rate"],
            "verifications": s["verifications"], "accept_rate_by_depth": s["accept_rate_by_depth"],
            "tokens_per_draft_step": steps["window_step_tokens"],
            "lr_tokens_per_draft_step": s["tokens_per_draft_step"],
            "budget_cut_draft_steps": s["budget_cut_draft_steps"], "draft_requests": s["draft_requests"],
            "draft_tokens_per_request": s["draft_tokens"] / s["draft_requests"] if s["draft_requests"] else None,
            **{k: s.get(k) for k in ("speedup", "predicted_speedup", "predicted_speedup_ideal", "step_cost_ratio",
                                     "draft_bound_speedup", "token_model_speedup", "draft_token_share",
                                     "committed_draft_step_tokens", "draft_tokens_per_pass", "target_step_slowdown",
                                     "commit_wait", "tokens_per_s", "accuracy", "answer_agreement",
                                     "token_acceptance_rate")},
            "draft_speculation": cfg.lookahead.draft_speculation,
            "ar_tokens_per_s": summary["methods"]["ar"]["tokens_per_s"], "wall_s": summary["wall_s"]}


def _collect(args) -> tuple[str, dict]:
    import ray

    from pipelines import collect
    from pipelines.config import load_config
    from pipelines.schema import CollectConfig

    cfg = load_config(CollectConfig, "collect", [
        args.collect_preset, f"run.storage={args.run_dir}", "run.name=bench-sapo-train",
        f"data.num_problems={args.train_problems}", f"data.offset={args.train_offset}", "wandb.mode=disabled"])
    run_dir = collect.run(cfg)
    ray.shutdown()
    return str(run_dir / "trajectories.jsonl"), json.loads((run_dir / "summary.json").read_text())


def _sapo(args, trajectories: str, tag: str, extra: list[str]) -> tuple[str, dict]:
    from pipelines import sapo
    from pipelines.config import load_config
    from pipelines.schema import SapoConfig

    cfg = load_config(SapoConfig, "sapo", [args.sapo_preset, f"run.storage={args.run_dir}",
                                           f"run.name=bench-sapo-{tag}", f"trajectories={trajectories}",
                                           "wandb.mode=disabled"] + extra)
    draft_dir, summary = sapo.run(cfg)
    return str(draft_dir), summary


def _reuse_sapo_run(run: str, draft_before: str, trajectories: str | None) -> tuple[str, dict, str]:
    """(draft directory, summary, trajectories) of a finished SAPO run of the same base draft (`--sapo-run`)."""
    import yaml

    run_dir = Path(run)
    summary_path, config_path, draft_dir = run_dir / "summary.json", run_dir / "config.yaml", run_dir / "draft"
    if not (summary_path.is_file() and config_path.is_file() and (draft_dir / "config.json").is_file()):
        raise FileNotFoundError(f"--sapo-run {run}: not a finished SAPO run (it needs summary.json, config.yaml and "
                                "the exported draft/ of `python -m pipelines.sapo`)")
    summary = json.loads(summary_path.read_text())
    config = yaml.safe_load(config_path.read_text())
    base, used = config.get("draft", {}).get("name"), config.get("trajectories")
    if base != draft_before:
        raise ValueError(f"--sapo-run {run} trained draft {base!r}, but the --sapo-preset recipe starts from "
                         f"{draft_before!r}: before and after would compare different drafts")
    if trajectories and used and Path(trajectories).resolve() != Path(used).resolve():
        raise ValueError(f"--sapo-run {run} trained on {used}, not on --trajectories {trajectories}")
    if "grpo_steps" not in summary:
        raise ValueError(f"--sapo-run {run}: its summary.json has no grpo_steps (the run did not finish GRPO)")
    return str(draft_dir), summary, used or trajectories


def _samples_per_s(args, trajectories: str) -> dict:
    out = {"samples_per_s_1_worker": None, "samples_per_s_2_workers": None}
    if args.throughput_steps <= 0:
        out["samples_per_s_note"] = "not measured (--throughput-steps 0)"
        return out
    for workers in (1, 2):
        key = "samples_per_s_1_worker" if workers == 1 else "samples_per_s_2_workers"
        _, summary = _sapo(args, trajectories, f"{workers}w", [
            f"distributed.workers={workers}", f"distributed.worker_cpus={THROUGHPUT_WORKER_CPUS}",
            "warm_start.enabled=false", f"grpo.steps={args.throughput_steps}"])
        out[key] = summary.get("grpo_samples_per_s")
        if out[key] is None:
            out["samples_per_s_note"] = "the SAPO run's summary.json has no grpo_samples_per_s"
    return out


def _not_larger(after, before) -> bool:
    """A length target: met only when both figures exist (a missing one is no evidence)."""
    return after is not None and before is not None and after <= before


def run(args) -> dict:
    from pipelines.config import load_config
    from pipelines.schema import SapoConfig

    draft = load_config(SapoConfig, "sapo", [args.sapo_preset]).draft.name  # the recipe's draft, before training
    walls: dict[str, float] = {}
    out: dict = {"held_out_offset": args.offset, "num_problems": args.num_problems, "method": LR_METHOD,
                 "max_new_tokens": args.max_new_tokens, "step_max_tokens": args.step_max_tokens,
                 "verifier": args.verifier, "threshold": args.threshold,
                 "sapo_preset": args.sapo_preset, "draft_before": draft}

    t0 = stage("sapo", "1/5 collecting the target's trajectories on training problems")
    reused = _reuse_sapo_run(args.sapo_run, draft, args.trajectories) if args.sapo_run else None
    if reused:
        trajectories, collected = reused[2], {"reused": True}
    elif args.trajectories:
        trajectories, collected = args.trajectories, {"reused": True}
    else:
        trajectories, collected = _collect(args)
    walls["collect_s"] = time.perf_counter() - t0
    out.update(trajectories=trajectories, train_problems=collected.get("num_problems"),
               train_offset=args.train_offset, collect=collected)

    t0 = stage("sapo", f"2/5 evaluating ar and {LR_METHOD} with the untrained draft on held-out problems")
    before = _evaluate(args, draft, "before")
    walls["evaluate_before_s"] = time.perf_counter() - t0

    t0 = stage("sapo", "3/5 SAPO: warm start + GRPO" + (f" (reusing {args.sapo_run})" if reused else ""))
    draft_dir, sapo_summary = reused[:2] if reused else _sapo(args, trajectories, "train", [])
    walls["sapo_s"] = time.perf_counter() - t0
    out["sapo_run_reused"] = args.sapo_run if reused else None

    t0 = stage("sapo", f"4/5 evaluating ar and {LR_METHOD} with the SAPO draft on the same problems")
    after = _evaluate(args, draft_dir, "after")
    walls["evaluate_after_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_dir = Path(draft_dir).parent / "warm_start"
    warm = _evaluate(args, str(warm_dir), "warm-start") if (warm_dir / "config.json").is_file() else None
    walls["evaluate_warm_start_s"] = time.perf_counter() - t0

    t0 = stage("sapo", "5/5 GRPO throughput with 1 and 2 workers")
    throughput = _samples_per_s(args, trajectories)
    walls["throughput_s"] = time.perf_counter() - t0

    out.update(
        accept_rate_before=before["step_accept_rate"], accept_rate_after=after["step_accept_rate"],
        accept_gain_points=100 * (after["step_accept_rate"] - before["step_accept_rate"]),
        tokens_per_draft_step_before=before["tokens_per_draft_step"],
        tokens_per_draft_step_after=after["tokens_per_draft_step"],
        lr_tokens_per_draft_step_before=before["lr_tokens_per_draft_step"],
        lr_tokens_per_draft_step_after=after["lr_tokens_per_draft_step"],
        draft_tokens_per_request_before=before["draft_tokens_per_request"],
        draft_tokens_per_request_after=after["draft_tokens_per_request"],
        lr_speedup_before=before["speedup"], lr_speedup_after=after["speedup"], **throughput,
        # the speedup with every step accepted (tokens at the draft's measured pace): a ceiling for lr_speedup
        draft_bound_speedup_before=before["draft_bound_speedup"], draft_bound_speedup_after=after["draft_bound_speedup"],
        draft_token_share_before=before["draft_token_share"], draft_token_share_after=after["draft_token_share"],
        token_agreement_before=before["token_agreement"], token_agreement_after=after["token_agreement"],
        accept_rate_warm_start=warm and warm["step_accept_rate"],
        tokens_per_draft_step_warm_start=warm and warm["tokens_per_draft_step"],
        sft_gain_points=warm and 100 * (warm["step_accept_rate"] - before["step_accept_rate"]),
        grpo_gain_points=warm and 100 * (after["step_accept_rate"] - warm["step_accept_rate"]),
        **{f"{key}_{tag}": run.get(key) for key in ("step_match_rate", "draft_step_tokens")
           for tag, run in (("before", before), ("after", after), ("warm_start", warm or {}))},
        target_step_tokens=before.get("target_step_tokens"))
    out["targets_met"] = {
        "accept_gain_points_ge_15": out["accept_gain_points"] >= 15,
        "tokens_per_draft_step_not_larger": _not_larger(out["tokens_per_draft_step_after"],
                                                        out["tokens_per_draft_step_before"]),
        "lr_speedup_after_ge_1.3": out["lr_speedup_after"] >= 1.3,
        # the same question on the target's path (greedy steps from the target's prefixes, see step_agreement)
        "draft_step_tokens_not_larger": _not_larger(out["draft_step_tokens_after"], out["draft_step_tokens_before"])}
    out.update(before=before, after=after, warm_start=warm, draft_after=draft_dir,
               sapo={k: sapo_summary.get(k) for k in ("trajectories", "warm_start_loss", "grpo_steps", "grpo_loss",
                                                      "rewards", "grpo_samples_per_s")},
               stage_wall_s=walls)
    return out
