"""The engine on tiny random models built from real configs: losslessness, batching, caching, counters."""

import pytest
import torch

from actors import zoo
from actors.engine import Engine, EngineError, Request, Sampling, Speculation, _ngram_lookup
from tests.conftest import hf_greedy

PROMPT = [1, 504, 3458, 314, 260, 1345, 28, 1789, 43, 9023, 29, 2]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral", "tiny-qwen3-moe"])
def test_greedy_matches_transformers_generate(name):
    model, tok = zoo.load_model(name, device="cpu")
    engine = Engine(model, tok)
    engine.eos_ids = set()  # random weights: let both run the full length
    [res] = engine.generate([Request(PROMPT, max_new_tokens=24)])
    model.generation_config.eos_token_id = None
    assert res.token_ids == hf_greedy(model, PROMPT, 24)
    assert res.finish_reason == "length"
    assert res.counters.decode_tokens == 24 and res.counters.prefill_tokens == len(PROMPT)
    assert res.counters.forward_passes == 24  # one prefill + 23 decode passes


def test_batch_of_different_prefixes_equals_one_by_one(tiny_llama):
    model, tok = tiny_llama
    prompts = [PROMPT, PROMPT[:5], PROMPT + [77, 78, 79], [9, 8, 7, 6]]
    alone = []
    for p in prompts:
        engine = Engine(model, tok, prefix_cache_tokens=0)
        engine.eos_ids = set()
        alone.append(engine.generate([Request(p, max_new_tokens=12 + len(p) % 3)])[0].token_ids)
    engine = Engine(model, tok)
    engine.eos_ids = set()
    together = engine.generate([Request(p, max_new_tokens=12 + len(p) % 3) for p in prompts])
    assert [r.token_ids for r in together] == alone


def test_committed_prefix_is_never_prefilled_again(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)
    engine.eos_ids = set()
    committed = list(PROMPT)
    prefilled = 0
    for step in range(5):  # step by step, as a step-level controller commits
        [res] = engine.generate([Request(committed, max_new_tokens=6)])
        prefilled += res.counters.prefill_tokens
        committed += res.token_ids
    # the prompt once, then only the one not-yet-fed last token of each committed step
    assert prefilled == len(PROMPT) + 4
    # a foreign continuation (e.g. an accepted draft step) costs exactly its own tokens
    [res] = engine.generate([Request(committed + [5, 6, 7], max_new_tokens=2)])
    assert res.counters.prefill_tokens == 1 + 3
    # without a prefix cache, everything is prefilled
    engine = Engine(model, tok, prefix_cache_tokens=0)
    [res] = engine.generate([Request(committed, max_new_tokens=1)])
    assert res.counters.prefill_tokens == len(committed)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_token_speculation_is_lossless_under_greedy(tiny_llama, method, k):
    model, tok = tiny_llama
    draft = zoo.load_model("tiny-llama-draft-l1", device="cpu")[0] if method == "draft" else None
    plain = Engine(model, tok)
    spec = Engine(model, tok, draft_model=draft, speculation=Speculation(method, k))
    for e in (plain, spec):
        e.eos_ids = set()
    prompts = [PROMPT, PROMPT[:7] + PROMPT[:7]]  # the second repeats itself: n-gram lookup finds matches
    want = [r.token_ids for r in plain.generate([Request(p, max_new_tokens=30) for p in prompts])]
    got = spec.generate([Request(p, max_new_tokens=30) for p in prompts])
    assert [r.token_ids for r in got] == want
    for r in got:
        c = r.counters
        assert c.decode_tokens == 30 and 0 <= c.accepted_tokens <= c.drafted_tokens
        # every target pass yields one token plus the accepted proposals
        assert c.forward_passes + c.accepted_tokens >= 30
        assert c.forward_passes <= 30
    assert sum(r.counters.accepted_tokens for r in got) > 0


def test_draft_that_equals_target_accepts_everything(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok, draft_model=model, speculation=Speculation("draft", 4))
    engine.eos_ids = set()
    [res] = engine.generate([Request(PROMPT, max_new_tokens=21)])
    c = res.counters
    assert c.accepted_tokens == c.drafted_tokens == 16  # 4 passes x 4 proposals, + 1 own token each + 1 last
    assert c.forward_passes == 1 + 4


