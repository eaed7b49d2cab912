"""`python -m pipelines.bench engine`: our engine against transformers on one model, side by side in one run.

On `--model` (default `smollm2-135m-instruct`; in-process engine, CPU unless a GPU is present), writes
  ar_vs_hf_ratio                 our greedy decode tokens/s over transformers' `generate` on the same prompts (its
                                 linears on torch's forward, as it ships; ar_identical_to_hf: the same tokens)
  branch4_vs_branch1_time_ratio  one step from 4 prefixes sharing a >=300-token committed prefix, over 1 prefix
                                 (per run the best of 3 timings each, 1 and 4 alternating so that a slow spell of
                                 the machine hits both; `--engine-runs` runs, default 3: the median, and each run in
                                 *_runs); branch_kv_bytes: the KV memory one branch adds, beside prefix_kv_bytes,
                                 what a copy of the committed prefix's KV takes
  prefill_tokens_ratio           prefill tokens while committing a ~1000-token answer step by step,
                                 over prompt + answer length
  sd_greedy_identical, sd_speedup  token-level SD with `--draft` (default smollm2-135m-draft-l6) vs AR
  attention_kernel_vs_sdpa_time_ratio  one layer's step attention on the CPU kernel path (qkernels.cpu.decode_attention,
                                 every sequence in one call) over the per-sequence SDPA path it replaces, the model's
                                 heads, the committed prefix's length cached: 4 sequences of a drafted step's 32 new
                                 tokens each (median of `--engine-runs`, each in *_runs); attention_by_shape: the
                                 same for 1 and 4 sequences of 1-128 new tokens (kernel_us, sdpa_us, ratio; median of
                                 the runs). CPU in float32 only (null elsewhere).
  plus the raw timings, acceptance counters, the n-gram SD figures (sd_ngram_*) and the device.

With `--backend vllm` (needs `make venv-vllm`), vLLM's engine beside ours on the same prompts, in fp32, each figure
measured `--engine-runs` times (default 3; the JSON keeps every run and the median):
  vllm_vs_native_ar_tokens_per_s      vLLM's greedy decode tokens/s over ours (prefix caches emptied per prompt)
  vllm_branch4_vs_branch1_time_ratio  as branch4_vs_branch1_time_ratio, on vLLM (its prefix cache holds the
                                      committed prefix); native_branch4_vs_branch1_time_ratio beside it
  vllm_greedy_token_agreement         share of vLLM's greedy tokens equal to ours, position by position, up to the
                                      first divergence (1.0: identical); vllm_first_divergence per prompt
  vllm_vs_native_ppl_ratio            vLLM's perplexity over ours on 1024 tokens of Python's docs (its prompt
                                      logprobs; ours from one forward): vllm_ppl, native_ppl. Where greedy
                                      agreement is not the measure (the demo MoE's near-tied router, below), this is.
Any `--model` the native engine loads works, a SpecMoE quantized checkpoint included (vLLM then serves it through
the `specmoe` quantization method, quant.vllm_quant). On the demo MoE (smollm2-moe-8x and its quantized
checkpoints) greedy tokens diverge early on both precisions: its router logits are spread by ~1e-4 by
construction (actors/moe_build.py), so the last-bit differences between vLLM's kernels and torch's change which
experts a token takes.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from actors import zoo
from actors.engine import Counters, Engine, Request, Speculation
from actors.runner import torch_linears
from pipelines.bench.common import device_name, gsm_prompts, sync
from quant.perplexity import pydoc_text

KEYS = ("model", "draft", "device", "num_prompts", "max_new_tokens", "ours_tokens_per_s", "hf_tokens_per_s",
        "ar_vs_hf_ratio", "ar_identical_to_hf", "ar_tokens", "committed_prefix_tokens", "branch_step_tokens",
        "branch1_s", "branch4_s", "branch4_vs_branch1_time_ratio", "engine_runs", "ar_vs_hf_ratio_runs",
        "branch4_vs_branch1_time_ratio_runs", "branch_kv_bytes", "prefix_kv_bytes", "answer_tokens", "answer_steps",
        "prompt_tokens", "prefill_tokens", "prefill_tokens_ratio", "attention_kernel_vs_sdpa_time_ratio",
        "attention_kernel_vs_sdpa_time_ratio_runs", "attention_by_shape",
        *(f"{label}_{k}" for label in ("sd", "sd_ngram") for k in ("greedy_identical", "speedup", "acceptance_rate",
                                                                   "mean_acceptance_length", "num_tokens")))


PPL_TOKENS = 1024
VLLM_KEYS = ("model", "device", "backend", "num_prompts", "max_new_tokens", "engine_runs", "vllm_load_s",
             "vllm_ar_tokens_per_s", "native_ar_tokens_per_s", "vllm_vs_native_ar_tokens_per_s",
             "vllm_vs_native_ar_tokens_per_s_runs", "committed_prefix_tokens", "branch_step_tokens", "vllm_branch1_s",
             "vllm_branch4_s", "vllm_branch4_vs_branch1_time_ratio", "vllm_branch4_vs_branch1_time_ratio_runs",
             "native_branch4_vs_branch1_time_ratio", "native_branch4_vs_branch1_time_ratio_runs",
             "vllm_greedy_token_agreement", "vllm_greedy_identical", "vllm_first_divergence", "ppl_tokens",
             "vllm_ppl", "native_ppl", "vllm_vs_native_ppl_ratio")


def run(args) -> dict:
    if getattr(args, "backend", "native") == "vllm":
        import asyncio

        return asyncio.run(run_vllm(args))
    model, tok = zoo.load_model(args.model, device=args.device)
    device = model.device
    draft, _ = zoo.load_model(args.draft, device=args.device)
    prompts = gsm_prompts(tok, args.num_prompts)
    n_new = args.max_new_tokens
    out: dict = {"model": args.model, "draft": args.draft, "device": device_name(device),
                 "num_prompts": len(prompts), "max_new_tokens": n_new}

    # --- AR: ours vs transformers' generate, alternating per prompt, same greedy tokens; and 4 branches vs 1 from
    # a shared committed prefix (cached once, as Lookahead Reasoning's target sees it): each run measures both
    ar_engine = Engine(model, tok, prefix_cache_tokens=0)  # no cache: both sides prefill every prompt
    ar_engine.generate([Request(prompts[0], max_new_tokens=4)])
    with torch_linears(model):
        model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=False)
    branch_engine = Engine(model, tok)
    text_ids = tok(pydoc_text()[:20000]).input_ids
    committed = prompts[0] + text_ids[:args.committed_tokens]
    branch_engine.generate([Request(committed, max_new_tokens=1)])
    branch_tokens = args.branch_tokens

    def ar_run() -> tuple[float, float, int, bool, list]:
        ours_s = hf_s = 0.0
        ours_tokens = hf_tokens = 0
        results, identical = [], True
        for p in prompts:
            sync(device)
            t0 = time.perf_counter()
            [res] = ar_engine.generate([Request(p, max_new_tokens=n_new)])
            sync(device)
            ours_s += time.perf_counter() - t0
            ours_tokens += len(res.token_ids)
            results.append(res)
            t0 = time.perf_counter()
            with torch_linears(model):  # transformers as it ships: without our engine's CPU linears
                hf = model.generate(torch.tensor([p], device=device), max_new_tokens=n_new, do_sample=False,
                                    attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device))
            sync(device)
            hf_s += time.perf_counter() - t0
            hf_ids = hf[0, len(p):].tolist()
            hf_tokens += len(hf_ids)
            identical &= hf_ids == res.token_ids
        return ours_tokens / ours_s, hf_tokens / hf_s, ours_tokens, identical, results

    def branches(tag: str, n: int) -> tuple[float, int]:
        """Seconds for n branches off the cached committed prefix, and the KV bytes they added (kept in the prefix
        cache after they finish)."""
        reqs = [Request(committed + tok(f" {tag} {i}:").input_ids, max_new_tokens=branch_tokens) for i in range(n)]
        kv0 = branch_engine.target.kv_bytes()
        sync(device)
        t0 = time.perf_counter()
        results = branch_engine.generate(reqs)
        sync(device)
        seconds = time.perf_counter() - t0
        assert all(len(r.token_ids) == branch_tokens or r.finish_reason == "eos" for r in results)
        return seconds, branch_engine.target.kv_bytes() - kv0

    ar_ratios, branch_ratios, identical_to_hf = [], [], True
    for run in range(args.engine_runs):
        ours_tps, hf_tps, ar_tokens, identical, ar_results = ar_run()
        identical_to_hf &= identical
        ar_ratios.append(ours_tps / hf_tps)
        t1 = t4 = float("inf")
        for k in range(3):  # alternating, so that a slow spell of the machine hits both
            t1 = min(t1, branches(f"Case {run}{k}", 1)[0])
            s4, kv4 = branches(f"Part {run}{k}", 4)
            t4 = min(t4, s4)
        branch_ratios.append(t4 / t1)
        print(f"run {run + 1}/{args.engine_runs}: ar_vs_hf_ratio {ar_ratios[-1]:.2f} "
              f"branch4_vs_branch1_time_ratio {branch_ratios[-1]:.2f}", flush=True)
    ours_s = ar_tokens / ours_tps  # the last run's AR seconds, for the SD speedups below
    out.update(ours_tokens_per_s=ours_tps, hf_tokens_per_s=hf_tps, ar_vs_hf_ratio=statistics.median(ar_ratios),
               ar_vs_hf_ratio_runs=ar_ratios, ar_identical_to_hf=identical_to_hf, ar_tokens=ar_tokens,
               engine_runs=args.engine_runs, committed_prefix_tokens=len(committed), branch_step_tokens=branch_tokens,
               branch1_s=t1, branch4_s=t4, branch4_vs_branch1_time_ratio=statistics.median(branch_ratios),
               branch4_vs_branch1_time_ratio_runs=branch_ratios, branch_kv_bytes=kv4 // 4,
               prefix_kv_bytes=branch_engine.target.bytes_per_token * len(committed))

    out.update(attention_timings(branch_engine.target, len(committed), args.engine_runs))

    # --- commit a ~1000-token answer step by step; count what the target prefills
    engine = Engine(model, tok)
    answer_steps, total = [], 0
    for para in pydoc_text().split("\n\n"):
        ids = tok(para + "\n\n").input_ids
        if total + len(ids) > args.answer_tokens:
            break
        answer_steps.append(ids)
        total += len(ids)
    prompt = prompts[1 % len(prompts)]
    committed, counters = list(prompt), Counters()
    for step in answer_steps:  # the target writes its own step from each committed prefix; `step` is committed
        [res] = engine.generate([Request(committed, max_new_tokens=8, stop=("\n\n",))])
        counters.add(res.counters)
        committed += step
    out.update(answer_tokens=total, answer_steps=len(answer_steps), prompt_tokens=len(prompt),
               prefill_tokens=counters.prefill_tokens,
               prefill_tokens_ratio=counters.prefill_tokens / (len(prompt) + total))

    # --- token-level SD (draft model; n-gram lookup) vs AR, same prompts, greedy
    for label, spec, drafter in (("sd", Speculation("draft", args.num_spec_tokens), draft),
                                 ("sd_ngram", Speculation("ngram", args.num_spec_tokens), None)):
        engine = Engine(model, tok, draft_model=drafter, speculation=spec, prefix_cache_tokens=0)
        engine.generate([Request(prompts[0], max_new_tokens=4)])
        counters, identical, sd_s = Counters(), True, 0.0
        for p, ar in zip(prompts, ar_results):
            sync(device)
            t0 = time.perf_counter()
            [res] = engine.generate([Request(p, max_new_tokens=n_new)])
            sync(device)
            sd_s += time.perf_counter() - t0
            counters.add(res.counters)
            identical &= res.token_ids == ar.token_ids
        drafted = max(counters.drafted_tokens, 1)
        out.update({f"{label}_greedy_identical": identical, f"{label}_speedup": ours_s / sd_s,
                    f"{label}_acceptance_rate": counters.accepted_tokens / drafted,
                    f"{label}_mean_acceptance_length": 1 + counters.accepted_tokens / max(counters.forward_passes, 1),
                    f"{label}_num_tokens": spec.num_tokens})
    return out


ATTENTION_SHAPES = ((1, 1), (1, 8), (1, 32), (1, 64), (1, 128), (4, 1), (4, 8), (4, 32), (4, 64))  # (sequences, new)
HEADLINE_ATTENTION = (4, 32)  # Lookahead Reasoning's target step: drafted steps from 4 branches


def attention_timings(runner, past: int, runs: int) -> dict:
    """One layer's step attention, both paths of ModelRunner.forward on the runner's heads, `past` positions cached
    per sequence: the kernel (one call, new keys and values written in place) and SDPA per sequence (its keys and
    values copied into the buffer, then attention with a causal mask, as ModelRunner._attention does). Per run and
    shape the best of a few repeats, the two paths alternating."""
    import torch.nn.functional as F

    from qkernels import cpu

    keys = ("attention_kernel_vs_sdpa_time_ratio", "attention_kernel_vs_sdpa_time_ratio_runs", "attention_by_shape")
    if not runner.kernel_attention:  # not CPU float32, or no kernels: nothing to compare
        return dict.fromkeys(keys)
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d = runner.model.config.num_attention_heads, runner.num_kv_heads, runner.head_dim
    scale = runner.scaling
    samples: dict[tuple[int, int], list[tuple[float, float]]] = {shape: [] for shape in ATTENTION_SHAPES}
    for _ in range(runs):
        for b, t in ATTENTION_SHAPES:
            kvs = [torch.randn(1, 2, hkv, past + t, d, generator=gen) for _ in range(b)]
            q = torch.randn(b, t, hq, d, generator=gen)
            k, v = torch.randn(b, t, hkv, d, generator=gen), torch.randn(b, t, hkv, d, generator=gen)
            qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            mask = runner._causal_mask(past, t)

            def kernel():
                cpu.decode_attention(q, k, v, kvs, 0, [past] * b, [t] * b, scale)

            def sdpa():
                for i in range(b):
                    kvs[i][0, 0, :, past:] = kh[i]
                    kvs[i][0, 1, :, past:] = vh[i]
                    F.scaled_dot_product_attention(qh[i:i + 1], kvs[i][:, 0], kvs[i][:, 1], attn_mask=mask,
                                                   scale=scale, enable_gqa=True)

            best = [float("inf"), float("inf")]
            reps = max(2, 256 // (b * t))
            for _ in range(5):
                for j, fn in enumerate((kernel, sdpa)):
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    best[j] = min(best[j], (time.perf_counter() - t0) / reps)
            samples[(b, t)].append((best[0], best[1]))
    by_shape = {}
    for (b, t), runs_ in samples.items():
        ratio = statistics.median(k / s for k, s in runs_)
        by_shape[f"{b}x{t}"] = {"sequences": b, "new_tokens": t, "ratio": ratio,
                                "kernel_us": statistics.median(k for k, _ in runs_) * 1e6,
                                "sdpa_us": statistics.median(s for _, s in runs_) * 1e6}
    head = [k / s for k, s in samples[HEADLINE_ATTENTION]]
    print("attention kernel / SDPA: " + ", ".join(f"{key} {v['ratio']:.2f}" for key, v in by_shape.items()), flush=True)
    return {keys[0]: statistics.median(head), keys[1]: head, keys[2]: by_shape}


async def vllm_perplexity(host, ids: list[int]) -> float:
    """The perplexity of `ids` under a VLLMHost's model, from vLLM's prompt logprobs (token i given tokens < i)."""
    from vllm import SamplingParams

    final = None
    async for final in host.llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                                         request_id="bench-ppl"):
        pass
    logprobs = [row[t].logprob for row, t in zip(final.prompt_logprobs[1:], ids[1:])]
    return math.exp(-sum(logprobs) / len(logprobs))


async def run_vllm(args) -> dict:
    """vLLM (actors.vllm_host.VLLMHost, in this process) against our engine; see the module docstring."""
    from actors.hosts import EngineHost
    from actors.vllm_host import VLLMHost, check_installed
    from pipelines.schema import ModelConfig, RoleConfig

    check_installed()
    model, tok = zoo.load_model(args.model, device=args.device)
    device = model.device
    prompts = gsm_prompts(tok, args.num_prompts)
    n_new = args.max_new_tokens
    role = RoleConfig(model=ModelConfig(name=args.model, device=args.device))
    role.engine.backend, role.engine.kv_budget_mb, role.engine.torch_threads = "vllm", 512, torch.get_num_threads()
    role.engine.vllm.max_model_len = 4096
    t0 = time.perf_counter()
    vllm = VLLMHost("target", role)
    load_s = time.perf_counter() - t0
    native = EngineHost.from_engine(Engine(model, tok))
    out: dict = {"model": args.model, "device": device_name(device), "backend": "vllm", "num_prompts": len(prompts),
                 "max_new_tokens": n_new, "engine_runs": args.engine_runs, "vllm_load_s": load_s}
    for host in (vllm, native):  # warm-up
        await host.generate([Request(prompts[0], max_new_tokens=4)])

    async def decode(host) -> tuple[float, int, list[list[int]]]:
        seconds, tokens, ids = 0.0, 0, []
        for p in prompts:
            await host.clear_cache()
            sync(device)
            t0 = time.perf_counter()
            [res] = await host.generate([Request(p, max_new_tokens=n_new)])
            sync(device)
            seconds += time.perf_counter() - t0
            tokens += len(res.token_ids)
            ids.append(res.token_ids)
        return seconds, tokens, ids

    text_ids = tok(pydoc_text()[:20000]).input_ids
    committed = prompts[0] + text_ids[:args.committed_tokens]

    async def branch_ratio(host, run: int) -> tuple[float, float, float]:
        await host.clear_cache()
        await host.generate([Request(committed, max_new_tokens=1)])  # the committed prefix, cached once

        async def branches(tag: str, n: int) -> float:
            reqs = [Request(committed + tok(f" {tag} {i}:").input_ids, max_new_tokens=args.branch_tokens)
                    for i in range(n)]
            sync(device)
            t0 = time.perf_counter()
            await host.generate(reqs)
            sync(device)
            return time.perf_counter() - t0

        t1 = t4 = float("inf")
        for k in range(3):  # alternating, as in the native suite
            t1 = min(t1, await branches(f"Case {run}{k}", 1))
            t4 = min(t4, await branches(f"Part {run}{k}", 4))
        return t4 / t1, t1, t4

    speed, ratios, native_ratios, agreement, divergence = [], [], [], [], []
    for run in range(args.engine_runs):  # interleaved: each run measures both engines
        v_s, v_tok, v_ids = await decode(vllm)
        n_s, n_tok, n_ids = await decode(native)
        speed.append((v_tok / v_s) / (n_tok / n_s))
        out["vllm_ar_tokens_per_s"], out["native_ar_tokens_per_s"] = v_tok / v_s, n_tok / n_s
        same = total = 0
        divergence = []
        for a, b in zip(v_ids, n_ids):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            divergence.append(first)
            same += len(a) if first is None else first
            total += len(b)
        agreement.append(same / max(total, 1))
        r, t1, t4 = await branch_ratio(vllm, run)
        ratios.append(r)
        out["vllm_branch1_s"], out["vllm_branch4_s"] = t1, t4
        native_ratios.append((await branch_ratio(native, run))[0])
    ids = tok(pydoc_text()[20000:]).input_ids[:PPL_TOKENS]
    out.update(ppl_tokens=len(ids), vllm_ppl=await vllm_perplexity(vllm, ids))
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=device))
    out["native_ppl"] = math.exp(nll.item())
    out["vllm_vs_native_ppl_ratio"] = out["vllm_ppl"] / out["native_ppl"]
    vllm.shutdown()
    out.update(vllm_vs_native_ar_tokens_per_s=statistics.median(speed), vllm_vs_native_ar_tokens_per_s_runs=speed,
               committed_prefix_tokens=len(committed), branch_step_tokens=args.branch_tokens,
               vllm_branch4_vs_branch1_time_ratio=statistics.median(ratios),
               vllm_branch4_vs_branch1_time_ratio_runs=ratios,
               native_branch4_vs_branch1_time_ratio=statistics.median(native_ratios),
               native_branch4_vs_branch1_time_ratio_runs=native_ratios,
               vllm_greedy_token_agreement=min(agreement), vllm_greedy_identical=all(d is None for d in divergence),
               vllm_first_divergence=divergence)
    return out
