"""Benchmarks: scripts that measure side by side in one run and write JSON (never timed tests).

    python -m pipelines.bench engine --out bench-engine.json
    python -m pipelines.bench spec --out bench-spec.json [--num-problems 20] [--max-new-tokens 96]
    python -m pipelines.bench quant --out bench-quant.json
    python -m pipelines.bench sapo --out bench-sapo.json [--num-problems 12] [--train-problems 128]
    python -m pipelines.bench kernels --out bench-kernels.json [--skip-moe] [--milo-checkpoint DIR]

engine: on `smollm2-135m-instruct` (in-process engine, CPU unless a GPU is present), writes
  ar_vs_hf_ratio                 our greedy decode tokens/s over transformers' `generate` on the same prompts
  branch4_vs_branch1_time_ratio  one step from 4 prefixes sharing a >=300-token committed prefix, over 1 prefix
  prefill_tokens_ratio           prefill tokens while committing a ~1000-token answer step by step,
                                 over prompt + answer length
  sd_greedy_identical, sd_speedup  token-level SD with the draft (default smollm2-135m-draft-l6) vs AR
  plus the raw timings, acceptance counters, the n-gram SD figures and the device.

spec: the demo evaluation (SmolLM2 target, early-exit draft, TBVM at alpha 0.7) on held-out problems, every
  method on the same actors, at 1 and 4 problems in flight; per method: speedup, step_accept_rate,
  answer_agreement, accuracy, predicted_speedup (on the measured cost of the method's committed target steps),
  predicted_speedup_ideal (the papers' model: a target step costs what it costs alone), target_step_slowdown,
  verify_s (latency of one verifier call), commit_wait (mean wait from a committed step's call returning to its
  commit, per origin, and the committed target steps' summed waits as a share of the wall),
  tokens_per_s_1, tokens_per_s_4, plus the checks within_20pct_of_predicted / _of_ideal and fpsr_ge_lr_sync;
  theory_check: the same predictions at a known accept rate (a random verifier accepting half the drafts,
  --theory-problems problems, one in flight).

quant: on the demo MoE (`smollm2-moe-8x`), perplexity on the last --ppl-tokens of pydoc text (512-token windows)
  of fp, RTN and HQQ 3-bit g64, MiLo 3-bit g64 (uniform ranks 16 dense / 8 experts; also the kurtosis policy
  capped at 64 and the routing-frequency policy, mean expert rank 8: *_milo3_g64_kurtosis / _frequency with
  mean_rank_*), RTN 4-bit g128 (last group
  zero-padded: 576 = 4.5 x 128), per-row 16-centroid k-means codebooks; honest bits per weight (codes, scales,
  zeros, codebooks, compensators); CodeQuant (rotation + codebooks + centroid fine-tuning); W4A4 perplexities
  (4-bit per-token activations) of k-means and CodeQuant; our HQQ's reconstruction error over the `hqq`
  package's (when installed); and the quantize job's wall time with 1 and 2 workers.

sapo: (pipelines/bench_sapo.py) collect the target's trajectories on training problems, evaluate `lr_async+sd`
  with the untrained draft on held-out problems, train it with the SAPO preset (warm start + GRPO), evaluate
  again with the same verifier; accept_rate_before/after, accept_gain_points, tokens_per_draft_step_before/after,
  lr_speedup_before/after, samples_per_s_1_worker and samples_per_s_2_workers; draft_bound_speedup_before/after
  (every step accepted: tokens at the draft's measured pace, a ceiling on lr_speedup) and
  draft_token_share_before/after (the answer's tokens that came from accepted draft steps).

kernels: (pipelines/bench_kernels.py) the CPU kernels against dense fp32 at batch 1 (4096 x 4096 and the demo
  MoE's expert shapes), torch.compile as the alternative, the quantized demo MoE's decode tokens/s over the fp32
  one; on a GPU, the Triton kernels against fp16 at batch 1, 4, 16 for a 4096 x 14336 weight.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from actors import zoo
from actors.engine import Counters, Engine, Request, Speculation
from pipelines.bench_kernels import bench_kernels
from pipelines.bench_sapo import bench_sapo
from quant.perplexity import pydoc_text


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prompts(tok, n: int) -> list[list[int]]:
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=1234)
    out = []
    for row in data:
        msgs = [{"role": "system", "content": "Solve the problem step by step. Separate steps with a blank line."},
                {"role": "user", "content": row["question"]}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def bench_engine(args) -> dict:
    model, tok = zoo.load_model(args.model, device=args.device)
    device = model.device
    draft, _ = zoo.load_model(args.draft, device=args.device)
    prompts = _prompts(tok, args.num_prompts)
    n_new = args.max_new_tokens
    out: dict = {"model": args.model, "draft": args.draft, "device": _device_name(device),
                 "num_prompts": len(prompts), "max_new_tokens": n_new}

    # --- AR: ours vs transformers' generate, alternating per prompt, same greedy tokens
    engine = Engine(model, tok, prefix_cache_tokens=0)  # no cache: both sides prefill every prompt
    engine.generate([Request(prompts[0], max_new_tokens=4)])
    model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=False)
    ours_s = hf_s = 0.0
    ours_tokens = hf_tokens = 0
    ar_results = []
    identical_to_hf = True
    for p in prompts:
        _sync(device)
        t0 = time.perf_counter()
        [res] = engine.generate([Request(p, max_new_tokens=n_new)])
        _sync(device)
        ours_s += time.perf_counter() - t0
        ours_tokens += len(res.token_ids)
        ar_results.append(res)
        t0 = time.perf_counter()
        hf = model.generate(torch.tensor([p], device=device), max_new_tokens=n_new, do_sample=False,
                            attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device))
        _sync(device)
        hf_s += time.perf_counter() - t0
        hf_ids = hf[0, len(p):].tolist()
        hf_tokens += len(hf_ids)
        identical_to_hf &= hf_ids == res.token_ids
    out.update(ours_tokens_per_s=ours_tokens / ours_s, hf_tokens_per_s=hf_tokens / hf_s,
               ar_vs_hf_ratio=(ours_tokens / ours_s) / (hf_tokens / hf_s), ar_identical_to_hf=identical_to_hf,
               ar_tokens=ours_tokens)

    # --- 4 branches vs 1 from a shared committed prefix (cached once, as Lookahead Reasoning's target sees it)
    engine = Engine(model, tok)
    text_ids = tok(pydoc_text()[:20000]).input_ids
    committed = prompts[0] + text_ids[:args.committed_tokens]
    engine.generate([Request(committed, max_new_tokens=1)])
    branch_tokens = args.branch_tokens

    def branches(tag: str, n: int) -> float:
        reqs = [Request(committed + tok(f" {tag} {i}:").input_ids, max_new_tokens=branch_tokens) for i in range(n)]
        _sync(device)
        t0 = time.perf_counter()
        results = engine.generate(reqs)
        _sync(device)
        assert all(len(r.token_ids) == branch_tokens or r.finish_reason == "eos" for r in results)
        return time.perf_counter() - t0

    t1 = min(branches(f"Case {k}", 1) for k in range(3))
    t4 = min(branches(f"Part {k}", 4) for k in range(3))
    out.update(committed_prefix_tokens=len(committed), branch_step_tokens=branch_tokens, branch1_s=t1, branch4_s=t4,
               branch4_vs_branch1_time_ratio=t4 / t1)

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
            _sync(device)
            t0 = time.perf_counter()
            [res] = engine.generate([Request(p, max_new_tokens=n_new)])
            _sync(device)
            sd_s += time.perf_counter() - t0
            counters.add(res.counters)
            identical &= res.token_ids == ar.token_ids
        drafted = max(counters.drafted_tokens, 1)
        out.update({f"{label}_greedy_identical": identical, f"{label}_speedup": ours_s / sd_s,
                    f"{label}_acceptance_rate": counters.accepted_tokens / drafted,
                    f"{label}_mean_acceptance_length": 1 + counters.accepted_tokens / max(counters.forward_passes, 1),
                    f"{label}_num_tokens": spec.num_tokens})
    return out


SPEC_METHODS = ["ar", "sd", "lr_sync", "lr_async", "lr_async+sd", "fpsr", "fpsr+sd"]


def _within_20pct(summary: dict, key: str) -> bool:
    return abs(summary["speedup"] - summary[key]) <= 0.2 * summary[key]


def bench_spec(args) -> dict:
    from pipelines.config import EvaluateConfig, load_config
    from pipelines.evaluate import evaluate

    out: dict = {"methods": {}}
    for in_flight in (1, 4):
        cfg = load_config(EvaluateConfig, "evaluate", [
            args.preset, f"run.out_dir={args.run_dir}", f"run.name=bench-spec-{in_flight}",
            f"data.num_problems={args.num_problems}", f"data.offset={args.offset}",
            f"generation.max_new_tokens={args.max_new_tokens}", f"problems_in_flight={in_flight}",
            "methods=[" + ",".join(SPEC_METHODS) + "]"])
        run_dir, summary = evaluate(cfg)
        out[f"run_dir_{in_flight}"] = str(run_dir)
        for method, s in summary["methods"].items():
            row = out["methods"].setdefault(method, {})
            row[f"tokens_per_s_{in_flight}"] = s["tokens_per_s"]
            if in_flight == 1:
                row.update({k: s.get(k) for k in ("speedup", "step_accept_rate", "answer_agreement", "accuracy",
                                                  "predicted_speedup", "predicted_speedup_ideal",
                                                  "target_step_slowdown", "step_cost_ratio", "token_acceptance_rate",
                                                  "target_step_s", "draft_step_s", "verify_s", "commit_wait")})
                row["within_20pct_of_predicted"] = _within_20pct(s, "predicted_speedup")
                row["within_20pct_of_ideal"] = _within_20pct(s, "predicted_speedup_ideal")
            else:
                row["speedup_4_in_flight"] = s.get("speedup")
        out.update(target=summary["target"], draft=summary["draft"], verifier=summary["verifier"],
                   gamma=summary["gamma"], num_problems=summary["num_problems"])
    if args.theory_problems:  # the theory at a known accept rate: a random verifier accepts half the drafts
        cfg = load_config(EvaluateConfig, "evaluate", [
            args.preset, f"run.out_dir={args.run_dir}", "run.name=bench-spec-theory",
            f"data.num_problems={args.theory_problems}", f"data.offset={args.offset}",
            f"generation.max_new_tokens={args.max_new_tokens}", "problems_in_flight=1", "verifier.kind=random",
            "verifier.p=0.5", "methods=[ar,sd,lr_sync,lr_async,fpsr,lr_async+sd]"])
        run_dir, summary = evaluate(cfg)
        out["theory_check"] = {"verifier": "random(p=0.5)", "run_dir": str(run_dir), "methods": {
            method: {k: s.get(k) for k in ("speedup", "predicted_speedup", "predicted_speedup_ideal",
                                           "target_step_slowdown", "step_accept_rate", "step_cost_ratio",
                                           "accepted_steps_per_cycle")}
            | {"within_20pct_of_predicted": _within_20pct(s, "predicted_speedup")}
            for method, s in summary["methods"].items()}}
    m = out["methods"]
    out["fpsr_ge_lr_sync"] = m["fpsr"]["speedup"] >= m["lr_sync"]["speedup"]
    out["best_speedup"] = max((v["speedup"], k) for k, v in m.items())
    out["device"] = _device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return out


def bench_quant(args) -> dict:
    import copy

    from pipelines.config import QuantizeConfig, load_config
    from pipelines.quantize import routing_frequency, run as quantize_run
    from quant.apply import QuantSpec, fake_quantize
    from quant.base import quantize_hqq
    from quant.codequant import (CodeQuantSpec, add_activation_fake_quant, codequant, finetune_blocks, fold_norms,
                                 fuse_rotation)
    from quant.perplexity import perplexity
    from quant.targets import quant_targets

    base, tok = zoo.load_model(args.moe, device="cpu")
    ids = tok(pydoc_text(), return_tensors="pt").input_ids[0, -args.ppl_tokens:]
    out: dict = {"model": args.moe, "ppl_tokens": len(ids), "ppl_window": 512,
                 "note": "SmolLM2's weights were stored as Q4_1 (a 4-bit grid) before we built the MoE"}
    out["ppl_fp"] = perplexity(base, ids, 512)
    variants = {"rtn3_g64": QuantSpec("rtn", 3, 64), "hqq3_g64": QuantSpec("hqq", 3, 64),
                "milo3_g64": QuantSpec("milo", 3, 64, rank_dense=16, rank_expert=8, rounds=args.rounds),
                "rtn4_g128": QuantSpec("rtn", 4, 128, pad_groups=True), "kmeans4": QuantSpec("kmeans", 4, 0),
                # MiLo's other rank policies at about the uniform budget (mean expert rank ~8 either way)
                "milo3_g64_kurtosis": QuantSpec("milo", 3, 64, rank_policy="kurtosis", rank_max=64,
                                                rounds=args.rounds),
                "milo3_g64_frequency": QuantSpec("milo", 3, 64, rank_policy="frequency", rank_dense=16,
                                                 rank_expert=8, rounds=args.rounds,
                                                 routing_frequency=routing_frequency(base, tok, 2048))}
    for key, spec in variants.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        acc = fake_quantize(model, spec)
        out[f"ppl_{key}"] = perplexity(model, ids, 512)
        out[f"bpw_{key}"] = acc["bits_per_weight"]
        out[f"fake_quantize_s_{key}"] = time.perf_counter() - t0
        if spec.method == "milo":
            out[f"mean_rank_{key}"] = acc["mean_rank"]  # {"dense": ..., "expert": ...}
        print(key, out[f"ppl_{key}"], out[f"bpw_{key}"], flush=True)
        if key == "kmeans4":  # W4A4: the same codebooks with 4-bit per-token activations
            add_activation_fake_quant(model)
            out["ppl_kmeans4_a4"] = perplexity(model, ids, 512)
    calib = tok(pydoc_text(), return_tensors="pt").input_ids[0, :args.calib_tokens]
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    cq = codequant(model, calib, CodeQuantSpec(calib_tokens=args.calib_tokens))
    out["ppl_codequant4"] = perplexity(model, ids, 512)
    out["bpw_codequant4"] = sum(r.bits_per_weight() * r.shape[0] * r.shape[1] for r in cq["results"].values()) / sum(
        r.shape[0] * r.shape[1] for r in cq["results"].values())
    out["codequant_rotation_act4_error_before_after"] = [cq["rotation_loss_first"], cq["rotation_loss_last"]]
    out["fake_quantize_s_codequant4"] = time.perf_counter() - t0
    add_activation_fake_quant(model)
    out["ppl_codequant4_a4"] = perplexity(model, ids, 512)
    if args.block_steps:  # the block-level stage on the same rotation and codebooks (CodeQuant's full recipe)
        model = copy.deepcopy(base)
        fold_norms(model)
        fuse_rotation(model, cq["rotation"])
        t0 = time.perf_counter()
        results = dict(cq["results"])
        stats = finetune_blocks(model, calib, results, args.block_steps, CodeQuantSpec.finetune_lr,
                                CodeQuantSpec.router_kl_weight)
        out["ppl_codequant4_block"] = perplexity(model, ids, 512)
        out["block_finetune_s"] = time.perf_counter() - t0
        out["block_steps"] = args.block_steps
        out["block_mse_before_after_mean"] = [sum(v[k] for v in stats.values()) / len(stats)
                                              for k in ("mse_before", "mse_after")]
        out["block_kl_before_after_mean"] = [sum(v[k] for v in stats.values()) / len(stats)
                                             for k in ("kl_before", "kl_after")]
        print("codequant4 + block", out["ppl_codequant4_block"], flush=True)
    increase = lambda k: out[f"ppl_{k}"] - out["ppl_fp"]  # noqa: E731
    out["milo_vs_hqq_ppl_increase_ratio"] = increase("milo3_g64") / increase("hqq3_g64")
    out["milo_extra_bpw"] = out["bpw_milo3_g64"] - out["bpw_hqq3_g64"]
    try:
        from hqq.core.quantize import Quantizer

        ours = pkg = 0.0
        for t in quant_targets(base):
            w = t.get().float()
            q, meta = Quantizer.quantize(w, nbits=3, channel_wise=True, group_size=64, optimize=True,
                                         round_zero=False, axis=1, bitpack=False, compute_dtype=torch.float32,
                                         device="cpu")
            pkg += (w - Quantizer.dequantize(q, meta).float().reshape(w.shape)).pow(2).sum().item()
            ours += (w - quantize_hqq(w, 3, 64).dequantize()).pow(2).sum().item()
        out["hqq_ours_vs_package_error_ratio"] = ours / pkg
    except ImportError:
        out["hqq_ours_vs_package_error_ratio"] = None  # pip install hqq to measure it
    for workers in (1, 2):
        cfg = load_config(QuantizeConfig, "quantize", [
            "demo", f"run.out_dir={args.run_dir}", f"run.name=bench-quant-{workers}w", f"num_workers={workers}",
            f"rounds={args.rounds}", "ppl_tokens=0", f"model.name={args.moe}"])
        _, summary = quantize_run(cfg)
        out[f"quantize_s_{workers}_worker" + ("s" if workers > 1 else "")] = summary["quantize_s"]
    import ray

    ray.shutdown()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["engine", "spec", "quant", "sapo", "kernels"])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--model", default=zoo.SMOLLM2)
    parser.add_argument("--draft", default="smollm2-135m-draft-l6")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="engine, spec: 96; sapo: 128")
    parser.add_argument("--committed-tokens", type=int, default=320)
    parser.add_argument("--branch-tokens", type=int, default=24)
    parser.add_argument("--answer-tokens", type=int, default=1000)
    parser.add_argument("--num-spec-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--num-problems", type=int, default=None, help="spec, sapo: held-out problems (20, 12)")
    parser.add_argument("--offset", type=int, default=100, help="spec, sapo: first held-out problem index")
    parser.add_argument("--preset", default="demo", help="spec: evaluate preset")
    parser.add_argument("--theory-problems", type=int, default=8,
                        help="spec: problems for the theory check with a random(0.5) verifier (0: skip)")
    parser.add_argument("--run-dir", default="runs", help="spec, quant: where the job runs go")
    parser.add_argument("--moe", default="smollm2-moe-8x", help="quant: the MoE to quantize")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="quant: pydoc tokens for perplexity")
    parser.add_argument("--rounds", type=int, default=5, help="quant: MiLo alternations")
    parser.add_argument("--calib-tokens", type=int, default=512, help="quant: CodeQuant calibration tokens")
    parser.add_argument("--block-steps", type=int, default=5,
                        help="quant: CodeQuant block-level fine-tuning steps per layer (0: skip ppl_codequant4_block)")
    parser.add_argument("--train-problems", type=int, default=128, help="sapo: training problems to collect")
    parser.add_argument("--train-offset", type=int, default=1000, help="sapo: first training problem index")
    parser.add_argument("--trajectories", default=None, help="sapo: reuse this trajectories.jsonl (no collect)")
    parser.add_argument("--collect-preset", default="sapo-train", help="sapo: collect preset for training data")
    parser.add_argument("--sapo-preset", default="bench", help="sapo: the SAPO recipe (conf/sapo/)")
    parser.add_argument("--sapo-run", default=None,
                        help="sapo: reuse this finished SAPO run of the recipe (no collect, no training)")
    parser.add_argument("--verifier", default="embedding", help="sapo: the step verifier before and after")
    parser.add_argument("--threshold", type=float, default=0.9, help="sapo: embedding cosine threshold")
    parser.add_argument("--step-max-tokens", type=int, default=100, help="sapo: cap on one reasoning step")
    parser.add_argument("--throughput-steps", type=int, default=2, help="sapo: GRPO steps per throughput run")
    parser.add_argument("--reps", type=int, default=20, help="kernels: timed calls per figure (median)")
    parser.add_argument("--skip-moe", action="store_true", help="kernels: skip the MoE decode comparison")
    parser.add_argument("--skip-cpu", action="store_true",
                        help="kernels: only the gpu figures (needs CUDA; builds no CPU extension)")
    parser.add_argument("--milo-checkpoint", default=None, help="kernels: a MiLo checkpoint of --moe (else made)")
    parser.add_argument("--codequant-checkpoint", default=None, help="kernels: a CodeQuant one (else made)")
    args = parser.parse_args(argv)
    if args.num_problems is None:
        args.num_problems = 20 if args.suite == "spec" else 12
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.suite == "sapo" else 96
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    bench = {"engine": bench_engine, "spec": bench_spec, "quant": bench_quant, "sapo": bench_sapo,
             "kernels": bench_kernels}[args.suite]
    result = {"suite": args.suite, **bench(args), "wall_s": None}
    result["wall_s"] = time.perf_counter() - t0
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
