"""SAPO's reward terms (DREAM-R): alignment with the target, conciseness, outcome.

R = w_align * R_align + w_length * R_length + w_outcome * R_outcome  (weights 1:1:1 by default; they must not
sum to zero). Each term is in [0, 1] and is returned separately so that trainers can log them one by one.

- R_align: the rollout is split into steps at the delimiter (a blank step joins its neighbour: `split_steps`);
  step i is compared by the configured verifier with the target's step from the same prefix. `offline` uses the
  cached target trajectory (its step i, meaningful while the rollout follows the trajectory; a step past its end
  is rejected); `online` asks the target for its step from every rollout prefix
  (one batched call per group of rollouts). `share` rewards the share of accepted steps; `prefix` rewards the
  accepted prefix (steps before the first rejection), which is what speeds up decoding.
- R_length, form `step` (default): min(1, S_target / S_rollout) with S the mean tokens per step (the rollout's
  unfinished last step counts as a step): 1 when the rollout's steps are no longer than the target trajectory's,
  falling as 1/x when longer. This is what the draft's tokens per step (and so its cost per step) answer to, and
  it is defined on rollouts cut at GRPO's completion cap. Form `answer`: min(1, L_target / L_rollout) over whole
  answers in tokens (a token budget replaces L_target when no trajectory is cached); it only has a signal when
  rollouts may run as long as the target's answers (a rollout cut below the answer's length always scores 1).
- R_outcome: 1 if the rollout's final answer is correct (math-verify), else 0. Only a rollout that should end the
  answer is scored: a whole answer, or at the step unit a step drafted from the prefix before the target's final
  step; a middle step has no final answer (its last number is not one) and gets None, which TRL leaves out of the
  sum and of the component's mean.
A rollout with no step (empty or blank) scores 0 on R_align and R_length.
"""

from __future__ import annotations

from rewards.answers import extract_answer, is_correct
from rewards.verifiers import Item, Verifier


class RewardConfigError(ValueError):
    pass


def split_steps(text: str, delimiter: str) -> list[str]:
    """Steps keep their delimiter (as the engine's step generations do). A blank step (whitespace only: an extra
    delimiter) is no step: its text joins the step before it (or, at the start, the next one), so the steps still
    concatenate to the text and an empty delimiter cannot earn alignment or conciseness."""
    parts = text.split(delimiter)
    steps, pending = [], ""
    for j, part in enumerate(parts):
        piece = part + (delimiter if j < len(parts) - 1 else "")
        if part.strip():
            steps.append(pending + piece)
            pending = ""
        elif steps:
            steps[-1] += piece
        else:
            pending += piece
    return steps


def length_reward(rollout_tokens: int, reference_tokens: int) -> float:
    if rollout_tokens <= 0:
        return 0.0
    return min(1.0, reference_tokens / rollout_tokens)


def step_length_reward(rollout_tokens: int, rollout_steps: int, reference_tokens_per_step: float) -> float:
    if rollout_tokens <= 0 or rollout_steps <= 0:
        return 0.0
    return min(1.0, reference_tokens_per_step * rollout_steps / rollout_tokens)


def outcome_reward(text: str, answer: str | None) -> float:
    return float(answer is not None and is_correct(extract_answer(text), answer))


def align_score(verdicts: list[bool], form: str) -> float:
    if not verdicts:
        return 0.0
    if form == "share":
        return sum(verdicts) / len(verdicts)
    if form == "prefix":
        accepted = next((i for i, v in enumerate(verdicts) if not v), len(verdicts))
        return accepted / len(verdicts)
    raise RewardConfigError(f"unknown alignment form {form!r}: use share or prefix")


async def offline_align(verifier: Verifier, question: str, rollouts: list[str], target_steps: list[str],
                        delimiter: str, form: str = "share") -> list[float]:
    """R_align against the cached target trajectory: rollout step i vs target step i (one batched verify)."""
    items, owners = [], []
    per_rollout = [split_steps(r, delimiter) for r in rollouts]
    grouped: list[list[bool]] = [[] for _ in rollouts]
    for r, steps in enumerate(per_rollout):
        context = ""
        for i, step in enumerate(steps[:len(target_steps)]):
            items.append(Item(question, context, step, [], target_steps[i], []))
            owners.append((r, i))
            context += step
        grouped[r] = [False] * len(steps)  # a step past the trajectory's end has nothing to match: rejected
    verdicts = await verifier.verify(items) if items else []
    for (r, i), v in zip(owners, verdicts):
        grouped[r][i] = v.accept
    return [align_score(g, form) for g in grouped]


async def online_align(verifier: Verifier, target, tokenizer, question: str, prompt_ids: list[int],
                       rollouts: list[str], delimiter: str, step_max_tokens: int, form: str = "share") -> list[float]:
    """R_align against the target's own step from every rollout prefix: one batched call for the whole group.
    `target` is a host client (`generate(requests) -> results`)."""
    from actors.engine import Request

    per_rollout = [split_steps(r, delimiter) for r in rollouts]
    requests, where = [], []
    for r, steps in enumerate(per_rollout):
        for i in range(len(steps)):
            prefix = prompt_ids + (tokenizer("".join(steps[:i]), add_special_tokens=False).input_ids if i else [])
            requests.append(Request(prefix, max_new_tokens=step_max_tokens, stop=(delimiter,)))
            where.append((r, i))
    results = await target.generate(requests) if requests else []
    items = [Item(question, "".join(per_rollout[r][:i]), per_rollout[r][i], [], res.text, res.token_ids)
             for (r, i), res in zip(where, results)]
    verdicts = await verifier.verify(items) if items else []
    grouped: list[list[bool]] = [[] for _ in rollouts]
    for (r, _), v in zip(where, verdicts):
        grouped[r].append(v.accept)
    return [align_score(g, form) for g in grouped]
