"""Controllers: `run(problem) -> Trace` over the target, draft and verifier.

Methods (any step method takes `+sd`: token-level SD inside every target step):
- `ar`: the target alone, one step request at a time; `sd`: the same with token-level SD in the target engine.
- `lr_sync` (Lookahead Reasoning, Algorithm 1): the draft writes gamma steps one after another; the target writes
  t_0..t_gamma in one batched call (t_j from the prefix plus d_<j); j* = first rejected draft; commit d_<j* and
  t_j*. When all drafts pass, they and t_gamma (the target's step from the new prefix) are committed: 1 to
  gamma + 1 steps a cycle (`speculative.theory.f_sync`); never-accept is `ar`.
- `lr_async` (the asynchronous tree): every node of the lookahead window (depth <= gamma from the accepted root)
  has its target step launched as soon as its prefix exists, and nodes at depth < gamma launch W draft children.
  The first accepted child of the root wins and becomes the root (siblings cancelled, its subtree kept); all
  children rejected -> commit the root's target step and open a fresh root. When the root's target step returns
  before any of its draft children exists, accepting one of those drafts later would commit the same one step,
  later, with nothing of its subtree started: `late_drafts="lose"` commits the target step at once and counts the
  late drafts as rejected (reason "late"). The default, "wait", judges them first: the output then depends on the
  verdicts alone, not on which model ran faster (always-accept stays draft-only decoding).
- `fpsr` (DREAM-R's fully parallel speculative reasoning): one pipeline along the reasoning chain. The draft
  writes steps without pause while fewer than gamma of them wait for a verdict; the target's step t_j starts as
  soon as the prefix before draft step d_j exists, d_j's verification as soon as d_j does (a verifier that needs
  t_j waits for it). An accepted d_j is committed at once and the window slides by one step (no stop at a window
  boundary); at the first rejection j* everything past it is cancelled (early stop; `early_stop=False` runs it to
  the end of its window and discards it) and t_j*, usually already computed, is committed (clean fallback); the
  pipeline restarts from there. With `late_drafts="lose"`, a t_j that returns before d_j exists is committed.
A draft step cut at the step cap (no delimiter, no EOS) is rejected without asking the verifier, unless
`cut_drafts="verify"`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from actors.engine import Request, Sampling, Speculation
from rewards.verifiers import Item, Verdict, Verifier
from speculative.clients import HostClient
from speculative.trace import Committed, Trace, Verification

STEP_METHODS = ("lr_sync", "lr_async", "fpsr")
METHODS = ("ar", "sd") + STEP_METHODS + tuple(f"{m}+sd" for m in STEP_METHODS)


class ControllerError(ValueError):
    pass


@dataclass
class Settings:
    method: str = "lr_async"
    gamma: int = 4
    width: int = 1
    max_new_tokens: int = 384
    step_max_tokens: int = 100
    delimiter: str = "\n\n"
    target_sampling: Sampling = field(default_factory=Sampling)
    draft_sampling: Sampling = field(default_factory=Sampling)
    token_speculation: Speculation = field(default_factory=lambda: Speculation("ngram", 4))
    cut_drafts: str = "reject"  # reject | verify
    late_drafts: str = "wait"  # lr_async, fpsr: wait | lose (commit the target's step once it returns first)
    early_stop: bool = True  # fpsr: cancel the work past the first rejection (False: run it to completion, discard)
    # token-level speculation inside the draft's own steps (n-gram lookup over its prefix: lossless, the same
    # steps from fewer draft passes); "none" decodes them token by token
    draft_speculation: Speculation = field(default_factory=lambda: Speculation("none"))

    def check(self) -> None:
        if self.method not in METHODS:
            raise ControllerError(f"unknown method {self.method!r}; known: {list(METHODS)}")
        if self.gamma < 1:
            raise ControllerError(f"gamma must be >= 1, got {self.gamma}")
        if self.width < 1:
            raise ControllerError(f"width must be >= 1, got {self.width}")
        if self.width > 1 and self.draft_sampling.temperature == 0:
            raise ControllerError("width > 1 needs draft sampling (temperature > 0): greedy siblings are identical")
        if self.cut_drafts not in ("reject", "verify"):
            raise ControllerError(f"cut_drafts must be reject or verify, got {self.cut_drafts!r}")
        if self.late_drafts not in ("lose", "wait"):
            raise ControllerError(f"late_drafts must be lose or wait, got {self.late_drafts!r}")
        if self.draft_speculation.method not in ("none", "ngram"):
            raise ControllerError(f"draft_speculation must be none or ngram (the draft host has no draft model "
                                  f"of its own), got {self.draft_speculation.method!r}")

    @property
    def base(self) -> str:
        return self.method.split("+")[0]

    @property
    def uses_token_sd(self) -> bool:
        return self.method == "sd" or self.method.endswith("+sd")


@dataclass
class StepOut:
    token_ids: list[int]
    text: str
    finish_reason: str
    latency_s: float = 0.0
    ended_at: float = 0.0  # time.perf_counter() when the call returned

    @property
    def ends_answer(self) -> bool:
        return self.finish_reason == "eos"


class Controller:
    def __init__(self, settings: Settings, target: HostClient, draft: Optional[HostClient] = None,
                 verifier: Optional[Verifier] = None):
        settings.check()
        if settings.base in STEP_METHODS and (draft is None or verifier is None):
            raise ControllerError(f"method {settings.method!r} needs a draft and a verifier")
        self.s, self.target, self.draft, self.verifier = settings, target, draft, verifier

    async def run(self, problem_id: str, question: str, prompt_ids: list[int]) -> Trace:
        run = _Run(self, problem_id, question, prompt_ids)
        run.trace.verifier_waits = self.verifier is not None and self.verifier.needs_target_step
        t0 = time.perf_counter()
        await {"ar": run.autoregressive, "sd": run.autoregressive, "lr_sync": run.lr_sync,
               "lr_async": run.lr_async, "fpsr": run.fpsr}[self.s.base]()
        run.trace.wall_s = time.perf_counter() - t0
        for host in {id(h): h for h in (self.target, self.draft) if h is not None}.values():
            await host.settle()
        run.trace.finish_reason = "eos" if run.trace.steps and run.trace.steps[-1].finish_reason == "eos" else "length"
        return run.trace


class _Run:
    def __init__(self, ctl: Controller, problem_id: str, question: str, prompt_ids: list[int]):
        self.ctl, self.s = ctl, ctl.s
        self.question, self.prompt = question, list(prompt_ids)
        self.trace = Trace(problem_id, self.s.method, len(prompt_ids))
        self.committed: list[int] = []
        self.done = False
        self.cycle = 0

    # ------------------------------------------------------------ model calls

    def _request(self, path: list[int], sampling: Sampling, seed_offset: int, speculation: Speculation) -> Request:
        remaining = self.s.max_new_tokens - len(self.committed) - len(path)
        prefix = self.prompt + self.committed + path
        seed = None if sampling.seed is None else sampling.seed * 1_000_003 + len(prefix) * 31 + seed_offset
        return Request(prefix, max_new_tokens=max(1, min(self.s.step_max_tokens, remaining)),
                       stop=(self.s.delimiter,), sampling=replace(sampling, seed=seed), speculation=speculation)

    def room(self, path: list[int]) -> bool:
        return len(self.committed) + len(path) < self.s.max_new_tokens

    # Requests are built when a call is made (not when its coroutine first runs): the committed prefix may move
    # before a spawned task starts.
    def target_steps(self, paths: list[list[int]]):
        spec = self.s.token_speculation if self.s.uses_token_sd else Speculation("none")
        return self._target_steps([self._request(p, self.s.target_sampling, 0, spec) for p in paths])

    async def _target_steps(self, reqs: list[Request]) -> list[StepOut]:
        t0 = time.perf_counter()
        results = await self.ctl.target.generate(reqs)
        t = self.trace
        elapsed = time.perf_counter() - t0
        t.target_step_s += elapsed * len(results)
        out = []
        for r in results:
            t.target_requests += 1
            t.target_tokens += len(r.token_ids)
            t.token_drafted += r.counters.drafted_tokens
            t.token_accepted += r.counters.accepted_tokens
            t.token_passes += r.counters.forward_passes
            t.prefill_tokens += r.counters.prefill_tokens
            out.append(StepOut(r.token_ids, r.text, r.finish_reason, elapsed, t0 + elapsed))
        return out

    def target_step(self, path: list[int]):
        spec = self.s.token_speculation if self.s.uses_token_sd else Speculation("none")
        req = self._request(path, self.s.target_sampling, 0, spec)

        async def one():
            return (await self._target_steps([req]))[0]

        return one()

    def draft_step(self, path: list[int], sibling: int = 0):
        return self._draft_step(self._request(path, self.s.draft_sampling, sibling, self.s.draft_speculation))

    async def _draft_step(self, req: Request) -> StepOut:
        t0 = time.perf_counter()
        [r] = await self.ctl.draft.generate([req])
        elapsed = time.perf_counter() - t0
        self.trace.draft_step_s += elapsed
        self.trace.draft_requests += 1
        self.trace.draft_tokens += len(r.token_ids)
        self.trace.draft_passes += r.counters.forward_passes
        self.trace.draft_token_accepted += r.counters.accepted_tokens
        if r.finish_reason == "length" and req.max_new_tokens < self.s.step_max_tokens:
            self.trace.budget_cut_draft_steps += 1
            self.trace.budget_cut_draft_tokens += len(r.token_ids)
        return StepOut(r.token_ids, r.text, r.finish_reason, elapsed, t0 + elapsed)

    def _is_cut(self, d: StepOut, path: list[int]) -> bool:
        """Stopped by the step cap (not by the delimiter, EOS or the answer's own budget)."""
        return d.finish_reason == "length" and self.room(path + d.token_ids)

    async def verify(self, depth: int, triples: list[tuple[list[int], str, Optional[StepOut], StepOut]]) -> list[Verdict]:
        """Verdicts for (draft path before the step, its text, target step or None, draft step), recorded in
        the trace with their depth in the cycle."""
        verdicts: list[Optional[Verdict]] = [None] * len(triples)
        items, where = [], []
        for i, (path, path_text, t, d) in enumerate(triples):
            if self.s.cut_drafts == "reject" and self._is_cut(d, path):
                verdicts[i] = Verdict(False, 0.0, "cut")
                continue
            items.append(Item(self.question, self.trace.text + path_text, d.text, d.token_ids,
                              None if t is None else t.text, None if t is None else t.token_ids))
            where.append(i)
        if items:
            self.trace.verifier_calls += 1
            t0 = time.perf_counter()
            judged = await self.ctl.verifier.verify(items)
            self.trace.verify_s += time.perf_counter() - t0
            for i, v in zip(where, judged):
                verdicts[i] = v
        for i, v in enumerate(verdicts):
            self.trace.verifications.append(Verification(self.cycle, depth + i, v.accept, float(v.score), v.reason))
        return verdicts

    def late(self, depth: int, drafts: int) -> None:
        """late_drafts="lose": draft steps still running when the target's step from their prefix returned count as
        rejected at that depth (the caller commits the target's step and cancels them)."""
        self.trace.verifications += [Verification(self.cycle, depth, False, 0.0, "late") for _ in range(drafts)]

    def off_path(self, which) -> None:
        """Mark the recorded verdicts `which` selects as judged off the accepted path (raw count only)."""
        for v in self.trace.verifications:
            if which(v):
                v.on_path = False

    def commit(self, step: StepOut, origin: str, depth: int) -> None:
        self.committed += step.token_ids
        wait = max(0.0, time.perf_counter() - step.ended_at) if step.ended_at else 0.0
        self.trace.steps.append(Committed(step.token_ids, step.text, origin, self.cycle, depth, step.finish_reason,
                                          step.latency_s, wait))
        if step.ends_answer or len(self.committed) >= self.s.max_new_tokens or not step.token_ids:
            self.done = True

    def waste(self, steps: list[StepOut], who: str) -> None:
        n = sum(len(s.token_ids) for s in steps)
        if who == "target":
            self.trace.wasted_target_tokens += n
        else:
            self.trace.wasted_draft_tokens += n

    # ------------------------------------------------------------ ar / sd

    async def autoregressive(self) -> None:
        while not self.done:
            [t] = await self.target_steps([[]])
            self.commit(t, "target", 0)
            self.trace.cycles += 1

    # ------------------------------------------------------------ Lookahead Reasoning, synchronous

    async def lr_sync(self) -> None:
        while not self.done:
            self.trace.cycles += 1
            drafts: list[StepOut] = []
            path: list[int] = []
            while len(drafts) < self.s.gamma and self.room(path):
                d = await self.draft_step(path)
                drafts.append(d)
                path = path + d.token_ids
                if d.ends_answer or not d.token_ids:
                    break
            paths = [sum((d.token_ids for d in drafts[:j]), []) for j in range(len(drafts) + 1)]
            texts = ["".join(d.text for d in drafts[:j]) for j in range(len(drafts) + 1)]
            targets = await self.target_steps(paths)  # one call: the engine batches these
            verdicts = await self.verify(0, [(paths[j], texts[j], targets[j], drafts[j]) for j in range(len(drafts))])
            j_star = next((j for j, v in enumerate(verdicts) if not v.accept), len(drafts))
            beyond = len(verdicts) - j_star - 1
            for v in self.trace.verifications[len(self.trace.verifications) - beyond:] if beyond > 0 else []:
                v.on_path = False  # judged in the same batch, but past the first rejection
            for j in range(j_star):
                self.commit(drafts[j], "draft", j)
            self.waste(drafts[j_star:], "draft")
            if not self.done:  # t_j*: the fallback, or t_gamma when every draft passed
                self.commit(targets[j_star], "target", j_star)
                self.waste(targets[:j_star] + targets[j_star + 1:], "target")
            else:
                self.waste(targets, "target")
            self.cycle += 1

    # ------------------------------------------------------------ FPSR

    async def fpsr(self) -> None:
        while not self.done:
            self.trace.cycles += 1
            await _Chain(self).drive()
            self.cycle += 1

    async def _cancel(self, tasks: list[asyncio.Task]) -> None:
        """Early stop: cancel unfinished work and count it; finished but unused steps were counted as waste."""
        live = [t for t in tasks if not t.done()]
        for t in live:
            t.cancel()
        self.trace.cancelled_requests += len(live)
        if live:
            await asyncio.gather(*live, return_exceptions=True)

    # ------------------------------------------------------------ Lookahead Reasoning, asynchronous tree

    async def lr_async(self) -> None:
        tree = _Tree(self)
        root = tree.fresh_root()
        depth_in_cycle = 0
        self.trace.cycles = 1
        try:
            while not self.done:
                tree.grow(root)
                winner = await tree.decide(root)
                if winner is not None:
                    self.commit(winner.step, "draft", depth_in_cycle)
                    tree.drop(root, keep=winner)
                    root = tree.rebase(winner)
                    depth_in_cycle += 1
                else:
                    t = await root.target
                    self.commit(t, "target", depth_in_cycle)
                    tree.drop(root, keep=None)
                    root = tree.fresh_root()
                    depth_in_cycle = 0
                    self.cycle += 1
                    self.trace.cycles += 1
        finally:
            await self._cancel(tree.tasks)
            tree.off_path_below(root)


class _Chain:
    """FPSR's pipeline from one committed prefix to its first rejection (one cycle). The draft writes d_0, d_1, ...
    without pause while fewer than gamma of its steps wait for a verdict; the target's step t_j starts as soon as
    the prefix before d_j exists, and d_j's verification as soon as d_j does (waiting for t_j when the verifier
    needs it). Verdicts are taken in order: an accepted d_j is committed at once (its t_j, no longer needed, is
    cancelled) and the window slides by one step; at the first rejection t_j is committed (clean fallback) and the
    work past it is cancelled (early stop) or, with `early_stop=False`, run to the end of its window and discarded.

    Paths and texts are kept from the chain's start; a call takes them relative to the committed prefix of the
    moment it is made (drafts are committed while later ones are still running)."""

    def __init__(self, run: _Run):
        self.run, self.s = run, run.s
        self.paths: list[list[int]] = [[]]  # the draft path before d_j, from the chain's start
        self.texts: list[str] = [""]
        self.drafts: list[StepOut] = []
        self.targets: list[asyncio.Task] = []  # t_j: the target's step from paths[j]
        self.verdicts: list[asyncio.Task] = []  # d_j's verdict
        self.tasks: list[asyncio.Task] = []
        self.frontier = 0  # drafts accepted (and committed) so far
        self.frozen = False  # the chain stopped: drafting ends instead of waiting for the window to slide
        self.moved = asyncio.Event()  # the frontier moved or the chain stopped (drafting waits on it)
        self.grew = asyncio.Event()  # a draft step was added (the main loop waits on it)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    def _rel(self, j: int) -> tuple[list[int], str]:
        """paths[j] and texts[j] relative to the committed prefix now: what the chain committed so far is its
        accepted drafts, paths[frontier] (the fallback is committed only once nothing of the chain runs)."""
        return self.paths[j][len(self.paths[self.frontier]):], self.texts[j][len(self.texts[self.frontier]):]

    def _target(self, j: int) -> None:
        self.targets.append(self.spawn(self.run.target_step(self._rel(j)[0])))

    async def _drafting(self) -> None:
        run = self.run
        while True:
            j = len(self.drafts)
            while j - self.frontier >= self.s.gamma:  # the window is full: wait for a verdict to move it
                if self.frozen:
                    return
                self.moved.clear()
                await self.moved.wait()
            if self.frozen and self.s.early_stop:
                return
            path = self._rel(j)[0]
            if not run.room(path):
                return
            d = await run.draft_step(path)
            self.drafts.append(d)
            self.paths.append(self.paths[j] + d.token_ids)
            self.texts.append(self.texts[j] + d.text)
            self.verdicts.append(self.spawn(self._verify(j)))  # launched together with t_{j+1}
            ended = d.ends_answer or not d.token_ids
            if not ended and run.room(self._rel(j + 1)[0]):
                self._target(j + 1)
            self.grew.set()
            if ended:
                return

    async def _verify(self, j: int) -> Verdict:
        t = await self.targets[j] if self.run.ctl.verifier.needs_target_step else None
        path, text = self._rel(j)
        return (await self.run.verify(j, [(path, text, t, self.drafts[j])]))[0]

    def _retire(self, task: asyncio.Task) -> None:
        """A target step that is no longer needed: cancelled, or counted as waste when it already finished."""
        if not task.done():
            task.cancel()
            self.run.trace.cancelled_requests += 1
        elif not task.cancelled() and task.exception() is None:
            self.run.waste([task.result()], "target")

    async def drive(self) -> None:
        run, lose = self.run, self.s.late_drafts == "lose"
        self._target(0)
        drafting = self.spawn(self._drafting())
        j, fell_back = 0, False
        try:
            while not run.done:
                j = self.frontier
                if j < len(self.verdicts):
                    if not (await self.verdicts[j]).accept:
                        break
                    run.commit(self.drafts[j], "draft", j)
                    self._retire(self.targets[j])
                    self.frontier += 1
                    self.moved.set()
                    continue
                if drafting.done():  # no d_j will come (drafting failed, or a path with no room left)
                    drafting.result()
                    break
                if lose and self.targets[j].done():  # t_j returned before d_j exists: the draft lost
                    run.late(j, 1)
                    break
                self.grew.clear()
                grew = asyncio.ensure_future(self.grew.wait())
                await asyncio.wait([drafting, grew] + ([self.targets[j]] if lose else []),
                                   return_when=asyncio.FIRST_COMPLETED)
                grew.cancel()
            if not run.done:  # the first rejection (or a lost draft): t_j, usually computed already
                fallback = self.targets[j]
                self.frozen = True
                self.moved.set()
                if self.s.early_stop:
                    await run._cancel([t for t in self.tasks if t is not fallback])
                else:  # the ablation: what was started runs to the end of its window, then is discarded
                    while live := [t for t in self.tasks if not t.done() and t is not fallback]:
                        await asyncio.gather(*live, return_exceptions=True)
                run.commit(await fallback, "target", j)
                fell_back = True
        finally:
            self.frozen = True
            self.moved.set()
            await run._cancel(self.tasks)
            for k in range(j + fell_back, len(self.targets)):  # before j: retired when their draft passed
                self._retire(self.targets[k])
            run.waste(self.drafts[self.frontier:], "draft")
            run.off_path(lambda v: v.cycle == run.cycle and v.depth > j)


class _Node:
    def __init__(self, path: list[int], step: Optional[StepOut], level: int):
        self.path, self.step, self.level = path, step, level  # path: draft tokens since the committed prefix
        self.text = ""  # the path's text
        self.target: Optional[asyncio.Task] = None
        self.drafts: list[asyncio.Task] = []
        self.children: list[_Node] = []
        self.verdicts: dict[int, asyncio.Task] = {}  # child index -> verification task
        self.record = None  # this node's draft step's Verification in the trace, once judged


class _Tree:
    def __init__(self, run: _Run):
        self.run, self.s = run, run.s
        self.tasks: list[asyncio.Task] = []
        self.root_level = 0  # levels count from the cycle's fresh root: a node's level is its depth in the cycle

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task

    def fresh_root(self) -> _Node:
        """The root of a new cycle (at the start, and after a fallback): the window is gamma deep from level 0."""
        self.root_level = 0
        return _Node([], None, 0)

    def grow(self, node: _Node) -> None:
        """Launch the target step of every node in the window and the drafts of nodes above depth gamma."""
        run = self.run
        if node.target is None and run.room(node.path):
            node.target = self.spawn(run.target_step(node.path))
        ended = node.step is not None and (node.step.ends_answer or not node.step.token_ids)
        if not node.drafts and not ended and node.level - self.root_level < self.s.gamma and run.room(node.path):
            node.drafts = [self.spawn(self._draft(node, w)) for w in range(self.s.width)]
        for child in node.children:
            self.grow(child)

    async def _draft(self, parent: _Node, sibling: int) -> _Node:
        d = await self.run.draft_step(parent.path, sibling)
        child = _Node(parent.path + d.token_ids, d, parent.level + 1)
        child.text = parent.text + d.text
        parent.children.append(child)
        index = len(parent.children) - 1
        parent.verdicts[index] = self.spawn(self._verify(parent, child))
        self.grow(child)
        return child

    async def _verify(self, parent: _Node, child: _Node) -> Verdict:
        t = await parent.target if (parent.target is not None and self.run.ctl.verifier.needs_target_step) else None
        verdict = (await self.run.verify(parent.level, [(parent.path, parent.text, t, child.step)]))[0]
        child.record = self.run.trace.verifications[-1]  # appended by verify, with no await in between
        return verdict

    async def decide(self, root: _Node) -> Optional[_Node]:
        """The first child of the root whose draft step is accepted, or None when all are rejected (or, with
        late_drafts="lose", when the root's target step returned before any draft child existed)."""
        lose = self.s.late_drafts == "lose" and root.target is not None
        while True:
            for i, child in enumerate(root.children):
                v = root.verdicts.get(i)
                if v is not None and v.done() and v.result().accept:
                    return child
            drafting = [t for t in root.drafts if not t.done()]
            judging = [v for v in root.verdicts.values() if not v.done()]
            if not drafting and not judging:
                return None
            if lose and root.target.done() and not root.children:
                self.run.late(root.level, len(drafting))
                return None
            await asyncio.wait(drafting + judging + ([root.target] if lose else []),
                               return_when=asyncio.FIRST_COMPLETED)

    def drop(self, node: _Node, keep: Optional[_Node]) -> None:
        """Cancel the subtree of `node` except `keep`'s; count finished-but-unused steps as waste."""
        stack = [node]
        while stack:
            n = stack.pop()
            if n is keep:
                continue
            for task, who in [(n.target, "target")] + [(t, "draft") for t in n.drafts]:
                if task is None:
                    continue
                if task.done() and not task.cancelled() and task.exception() is None:
                    if who == "target" and not (n is node and keep is None):  # the committed fallback
                        self.run.waste([task.result()], "target")
                elif not task.done():
                    task.cancel()
                    self.run.trace.cancelled_requests += 1
            for i, child in enumerate(n.children):
                if n is not node and child.record is not None:  # its parent was never committed
                    child.record.on_path = False
                if child is not keep:
                    self.run.waste([child.step], "draft")
                v = n.verdicts.get(i)
                if v is not None and not v.done():
                    v.cancel()
                stack.append(child)

    def off_path_below(self, root: _Node) -> None:
        """At the end: the verdicts on drafts whose parent below `root` was never committed are off the path."""
        stack = list(root.children)
        while stack:
            n = stack.pop()
            for child in n.children:
                if child.record is not None:
                    child.record.on_path = False
                stack.append(child)

    def rebase(self, winner: _Node) -> _Node:
        """The accepted child becomes the root: paths are relative to the committed prefix again."""
        cut, cut_text = len(winner.path), len(winner.text)
        stack = [winner]
        while stack:
            n = stack.pop()
            n.path, n.text = n.path[cut:], n.text[cut_text:]
            stack.extend(n.children)
        self.root_level = winner.level
        winner.step = None
        return winner
