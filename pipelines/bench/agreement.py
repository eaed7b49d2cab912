"""How closely a draft follows the target on the target's own path (the SAPO benchmark's measurements).

    python -m pipelines.bench.agreement HELD_OUT/trajectories.jsonl DRAFT [DRAFT ...] --out FILE.json

`token_agreement`: teacher-forced, the share of the target's answer tokens the draft's argmax predicts.
`step_agreement`: the draft's greedy step from every prefix the target wrote, judged against the target's next step
by a step verifier, and the length of the draft's steps as a lookahead window drafts them.
"""

from __future__ import annotations

import json
from pathlib import Path


def token_agreement(model, tok, trajectories: list[dict]) -> dict:
    """Teacher-forced: the share of the target's answer tokens (`trajectories` rows: prompt ids and each step's token
    ids, e.g. the `ar` traces of an evaluation) that the draft's argmax predicts from the same prefix, and the
    draft's mean NLL of them."""
    import torch

    hits = tokens = 0
    nll = 0.0
    with torch.no_grad():
        for row in trajectories:
            prompt = list(row["prompt_ids"])
            answer = [t for step in row["step_token_ids"] for t in step]
            if not answer:
                continue
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].float()
            target = torch.tensor(answer)
            hits += (logits.argmax(-1) == target).sum().item()
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            tokens += len(answer)
    return {"token_agreement": hits / max(tokens, 1), "token_nll": nll / max(tokens, 1), "tokens": tokens}


def step_agreement(model, tok, trajectories: list[dict], verifier, step_max_tokens: int, delimiter: str = "\n\n",
                   batch: int = 16, window: int = 1) -> dict:
    """On the target's own path: the draft's greedy step from every prefix the target wrote (the problem and the
    target's steps before d; `trajectories` rows as pipelines.collect writes them), judged by `verifier` against the
    target's step d. Free of what lr_async's own path adds (prefixes the draft wrote, requests cut by the answer's
    remaining budget, cancelled subtrees), so it measures what SAPO trains: the share of matching steps and the
    length of the draft's steps (`draft_step_tokens`: tokens up to and including the delimiter, EOS not counted).

    With window > 1 it goes on drafting from the draft's own steps as a lookahead window does (window steps in a
    row from each prefix, stopping at EOS), each step capped at step_max_tokens and none at an answer's budget:
    `window_step_tokens` is the mean length of all of them (`_by_depth`: of each position in the window)."""
    import asyncio

    from pipelines.sapo_train import generate_steps, step_rows
    from rewards.verifiers import Item

    rows = step_rows(trajectories, tok)
    paths, live, first, by_depth = [list(r["prompt_ids"]) for r in rows], list(range(len(rows))), [], []
    for depth in range(window):
        if not live:
            break
        steps = []
        for b in range(0, len(live), batch):
            steps += generate_steps(model, tok, [paths[i] for i in live[b:b + batch]], delimiter, {tok.eos_token_id},
                                    max_new_tokens=step_max_tokens, do_sample=False)
        first = first or steps
        by_depth.append([len(s) - (bool(s) and s[-1] == tok.eos_token_id) for s in steps])
        for i, s in zip(live, steps):
            paths[i] += s
        live = [i for i, s in zip(live, steps) if s and s[-1] != tok.eos_token_id]
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in first]
    verdicts = asyncio.run(verifier.verify(
        [Item("", "", s, [], r["target_steps"][0], []) for r, s in zip(rows, texts)])) if rows else []
    n = max(len(rows), 1)
    sizes = [x for d in by_depth for x in d]
    return {"step_match_rate": sum(v.accept for v in verdicts) / n,
            "draft_step_tokens": sum(by_depth[0]) / n if by_depth else 0.0,
            "target_step_tokens": sum(r["target_step_tokens"] for r in rows) / n, "steps": len(rows),
            "window_step_tokens": sum(sizes) / max(len(sizes), 1), "window_steps": len(sizes),
            "window_step_tokens_by_depth": [sum(d) / len(d) for d in by_depth]}


def draft_step_agreement(model, tok, trajectories: list[dict], threshold: float, step_max_tokens: int,
                          delimiter: str, window: int = 1, match: bool = True) -> dict:
    """`step_agreement` of a loaded draft with the embedding verifier (MiniLM cosine > threshold); with match=False
    only the step lengths (no encoder is loaded and no step_match_rate is reported)."""
    from rewards.verifiers import Embedding, Exact

    if match:
        from actors.encoder import EncoderHost

        verifier = Embedding(EncoderHost(), threshold)
    else:
        verifier = Exact("normalized")
    out = step_agreement(model, tok, trajectories, verifier, step_max_tokens, delimiter, window=window)
    if not match:
        out.pop("step_match_rate")
    return out


def main(argv: list[str] | None = None) -> dict:
    """`python -m pipelines.bench.agreement TRAJECTORIES DRAFT [DRAFT ...] [--out FILE.json]`: `step_agreement` of each
    draft (a zoo name, a SAPO run's draft, warm_start or GRPO checkpoint directory) on a collect run's trajectories
    (e.g. held-out problems) with the embedding verifier; prints one JSON line per draft and saves them all."""
    import argparse

    from actors import zoo
    from pipelines.config import load_config
    from pipelines.schema import SapoConfig
    from pipelines.sapo import load_trajectories

    parser = argparse.ArgumentParser(prog="python -m pipelines.bench.agreement", description=main.__doc__)
    parser.add_argument("trajectories", help="trajectories.jsonl of a pipelines.collect run")
    parser.add_argument("drafts", nargs="+")
    parser.add_argument("--threshold", type=float, default=0.9, help="embedding cosine threshold")
    parser.add_argument("--step-max-tokens", type=int, default=100, help="cap on one draft step")
    parser.add_argument("--window", type=int, default=3,
                        help="draft steps in a row from each prefix for window_step_tokens (lookahead gamma)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    results = {}
    for draft in args.drafts:
        cfg = load_config(SapoConfig, "sapo", [f"trajectories={args.trajectories}", f"draft.name={draft}"])
        model, tok = zoo.load_model(draft, device="cpu")
        rows = load_trajectories(cfg, tok)
        results[draft] = draft_step_agreement(model, tok, rows, args.threshold, args.step_max_tokens,
                                               cfg.step_delimiter, window=args.window)
        print(json.dumps({"draft": draft, **results[draft]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
