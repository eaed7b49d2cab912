"""Collect the target's full answers for a dataset, split into steps, with correctness.

    python -m pipelines.collect                      # demo preset: SmolLM2-135M on 4 GSM-style problems
    python -m pipelines.collect tiny                 # tests: a random 2-layer Llama
    python -m pipelines.collect data.num_problems=20 generation.max_new_tokens=512
    python -m pipelines.collect run.resume=runs/collect/<dir>      # finish an interrupted run
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipelines.collect

Writes <run_dir>/trajectories.jsonl (loadable with `datasets.load_dataset("json", data_files=...)`),
summary.json and the resolved config; logs to W&B (offline unless WANDB_API_KEY or WANDB_MODE is set).
"""

from __future__ import annotations

import asyncio
import time

from tqdm import tqdm

from actors import zoo
from actors.hosts import init_ray, split_threads, start_host
from rewards.answers import extract_answer, is_correct
from pipelines.cli import run_cli
from pipelines.schema import CollectConfig
from pipelines.evaluate import check_backend, settings_for_generation
from pipelines.data import load_problems, prompt_ids
from pipelines.runs import RunDir, append_jsonl, make_run_dir, read_jsonl, save_config, write_json
from pipelines.tracking import Tracker
from speculative.clients import HostClient
from speculative.controllers import Controller


async def _collect(cfg: CollectConfig, target, tokenizer, problems, run: RunDir, tracker: Tracker) -> list[dict]:
    out = run / "trajectories.jsonl"
    controller = Controller(settings_for_generation("ar", cfg.generation), HostClient(target))
    done = {row["id"]: row for row in read_jsonl(out)}
    todo = [p for p in problems if p.id not in done]
    if done:
        print(f"resuming: {len(done)} problems already in {out}, {len(todo)} to go")
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc="collect", unit="problem")
    slots = asyncio.Semaphore(cfg.problems_in_flight)

    async def one(problem):
        async with slots:
            prompt = prompt_ids(tokenizer, problem, cfg.data)
            answer = await controller.run(problem.id, problem.question, prompt)
        wall_s = answer.wall_s
        predicted = extract_answer(answer.text)
        row = {
            "id": problem.id, "question": problem.question, "answer": problem.answer,
            "prompt_ids": prompt, "response": answer.text, "steps": [s.text for s in answer.steps],
            "step_token_ids": [s.token_ids for s in answer.steps], "num_tokens": len(answer.token_ids),
            "finish_reason": answer.finish_reason, "predicted": predicted,
            "correct": None if problem.answer is None else is_correct(predicted, problem.answer),
            "wall_s": wall_s, "prefill_tokens": answer.prefill_tokens, "forward_passes": answer.token_passes,
        }
        append_jsonl(out, row)
        run.sync(every_s=cfg.run.sync_s)  # a resumed run, on any node, skips what storage holds
        done[problem.id] = row
        tracker.log({"problem/num_tokens": row["num_tokens"], "problem/num_steps": len(row["steps"]),
                     "problem/tokens_per_s": row["num_tokens"] / max(wall_s, 1e-9),
                     "problem/correct": float(bool(row["correct"])), "problems_done": len(done)})
        bar.update()

    await asyncio.gather(*(one(p) for p in todo))
    bar.close()
    return [done[p.id] for p in problems]


def summarize(rows: list[dict], prompt_tokens: int, wall_s: float) -> dict:
    n = len(rows)
    graded = [r for r in rows if r["correct"] is not None]
    tokens = sum(r["num_tokens"] for r in rows)
    steps = [len(r["steps"]) for r in rows]
    return {
        "num_problems": n,
        "accuracy": sum(bool(r["correct"]) for r in graded) / len(graded) if graded else None,
        "mean_tokens": tokens / n if n else 0,
        "mean_steps": sum(steps) / n if n else 0,
        "mean_step_tokens": tokens / max(sum(steps), 1),
        "tokens_per_s": tokens / max(wall_s, 1e-9),  # throughput with problems_in_flight at once
        "wall_s": wall_s,
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in rows) for k in ("eos", "length")},
        # every prompt and answer token prefilled once = 1.0; per-step re-prefill would be ~ number of steps
        "prefill_tokens_ratio": sum(r["prefill_tokens"] for r in rows) / max(prompt_tokens + tokens, 1),
    }


def preflight(cfg: CollectConfig):
    """Everything that can be wrong before a run directory exists or a model loads: the problems, the model."""
    problems = load_problems(cfg.data).items
    zoo.check_model(cfg.target.model.name)
    check_backend("target", cfg.target, cfg.ray)
    return problems, zoo.load_tokenizer(cfg.target.model.name, cfg.target.model.trust_remote_code)


def run(cfg: CollectConfig, run_dir: RunDir | None = None) -> RunDir:
    """The run directory (`.location` in storage: `trajectories=<location>/trajectories.jsonl` for SAPO)."""
    problems, tokenizer = preflight(cfg)
    run_dir = run_dir or make_run_dir(cfg, "collect")
    resolved = save_config(cfg, run_dir, "collect")
    tracker = Tracker(cfg.wandb, run_dir.path, "collect", resolved)
    init_ray(cfg.ray)
    target = start_host("target", split_threads([cfg.target], cfg.ray)[0])
    t0 = time.perf_counter()
    rows = asyncio.run(_collect(cfg, target, tokenizer, problems, run_dir, tracker))
    prompt_tokens = sum(len(r["prompt_ids"]) for r in rows)
    summary = summarize(rows, prompt_tokens, time.perf_counter() - t0)
    write_json(run_dir / "summary.json", summary)
    tracker.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})
    tracker.table("trajectories", ["id", "correct", "num_tokens", "num_steps", "response"],
                  [[r["id"], r["correct"], r["num_tokens"], len(r["steps"]), r["response"]] for r in rows])
    tracker.finish()
    run_dir.sync()
    print(f"collect: {summary['num_problems']} problems, accuracy {summary['accuracy']}, "
          f"{summary['tokens_per_s']:.1f} tokens/s -> {run_dir.location}")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    run_cli("collect", run, argv)


if __name__ == "__main__":
    main()
