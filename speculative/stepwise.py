"""Step-by-step generation on a target actor: the shape every step-level method shares.

A step is one generation that stops at the delimiter (kept in the text) or at `step_max_tokens`; steps are
committed as token ids (never re-tokenized text), so the committed answer is exactly what the model wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.engine import Counters, Request, Sampling


@dataclass
class Step:
    text: str
    token_ids: list[int]
    finish_reason: str
    origin: str = "target"


@dataclass
class Answer:
    steps: list[Step] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    finish_reason: str = "length"

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.steps for t in s.token_ids]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)


def step_request(prefix: list[int], gen, remaining: int, seed_offset: int = 0) -> Request:
    s = gen.sampling
    return Request(prompt_ids=list(prefix), max_new_tokens=min(gen.step_max_tokens, remaining),
                   stop=(gen.step_delimiter,), sampling=Sampling(s.temperature, s.top_p, s.top_k, s.seed + seed_offset))


async def generate_steps(target, prompt_ids: list[int], gen) -> Answer:
    """Autoregressive answer, one step request at a time (`target` is an EngineHost actor handle)."""
    answer = Answer()
    while True:
        remaining = gen.max_new_tokens - len(answer.token_ids)
        [res] = await target.generate.remote([step_request(prompt_ids + answer.token_ids, gen, remaining,
                                                           len(answer.steps))])
        answer.steps.append(Step(res.text, res.token_ids, res.finish_reason))
        answer.counters.add(res.counters)
        if res.finish_reason == "eos":
            answer.finish_reason = "eos"
            return answer
        if len(answer.token_ids) >= gen.max_new_tokens:
            answer.finish_reason = "length"
            return answer