def test_stop_string_eos_and_length(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)
    engine.eos_ids = set()
    [full] = engine.generate([Request(PROMPT, max_new_tokens=20)])
    # pick the text of tokens 6..7 as a stop string: generation must end at the first token completing it
    stop = tok.decode(full.token_ids[6:8])
    [res] = engine.generate([Request(PROMPT, max_new_tokens=20, stop=(stop,))])
    assert res.finish_reason == "stop" and stop in res.text
    first_end = next(i for i in range(1, 21) if stop in tok.decode(full.token_ids[:i]))
    assert res.token_ids == full.token_ids[:first_end]
    engine.eos_ids = {full.token_ids[4]}
    [res] = engine.generate([Request(PROMPT, max_new_tokens=20)])
    first_eos = full.token_ids.index(full.token_ids[4])
    assert res.finish_reason == "eos" and res.token_ids == full.token_ids[:first_eos + 1]
    assert tok.decode([full.token_ids[4]]) not in res.text or first_eos > 0


def test_seeded_sampling_is_reproducible(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)

    def sample(seed, top_k=0, top_p=1.0):
        return engine.generate([Request(PROMPT, max_new_tokens=12, sampling=Sampling(1.0, top_p, top_k, seed))])[0]

    assert sample(1).token_ids == sample(1).token_ids
    assert sample(1).token_ids != sample(2).token_ids
    logits = model(torch.tensor([PROMPT])).logits[0, -1]
    allowed = set(logits.topk(3).indices.tolist())
    assert all(sample(s, top_k=3).token_ids[0] in allowed for s in range(10))


def _bare_model(device: str, seed: int):
    """A random 2-layer Llama and a word-level tokenizer built in code: what a bare GPU machine can build (no model
    package there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", eos_token="w1")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, eos_token_id=1, bos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval().to(device), tok


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sampling_draws_on_the_models_device(device):
    """Sampled requests (temperature > 0: draft sampling, width > 1, GRPO rollouts) draw from a generator on the
    logits' device: torch.multinomial refuses a CPU generator for CUDA probabilities. Token-level SD with a draft
    model runs every sampling branch: the draft's draw, the accept test and the residual resample."""
    model, tok = _bare_model(device, 0)
    draft, _ = _bare_model(device, 1)
    engine = Engine(model, tok, draft_model=draft, speculation=Speculation("draft", 3))
    engine.eos_ids = set()
    request = Request([5, 6, 7, 8], max_new_tokens=16, sampling=Sampling(0.9, 1.0, 0, 11))
    live = engine._acquire(request)
    assert live.generator.device.type == model.device.type == device
    first, again = (engine.generate([Request([5, 6, 7, 8], max_new_tokens=16, sampling=Sampling(0.9, 1.0, 0, 11))])[0]
                    for _ in range(2))
    assert first.token_ids == again.token_ids and len(first.token_ids) == 16
    assert 0 < first.counters.accepted_tokens < first.counters.drafted_tokens  # accepts and resamples both ran


def _prompt_whose_lookups_are_plausible(model, prompt, k=3, tries=30):
    """Grow the prompt with pairs (t, u) until, for each of its k likeliest next tokens t, prompt lookup
    after t proposes a token among the k likeliest after prompt + [t]: whatever first token is sampled,
    the second is then proposed, and the proposal is sometimes kept and sometimes replaced."""
    def likeliest(p, n=k):
        with torch.no_grad():
            return model(torch.tensor([p])).logits[0, -1].topk(n).indices.tolist()

    pairs: dict[int, int] = {}
    for _ in range(tries):
        p = prompt[:-1] + [x for t, u in pairs.items() for x in (t, u)] + prompt[-1:]
        firsts, plausible = likeliest(p), 0
        for t in firsts:
            proposal = _ngram_lookup(p + [t], Speculation("ngram", 1), 1)
            seconds = likeliest(p + [t])
            if proposal and proposal[0] in seconds:
                plausible += 1
            elif pairs.get(t) not in seconds:
                pairs[t] = next(u for u in likeliest(p + [t], 10) if u != t and u not in firsts)
        if plausible == k:
            return p
    raise AssertionError("no prompt found whose lookups propose likely second tokens")


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_speculative_sampling_keeps_the_target_distribution(tiny_llama, method):
    """Second-token marginal under speculation vs the exact sum over first tokens (top-k 3).

    The n-gram case runs the acceptance rule with one-hot proposals: accept with the target's probability,
    else sample from the target with the proposal removed."""
    model, tok = tiny_llama
    if method == "draft":
        prompt, draft = PROMPT, zoo.load_model("tiny-llama-draft-l1", device="cpu")[0]
    else:
        prompt, draft = _prompt_whose_lookups_are_plausible(model, PROMPT), None
    sampling = dict(temperature=1.0, top_k=3)
    with torch.no_grad():
        logits1 = model(torch.tensor([prompt])).logits[0, -1]
        p1 = torch.zeros_like(logits1)
        top1 = logits1.topk(3)
        p1[top1.indices] = torch.softmax(top1.values, -1)
        exact = torch.zeros_like(logits1)
        for t in top1.indices.tolist():
            lg = model(torch.tensor([prompt + [t]])).logits[0, -1]
            top2 = lg.topk(3)
            exact[top2.indices] += p1[t] * torch.softmax(top2.values, -1)
    engine = Engine(model, tok, draft_model=draft, speculation=Speculation(method, 2))
    engine.eos_ids = set()
    n = 1500
    results = engine.generate([Request(prompt, max_new_tokens=2, sampling=Sampling(seed=s, **sampling))
                               for s in range(n)])
    counts = torch.zeros_like(logits1)
    for r in results:
        counts[r.token_ids[1]] += 1
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    assert tv < 0.05, tv
    drafted = sum(r.counters.drafted_tokens for r in results)
    accepted = sum(r.counters.accepted_tokens for r in results)
    assert 0 < accepted < drafted  # both branches of the rule ran: some proposals kept, some replaced


