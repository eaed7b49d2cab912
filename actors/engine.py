"""The generation engine: one causal LM (+ an optional draft LM or n-gram lookup for token-level SD).

`Engine.generate(requests)` runs requests to completion; `submit` / `step` / `cancel` let an async actor feed it
continuously (continuous batching: a request joins the running batch after its prefill). Every step:
1. new requests are prefilled, each from the longest cached prefix of its tokens (see `actors.runner`);
2. plain requests decode one token each in one batched forward;
3. speculative requests get k proposals (the draft model, batched, k cheap passes; or an n-gram match in their
   own tokens) and the target scores all of them in one batched forward; the longest agreeing prefix plus one
   target token is kept. Greedy: a proposal is kept iff it equals the target's argmax, so the output is
   token-identical to plain greedy. Sampling: standard speculative sampling (accept with min(1, p/q), else
   resample from max(p - q, 0)), which leaves the target's distribution unchanged.
Counters per result follow vLLM's names: drafted and accepted tokens (acceptance rate = accepted / drafted).

Memory: with `kv_budget_bytes`, each model's KV buffers (running sequences and the prefix cache, counted from the
allocated buffers) stay within the budget: a pending request is admitted, in order, once its buffer fits (finished
sequences are evicted from the prefix cache first), so requests wait instead of running the host out of memory; a
request that could never fit is refused at `submit` with an EngineError naming the budget. A request's buffer is
sized at admission for its prompt, its max_new_tokens and one speculation pass, so it does not grow while it runs.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from actors.runner import KVSeq, ModelRunner


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None


@dataclass
class Speculation:
    method: str = "none"  # none | draft | ngram
    num_tokens: int = 4
    ngram_max: int = 3
    ngram_min: int = 1


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    speculation: Optional[Speculation] = None  # None: the engine's default
    candidate_ids: Optional[list[int]] = None  # next_token_probs: no generation, return these tokens' probs
    request_id: str = ""


@dataclass
class Counters:
    forward_passes: int = 0  # target forwards that included this request
    draft_forward_passes: int = 0
    prefill_tokens: int = 0  # prompt tokens actually run (cached prefixes excluded)
    decode_tokens: int = 0  # tokens generated
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: "Counters") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class Result:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # stop | length | eos | cancelled | probs
    counters: Counters
    probs: Optional[list[float]] = None


@dataclass(eq=False)
class _Live:
    req: Request
    seq: KVSeq
    draft_seq: Optional[KVSeq]
    spec: Speculation
    generator: Optional[torch.Generator]
    started: float
    generated: list[int] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None  # next-token logits, when known
    counters: Counters = field(default_factory=Counters)
    finish: Optional[str] = None
    probs: Optional[list[float]] = None  # next_token_probs requests


class EngineError(ValueError):
    pass


PREFILL_BATCH_MAX_TOKENS = 32  # uncached prompt tokens up to which requests share one padded prefill forward


class Engine:
    def __init__(self, model, tokenizer, draft_model=None, speculation: Speculation | None = None,
                 prefix_cache_tokens: int = 32768, max_batch: int = 16, kv_budget_bytes: int = 0):
        self.tokenizer = tokenizer
        self.target = ModelRunner(model, prefix_cache_tokens, kv_budget_bytes)
        self.draft = (ModelRunner(draft_model, prefix_cache_tokens, kv_budget_bytes) if draft_model is not None
                      else None)
        self.kv_waits = 0  # steps in which a pending request waited for KV memory
        self.speculation = speculation or Speculation()
        self.max_batch = max_batch
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pending: deque[Request] = deque()
        self.cancelled: set[str] = set()
        self.live: list[_Live] = []
        self._next_id = 0
        self._check_speculation(self.speculation)
        if self.draft is not None and draft_model.config.vocab_size != model.config.vocab_size:
            raise EngineError("the draft model's vocabulary differs from the target's: token-level SD needs "
                              "the same tokenizer")

    def _check_speculation(self, spec: Speculation) -> None:
        if spec.method not in ("none", "draft", "ngram"):
            raise EngineError(f"unknown speculation method {spec.method!r}")
        if spec.method == "draft" and self.draft is None:
            raise EngineError("speculation 'draft' needs a draft model in the engine")
        if spec.num_tokens < 1:
            raise EngineError("speculation num_tokens must be >= 1")

    # ------------------------------------------------------------ public API

    def submit(self, request: Request) -> str:
        if not request.request_id:
            request.request_id = f"r{self._next_id}"
            self._next_id += 1
        if not request.prompt_ids:
            raise EngineError("a request needs at least one prompt token")
        self._check_speculation(request.speculation or self.speculation)
        for runner, need in self._kv_needs(request):
            if runner.kv_budget_bytes and need > runner.kv_budget_bytes:
                raise EngineError(f"a request of {len(request.prompt_ids)} prompt + {request.max_new_tokens} new "
                                  f"tokens needs {need / 2**20:.2f} MiB of KV, over the engine's budget of "
                                  f"{runner.kv_budget_bytes / 2**20:.2f} MiB (engine.kv_budget_mb)")
        self.pending.append(request)
        return request.request_id

    def _kv_needs(self, req: Request) -> list[tuple[ModelRunner, int]]:
        """(runner, bytes) of the KV buffers admitting `req` allocates."""
        spec = req.speculation or self.speculation
        reserve = req.max_new_tokens + spec.num_tokens + 2
        needs = [(self.target, self.target.bytes_for(len(req.prompt_ids), reserve))]
        if spec.method == "draft":
            needs.append((self.draft, self.draft.bytes_for(len(req.prompt_ids), reserve)))
        return needs

    def _fits(self, req: Request) -> bool:
        return all(runner.make_room(need) for runner, need in self._kv_needs(req))

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def abort_all(self) -> None:
        """Drop every pending and live request and release their sequences (after a failed step)."""
        self.pending.clear()
        for lv in self.live:
            self.target.release(lv.seq)
            if lv.draft_seq is not None:
                self.draft.release(lv.draft_seq)
        self.live.clear()

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.live)

    def generate(self, requests: list[Request]) -> list[Result]:
        ids = [self.submit(r) for r in requests]
        done: dict[str, Result] = {}
        while len(done) < len(ids):
            for res in self.step():
                done[res.request_id] = res
        return [done[i] for i in ids]

    def next_token_probs(self, prefixes: list[list[int]], candidate_ids: list[int]) -> list[list[float]]:
        """Probability of each candidate token after each prefix (judges, TBVM)."""
        results = self.generate([Request(prompt_ids=p, candidate_ids=list(candidate_ids), max_new_tokens=0)
                                 for p in prefixes])
        return [r.probs for r in results]

    # ------------------------------------------------------------ one scheduler step

    def step(self) -> list[Result]:
        """Admit, prefill, decode or speculate once for every live request; return those that finished."""
        finished: list[Result] = []
        self._apply_cancellations(finished)
        admitted = []
        while self.pending and len(self.live) < self.max_batch:
            if not self._fits(self.pending[0]):  # waits (in order) until running requests free their KV
                self.kv_waits += 1
                break
            admitted.append(self._acquire(self.pending.popleft()))
            self.live.append(admitted[-1])  # live at once: abort_all releases it if a forward fails
        self._prefill(admitted)
        plain = [lv for lv in self.live if lv.spec.method == "none" and not lv.finish]
        for chunk in _chunks(plain, self.max_batch):
            self._decode(chunk)
        spec = [lv for lv in self.live if lv.spec.method != "none" and not lv.finish]
        for chunk in _chunks(spec, self.max_batch):
            self._speculate(chunk)
        for lv in [lv for lv in self.live if lv.finish]:
            self.live.remove(lv)
            finished.append(self._finish(lv))
        return finished

    def _apply_cancellations(self, finished: list[Result]) -> None:
        if not self.cancelled:
            return
        for req in [r for r in self.pending if r.request_id in self.cancelled]:
            self.pending.remove(req)
            finished.append(Result(req.request_id, [], "", "cancelled", Counters()))
        for lv in [lv for lv in self.live if lv.req.request_id in self.cancelled]:
            self.live.remove(lv)
            lv.finish = "cancelled"
            finished.append(self._finish(lv))
        self.cancelled.clear()

    def _acquire(self, req: Request) -> _Live:
        spec = req.speculation or self.speculation
        reserve = req.max_new_tokens + spec.num_tokens + 2
        seq = self.target.acquire(req.prompt_ids, reserve)
        draft_seq = self.draft.acquire(req.prompt_ids, reserve) if spec.method == "draft" else None
        gen = None
        if req.sampling.temperature > 0:
            # on the logits' device: torch.multinomial refuses a CPU generator for CUDA probabilities
            gen = torch.Generator(device=self.target.device)
            gen.manual_seed(req.sampling.seed if req.sampling.seed is not None else 0)
        return _Live(req, seq, draft_seq, spec, gen, time.perf_counter())

    def _prefill(self, admitted: list[_Live]) -> None:
        """Run the uncached prompt tokens; short ones (e.g. branches off a shared committed prefix) go in one
        padded forward, long ones alone. Probes (next_token_probs) and max_new_tokens=0 finish here."""
        short = [lv for lv in admitted if len(lv.req.prompt_ids) - lv.seq.length <= PREFILL_BATCH_MAX_TOKENS]
        groups = [short] if short else []
        groups += [[lv] for lv in admitted if lv not in short]
        for group in groups:
            todo = [lv.req.prompt_ids[lv.seq.length:] for lv in group]
            logits = self.target.forward([lv.seq for lv in group], todo)
            for lv, t, lg in zip(group, todo, logits):
                lv.logits = lg
                lv.counters.prefill_tokens += len(t)
                lv.counters.forward_passes += 1
                if lv.req.candidate_ids is not None:
                    lv.probs = torch.softmax(lg, -1)[torch.tensor(lv.req.candidate_ids)].tolist()
                    lv.finish = "probs"
                elif lv.req.max_new_tokens == 0:
                    lv.finish = "length"

    def _finish(self, lv: _Live) -> Result:
        self.target.release(lv.seq)
        if lv.draft_seq is not None:
            self.draft.release(lv.draft_seq)
        lv.counters.decode_tokens = len(lv.generated)
        lv.counters.seconds = time.perf_counter() - lv.started
        text_ids = [t for t in lv.generated if t not in self.eos_ids]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=False) if text_ids else ""
        return Result(lv.req.request_id, list(lv.generated), text, lv.finish, lv.counters, probs=lv.probs)

    # ------------------------------------------------------------ plain decoding

    def _decode(self, batch: list[_Live]) -> None:
        feed = []
        for lv in batch:
            tok = self._sample(lv, lv.logits)
            self._append(lv, [tok])
            if not lv.finish:
                feed.append((lv, tok))
        if not feed:
            return
        logits = self.target.forward([lv.seq for lv, _ in feed], [[tok] for _, tok in feed])
        for (lv, _), lg in zip(feed, logits):
            lv.logits = lg
            lv.counters.forward_passes += 1

    # ------------------------------------------------------------ token-level speculation

    def _speculate(self, batch: list[_Live]) -> None:
        # The first token comes from the target logits we already have; proposals follow it.
        firsts = []
        for lv in batch:
            tok = self._sample(lv, lv.logits)
            self._append(lv, [tok])
            firsts.append(tok)
        batch = [lv for lv in batch if not lv.finish]
        if not batch:
            return
        proposals, draft_probs = self._propose(batch)
        logits = self.target.forward([lv.seq for lv in batch],
                                     [[lv.generated[-1]] + props for lv, props in zip(batch, proposals)],
                                     all_logits=True)
        for lv, props, q_probs, lg in zip(batch, proposals, draft_probs, logits):
            lv.counters.forward_passes += 1
            lv.counters.drafted_tokens += len(props)
            accepted, next_logits = self._verify(lv, props, q_probs, lg)
            lv.counters.accepted_tokens += len(accepted)
            keep = lv.seq.length - len(props) + len(accepted)  # rejected proposals leave the cache
            self.target.truncate(lv.seq, keep)
            if lv.draft_seq is not None:
                self.draft.truncate(lv.draft_seq, keep)
            lv.logits = next_logits
            self._append(lv, accepted)

    def _propose(self, batch: list[_Live]):
        """k proposals per request; draft_probs[b][i] is the draft distribution of proposal i (None: one-hot)."""
        proposals: list[list[int]] = [[] for _ in batch]
        probs: list[list] = [[] for _ in batch]
        room = [min(lv.spec.num_tokens, lv.req.max_new_tokens - len(lv.generated)) for lv in batch]
        ngram = [b for b, lv in enumerate(batch) if lv.spec.method == "ngram"]
        for b in ngram:
            proposals[b] = _ngram_lookup(lv_tokens(batch[b]), batch[b].spec, room[b])
            probs[b] = [None] * len(proposals[b])
        drafted = [b for b, lv in enumerate(batch) if lv.spec.method == "draft" and room[b] > 0]
        if drafted:
            feeds = {b: lv_tokens(batch[b])[batch[b].draft_seq.length:] for b in drafted}
            for i in range(max(room[b] for b in drafted)):
                active = [b for b in drafted if room[b] > i]
                logits = self.draft.forward([batch[b].draft_seq for b in active], [feeds[b] for b in active])
                for b, lg in zip(active, logits):
                    lv = batch[b]
                    lv.counters.draft_forward_passes += 1
                    if lv.generator is None:
                        tok, q = int(lg.argmax()), None
                    else:
                        q = _warp(lg, lv.req.sampling).to(lv.generator.device)  # the draft may sit elsewhere
                        tok = int(torch.multinomial(q, 1, generator=lv.generator))
                    proposals[b].append(tok)
                    probs[b].append(q)
                    feeds[b] = [tok]
        return proposals, probs

    def _verify(self, lv: _Live, props: list[int], q_probs: list, logits_TV: torch.Tensor):
        """Accepted proposals and the target logits after the last accepted one. Row i of logits_TV is the
        target's next-token distribution after proposal i-1 (row 0: after the token before the proposals)."""
        accepted: list[int] = []
        for i, tok in enumerate(props):
            if lv.generator is None:  # greedy: keep iff it is the target's argmax
                ok = int(logits_TV[i].argmax()) == tok
            else:  # q: draft prob, p: target prob; accept with min(1, p/q)
                p = _warp(logits_TV[i], lv.req.sampling)
                q_tok = 1.0 if q_probs[i] is None else float(q_probs[i][tok])
                ok = torch.rand((), generator=lv.generator, device=lv.generator.device).item() * q_tok < float(p[tok])
                if not ok:  # resample from the residual max(p - q, 0)
                    q = torch.zeros_like(p) if q_probs[i] is None else q_probs[i]
                    if q_probs[i] is None:
                        q[tok] = 1.0
                    residual = (p - q).clamp_min(0)
                    residual = residual / residual.sum() if residual.sum() > 0 else p
                    return accepted, _ResampledLogits(residual)
            if not ok:
                return accepted, logits_TV[i]
            accepted.append(tok)
        return accepted, logits_TV[len(props)]

    # ------------------------------------------------------------ sampling and stopping

    def _sample(self, lv: _Live, logits: torch.Tensor) -> int:
        if isinstance(logits, _ResampledLogits):
            return int(torch.multinomial(logits.probs, 1, generator=lv.generator))
        if lv.generator is None:
            return int(logits.argmax())
        return int(torch.multinomial(_warp(logits, lv.req.sampling), 1, generator=lv.generator))

    def _append(self, lv: _Live, tokens: list[int]) -> None:
        """Add generated tokens one by one, stopping at EOS, a stop string or the length cap."""
        for tok in tokens:
            if lv.finish:
                return
            lv.generated.append(tok)
            if tok in self.eos_ids:
                lv.finish = "eos"
            elif lv.req.stop and self._hit_stop(lv):
                lv.finish = "stop"
            elif len(lv.generated) >= lv.req.max_new_tokens:
                lv.finish = "length"

    def _hit_stop(self, lv: _Live) -> bool:
        # The stop string must end in the newest token: decode a short tail of the generated tokens.
        tail = self.tokenizer.decode(lv.generated[-8:], skip_special_tokens=False)
        last = self.tokenizer.decode(lv.generated[-1:], skip_special_tokens=False)
        prev = tail[:len(tail) - len(last)]
        return any(s in tail and s not in prev for s in lv.req.stop)


class _ResampledLogits:
    """A distribution fixed by speculative sampling's rejection step (sample it as is)."""

    def __init__(self, probs: torch.Tensor):
        self.probs = probs


def lv_tokens(lv: _Live) -> list[int]:
    return lv.req.prompt_ids + lv.generated


def _warp(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, top-k and top-p applied to logits; returns probabilities."""
    logits = logits / max(s.temperature, 1e-6)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, idx[drop], 0.0)
        probs = probs / probs.sum()
    return probs


def _ngram_lookup(tokens: list[int], spec: Speculation, room: int) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier match of the longest suffix n-gram."""
    if room <= 0:
        return []
    n_tok = len(tokens)
    for n in range(min(spec.ngram_max, n_tok - 1), spec.ngram_min - 1, -1):
        suffix = tokens[n_tok - n:]
        for start in range(n_tok - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                follow = tokens[start + n:start + n + room]
                if follow:
                    return follow
    return []


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
