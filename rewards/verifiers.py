"""Step verifiers: `verify(items) -> verdicts`, batched, async.

An item holds the problem, the committed answer so far (context), the target's own step from the same prefix
(None when the verifier does not need it) and the draft step. Verifiers:
- `exact`: normalised exact match (lower-case, whitespace removed); `text` / `tokens` modes are stricter;
- `embedding`: cosine of all-MiniLM-L6-v2 sentence embeddings > threshold;
- `judge`: an LLM asked whether two steps convey the same meaning and results, answer pre-filled with "[";
  accept iff p("aligned") > p("unaligned") (one prefill, one token);
- `tbvm`: DREAM-R's threshold test: ask whether the draft step is a correct next step; accept iff
  p_pos / (p_pos + p_neg) > alpha (default 0.7); needs no target step, so it runs beside the target;
- `score`: SpecReason: the model scores the draft step 0-9; accept iff the most likely digit >= min_score (7);
- `random`: accept with probability p (seeded); `always`: accept everything.
Every model verifier is wrapped so that a normalised exact match accepts without a model call.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional


@dataclass
class Item:
    question: str
    context: str  # the committed answer so far
    draft_text: str
    draft_ids: list[int]
    target_text: Optional[str] = None
    target_ids: Optional[list[int]] = None


@dataclass
class Verdict:
    accept: bool
    score: float
    reason: str = "verified"


class VerifierError(ValueError):
    pass


def normalise(text: str) -> str:
    return re.sub(r"\s+", "", text.lower())


class Verifier:
    needs_target_step = True
    calls = 0

    async def verify(self, items: list[Item]) -> list[Verdict]:
        raise NotImplementedError


class Exact(Verifier):
    def __init__(self, mode: str = "normalized"):
        if mode not in ("normalized", "text", "tokens"):
            raise VerifierError(f"exact verifier mode {mode!r}: use normalized, text or tokens")
        self.mode = mode

    def match(self, item: Item) -> bool:
        if self.mode == "tokens":
            return item.draft_ids == item.target_ids
        if self.mode == "text":
            return item.draft_text == item.target_text
        return normalise(item.draft_text) == normalise(item.target_text)

    async def verify(self, items):
        return [Verdict(m, float(m), "exact") for m in map(self.match, items)]


class Always(Verifier):
    needs_target_step = False

    async def verify(self, items):
        return [Verdict(True, 1.0) for _ in items]


class RandomAccept(Verifier):
    needs_target_step = False

    def __init__(self, p: float, seed: int = 0):
        if not 0 <= p <= 1:
            raise VerifierError(f"random verifier p={p} must be in [0, 1]")
        self.p, self.rng = p, random.Random(seed)

    async def verify(self, items):
        out = []
        for _ in items:
            u = self.rng.random()
            out.append(Verdict(u < self.p, u))
        return out


class ShortCircuit(Verifier):
    """Normalised exact match first; the model verifier only sees the rest."""

    def __init__(self, inner: Verifier):
        self.inner = inner
        self.needs_target_step = inner.needs_target_step
        self.exact = Exact("normalized")

    async def verify(self, items):
        verdicts: list[Optional[Verdict]] = [None] * len(items)
        rest = []
        for i, item in enumerate(items):
            if item.target_text is not None and self.exact.match(item):
                verdicts[i] = Verdict(True, 1.0, "exact")
            else:
                rest.append(i)
        if rest:
            for i, v in zip(rest, await self.inner.verify([items[i] for i in rest])):
                verdicts[i] = v
        return verdicts

    @property
    def calls(self):
        return self.inner.calls


class Embedding(Verifier):
    def __init__(self, encoder_client, threshold: float = 0.85):
        self.encoder, self.threshold = encoder_client, threshold

    async def verify(self, items):
        self.calls += 1
        texts = [t for it in items for t in (it.target_text, it.draft_text)]
        sims = await self.encoder.similarity_pairs(texts)
        return [Verdict(s > self.threshold, s) for s in sims]


class _PromptVerifier(Verifier):
    """Verifiers that read next-token probabilities of answer words from a chat model."""

    def __init__(self, client, tokenizer, system: str):
        self.client, self.tok, self.system = client, tokenizer, system

    def _ids(self, user: str, prefill: str) -> list[int]:
        if self.tok.chat_template:
            msgs = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
            ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = self.tok(f"{self.system}\n\n{user}\n\nAnswer: ").input_ids
        return ids + (self.tok(prefill, add_special_tokens=False).input_ids if prefill else [])

    def _word_ids(self, words: list[str]) -> list[int]:
        ids = []
        for w in words:
            for variant in (w, " " + w):
                toks = self.tok(variant, add_special_tokens=False).input_ids
                if toks and toks[0] not in ids:
                    ids.append(toks[0])
        return ids

    async def _mass(self, prompts: list[list[int]], groups: list[list[int]]) -> list[list[float]]:
        self.calls += 1
        flat = [t for g in groups for t in g]
        probs = await self.client.next_token_probs(prompts, flat)
        out = []
        for row in probs:
            masses, i = [], 0
            for g in groups:
                masses.append(sum(row[i:i + len(g)]))
                i += len(g)
            out.append(masses)
        return out


JUDGE_SYSTEM = ("You compare two reasoning steps written for the same problem at the same point. Decide whether "
                "they convey the same meaning and the same calculation results.")


class Judge(_PromptVerifier):
    def __init__(self, client, tokenizer):
        super().__init__(client, tokenizer, JUDGE_SYSTEM)
        self.groups = [self._word_ids(["aligned"]), self._word_ids(["unaligned"])]

    async def verify(self, items):
        prompts = [self._ids(f"Problem: {it.question}\n\nStep A: {it.target_text.strip()}\n\nStep B: "
                             f"{it.draft_text.strip()}\n\nDo A and B convey the same meaning and calculation "
                             "results? Answer [aligned] or [unaligned].", "[") for it in items]
        out = []
        for pos, neg in await self._mass(prompts, self.groups):
            score = pos / max(pos + neg, 1e-30)
            out.append(Verdict(pos > neg, score))
        return out


TBVM_SYSTEM = "You check reasoning. Reply with one word: yes or no."


class TBVM(_PromptVerifier):
    needs_target_step = False

    def __init__(self, client, tokenizer, alpha: float = 0.7, positive=("yes", "Yes"), negative=("no", "No"),
                 system: str = TBVM_SYSTEM, ratio: bool = True,
                 question: str = "Problem: {question}\n\nSolution so far:\n{context}\n\nProposed next step:\n{step}\n\n"
                                 "Is the proposed next step correct and a sensible continuation? Answer yes or no."):
        if not 0 < alpha < 1:
            raise VerifierError(f"tbvm alpha={alpha} must be in (0, 1)")
        super().__init__(client, tokenizer, system)
        self.alpha, self.question, self.ratio = alpha, question, ratio
        self.groups = [self._word_ids(list(positive)), self._word_ids(list(negative))]
        if set(self.groups[0]) & set(self.groups[1]):
            raise VerifierError("tbvm positive and negative words share a first token")

    async def verify(self, items):
        prompts = [self._ids(self.question.format(question=it.question, context=it.context.strip() or "(empty)",
                                                  step=it.draft_text.strip()), "") for it in items]
        out = []
        for pos, neg in await self._mass(prompts, self.groups):
            # contrastive normalisation: only the two answers count (ratio=False: the raw p(yes), the ablation)
            score = pos / max(pos + neg, 1e-30) if self.ratio else pos
            out.append(Verdict(score > self.alpha, score))
        return out


class Score(_PromptVerifier):
    needs_target_step = False

    def __init__(self, client, tokenizer, threshold: int = 7):
        super().__init__(client, tokenizer, "You grade reasoning steps from 0 (wrong) to 9 (certainly right).")
        self.threshold = threshold
        self.groups = [self._word_ids([str(d)]) for d in range(10)]

    async def verify(self, items):
        prompts = [self._ids(f"Problem: {it.question}\n\nSolution so far:\n{it.context.strip() or '(empty)'}\n\n"
                             f"Next step:\n{it.draft_text.strip()}\n\nScore the next step from 0 to 9. Score: ", "")
                   for it in items]
        out = []
        for masses in await self._mass(prompts, self.groups):
            best = max(range(10), key=lambda d: masses[d])
            out.append(Verdict(best >= self.threshold, float(best)))
        return out


KINDS = ("exact", "embedding", "judge", "tbvm", "score", "random", "always")