def test_cancel_leaves_nothing_running(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)
    engine.eos_ids = set()
    keep = engine.submit(Request(PROMPT, max_new_tokens=10))
    drop = engine.submit(Request(PROMPT[:6], max_new_tokens=10))
    queued = engine.submit(Request(PROMPT[:3], max_new_tokens=10))
    engine.max_batch = 2
    finished = {r.request_id: r for r in engine.step()}
    engine.cancel(drop)
    engine.cancel(queued)
    while engine.busy:
        finished.update({r.request_id: r for r in engine.step()})
    assert finished[drop].finish_reason == "cancelled" and finished[queued].finish_reason == "cancelled"
    assert finished[keep].finish_reason == "length" and len(finished[keep].token_ids) == 10
    assert not engine.live and not engine.pending and not engine.target.active


def test_kv_budget_makes_requests_wait_and_refuses_one_that_cannot_fit(tiny_llama):
    """engine.kv_budget_mb: with room for two requests' KV buffers (measured from the allocated buffers), six
    requests never hold more than the budget, wait their turn (the prefix cache evicted first) and finish with
    the tokens an unbounded engine writes; a request bigger than the budget is refused at submit with the
    budget named, and the requests already in the engine are not lost."""
    model, tok = tiny_llama
    prompts = [PROMPT, PROMPT[:5], PROMPT + [77, 78], [9, 8, 7, 6], PROMPT[:7], [5, 6, 7]]
    free = Engine(model, tok)
    free.eos_ids = set()
    want = [r.token_ids for r in free.generate([Request(p, max_new_tokens=20) for p in prompts])]
    one = free.target.bytes_for(len(PROMPT) + 2, 20 + free.speculation.num_tokens + 2)  # the largest buffer
    engine = Engine(model, tok, kv_budget_bytes=2 * one + one // 2)
    engine.eos_ids = set()
    ids = [engine.submit(Request(p, max_new_tokens=20)) for p in prompts]
    done, most_live = {}, 0
    while engine.busy:
        done.update({r.request_id: r for r in engine.step()})
        most_live = max(most_live, len(engine.live))
        assert engine.target.kv_bytes() <= engine.target.kv_budget_bytes
    assert [done[i].token_ids for i in ids] == want
    assert most_live == 2 and engine.kv_waits > 0
    assert engine.target.cache  # finished sequences kept while they fit
    queued = engine.submit(Request(PROMPT, max_new_tokens=5))
    with pytest.raises(EngineError, match=r"needs .* MiB of KV, over the engine's budget .*engine.kv_budget_mb"):
        engine.submit(Request(PROMPT * 20, max_new_tokens=500))
    rest = {}
    while engine.busy:
        rest.update({r.request_id: r for r in engine.step()})
    assert len(rest[queued].token_ids) == 5


def test_a_failed_step_can_be_aborted_cleanly(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)
    engine.submit(Request(PROMPT, max_new_tokens=5))
    engine.submit(Request([10 ** 7], max_new_tokens=5))  # beyond the vocabulary: the forward raises
    with pytest.raises(IndexError):
        engine.step()
    engine.abort_all()
    assert not engine.live and not engine.pending and not engine.target.active
    [res] = engine.generate([Request(PROMPT, max_new_tokens=3)])  # still serving
    assert len(res.token_ids) == 3


def test_next_token_probs_match_softmax(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok)
    probs = engine.next_token_probs([PROMPT, PROMPT[:4]], [5, 17, 300])
    for prefix, got in zip([PROMPT, PROMPT[:4]], probs):
        want = torch.softmax(model(torch.tensor([prefix])).logits[0, -1].float(), -1)[[5, 17, 300]]
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-7)


def test_bad_requests(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(EngineError, match="needs a draft model"):
        Engine(model, tok, speculation=Speculation("draft", 4))
    engine = Engine(model, tok)
    with pytest.raises(EngineError, match="unknown speculation"):
        engine.submit(Request(PROMPT, speculation=Speculation("eagle")))
    with pytest.raises(EngineError, match="at least one prompt token"):
        engine.submit(Request([]))
    other = zoo.load_model("tiny-llama", device="cpu")[0]
    other.config.vocab_size += 1
    with pytest.raises(EngineError, match="vocabulary"):
        Engine(model, tok, draft_model=other)


def test_runner_logits_match_transformers_while_buffers_grow(tiny_llama):
    from actors.runner import ModelRunner

    model, _ = tiny_llama
    runner = ModelRunner(model)
    tokens = (PROMPT * 20)[:150]
    seq = runner.acquire(tokens[:2], reserve=0)  # capacity 64: grows twice below
    got = [runner.forward([seq], [tokens[:2]], all_logits=True)[0]]
    for i in range(2, len(tokens), 7):  # chunks of up to 7 new tokens on top of the cache
        got.append(runner.forward([seq], [tokens[i:i + 7]], all_logits=True)[0])
    assert seq.capacity >= 150 and seq.length == 150
    want = model(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-4, atol=1e-4)


def test_one_batched_forward_equals_each_sequence_alone(tiny_llama):
    """Sequences of different cached lengths, fed different numbers of new tokens in one forward (projections and
    MLPs batched; on CPU the few-row linears may take W @ x^T or our kernel), give each sequence the logits it gets
    alone."""
    from actors.runner import ModelRunner

    model, _ = tiny_llama
    prompts = [(PROMPT * 4)[:37], PROMPT[:3], (PROMPT * 3)[5:70]]
    feeds = [[11, 12, 13, 14, 15], [21], [31, 32, 33]]

    def run(runner, indices):
        seqs = [runner.acquire(prompts[i], reserve=8) for i in indices]
        for s, i in zip(seqs, indices):  # the prompts are cached one by one
            runner.forward([s], [prompts[i]])
        return runner.forward(seqs, [feeds[i] for i in indices], all_logits=True)

    from actors.runner import use_small_batch_linears

    from actors.runner import LinearPlan
    from qkernels import cpu

    plans = [LinearPlan(), LinearPlan("torch", "transposed", "transposed")]
    plans += [LinearPlan("kernel", "kernel", "transposed")] if cpu.available() else []
    try:
        for plan in plans:  # torch's x @ W^T; W @ x^T or our kernel for a few rows (what some CPUs measure faster)
            linears = sum(type(m) is torch.nn.Linear for m in model.modules())
            assert use_small_batch_linears(model, force=plan) == (0 if plan.is_torch else linears)
            together = run(ModelRunner(model, prefix_cache_tokens=0), [0, 1, 2])
            for i in range(3):
                [alone] = run(ModelRunner(model, prefix_cache_tokens=0), [i])
                assert together[i].shape == (len(feeds[i]), model.config.vocab_size)
                torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-4)
    finally:
        use_small_batch_linears(model, force=LinearPlan())


def test_the_attention_kernel_gives_what_per_sequence_sdpa_gives(tiny_llama):
    """On CPU a step's attention (up to KERNEL_ATTENTION_TOKENS new tokens per sequence) runs qkernels' kernel, every
    sequence in one call; the per-sequence SDPA path it replaced gives the same logits (prefills of 37 and 3 tokens,
    feeds of 1 to 20 tokens: the kernel's per-query and blocked paths), and greedy decoding gives the same tokens."""
    from actors.runner import ModelRunner
    from qkernels import cpu

    model, tok = tiny_llama
    if not cpu.available():
        pytest.skip("the CPU kernels could not be built here")
    prompts = [(PROMPT * 4)[:37], PROMPT[:3], (PROMPT * 8)[5:95]]
    feeds = [list(range(11, 31)), [21], [31, 32, 33]]
    logits = {}
    for kernel in (True, False):
        runner = ModelRunner(model, prefix_cache_tokens=0)
        assert runner.kernel_attention  # float32 on CPU with the kernels built
        runner.kernel_attention = kernel
        seqs = [runner.acquire(p, reserve=24) for p in prompts]
        runner.forward(seqs[2:], prompts[2:])  # a long prefill (90 tokens): SDPA on both
        runner.forward(seqs[:2], prompts[:2])
        logits[kernel] = runner.forward(seqs, feeds, all_logits=True)
    for a, b in zip(logits[True], logits[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tokens = {}
    for kernel in (True, False):
        engine = Engine(model, tok, prefix_cache_tokens=0)
        engine.target.kernel_attention = kernel
        tokens[kernel] = [r.token_ids for r in engine.generate([Request(p, max_new_tokens=24) for p in prompts])]
    assert tokens[True] == tokens[False]


def test_a_long_cached_prefix_is_shared_not_copied(tiny_llama):
    """On the kernel path a request whose cached prefix is long (>= SHARE_MIN_TOKENS) reads the prefix from the cached
    sequence's buffer instead of copying it: logits match transformers' while the sequence grows its own buffer, is
    truncated into the shared part, shares from a sequence that itself shares (one level: the same base), takes a
    drafted step's feed (40 tokens: the kernel, still sharing) and a long one (past SHARED_KERNEL_TOKENS: SDPA, so it
    gets one buffer then); the KV bytes count a shared buffer once, and an engine's branches decode the tokens a
    copying engine decodes."""
    from actors.runner import SHARE_MIN_TOKENS, SHARED_KERNEL_TOKENS, ModelRunner
    from qkernels import cpu

    model, tok = tiny_llama
    if not cpu.available():
        pytest.skip("the CPU kernels could not be built here")
    prefix = (PROMPT * 40)[:150]
    assert len(prefix) - 1 >= SHARE_MIN_TOKENS
    runner = ModelRunner(model)
    root = runner.acquire(prefix, reserve=0)
    runner.forward([root], [prefix])
    runner.release(root)

    def check(seq, feed):
        got = runner.forward([seq], [feed], all_logits=True)[0]
        want = model(torch.tensor([seq.tokens])).logits[0, -len(feed):].float()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    seq = runner.acquire(prefix + [5, 6, 7], reserve=4)
    assert seq.base is root and seq.offset == seq.length == 150 and seq.kv.shape[3] == 64
    assert runner.kv_bytes() == (root.kv.numel() + seq.kv.numel()) * 4  # the shared buffer once
    check(seq, [5, 6, 7])
    for i in range(0, 70, 7):  # past its own 64 positions: the own buffer grows
        check(seq, prefix[i:i + 7])
    assert seq.kv.shape[3] >= 223 - 150 and seq.base is root
    twin = runner.acquire(seq.tokens[:200] + [9], reserve=2)  # from a sharing sequence: same base, copies the rest
    assert twin.base is root and twin.offset == 150 and twin.length == 200
    check(twin, [9])
    runner.truncate(seq, 120)  # into the shared part: its next positions go to a new own buffer
    assert seq.offset == 120 and seq.base is root
    check(seq, prefix[120:126])
    check(seq, (PROMPT * 4)[:40])  # 40 new tokens: the kernel, reading the shared prefix
    assert seq.base is root and seq.offset == 120 and seq.length == 166
    check(seq, (PROMPT * 12)[:SHARED_KERNEL_TOKENS + 1])  # SDPA, on one buffer
    assert seq.base is None and seq.offset == 0 and seq.length == 166 + SHARED_KERNEL_TOKENS + 1

    tokens = {}
    branches = [prefix + [11 + i, 12, 13] for i in range(3)]
    for share in (True, False):
        engine = Engine(model, tok)
        engine.target.kernel_attention = share  # off: copies the prefix and runs SDPA
        engine.generate([Request(prefix, max_new_tokens=1)])
        tokens[share] = [r.token_ids for r in engine.generate([Request(b, max_new_tokens=20) for b in branches])]
        assert any(s.base is not None for s in engine.target.cache.values()) == share
    assert tokens[True] == tokens[False]


def test_a_deep_copy_of_a_planned_model_computes_with_its_own_weights(tiny_llama):
    """The few-row linear plans are bound to their modules: a deep copy (e.g. a reference model) uses its own
    weights, on every way a plan can take."""
    import copy

    from actors.runner import LinearPlan, use_small_batch_linears
    from qkernels import cpu

    model, _ = tiny_llama
    ways = ["torch", "transposed"] + (["kernel"] if cpu.available() else [])
    try:
        for way in ways:
            use_small_batch_linears(model, force=LinearPlan("torch" if way == "transposed" else way, way, way))
            twin = copy.deepcopy(model)
            with torch.no_grad():
                twin.lm_head.weight.mul_(2)
                for rows in (1, 3):
                    x = torch.randn(rows, model.config.hidden_size)
                    torch.testing.assert_close(twin.lm_head(x), 2 * model.lm_head(x), msg=f"{way}, {rows} rows")
    finally:
        use_small_batch_linears(model, force=LinearPlan())
