"""Benchmarks: scripts that measure side by side in one run and write JSON (never timed tests).

    python -m pipelines.bench engine --out bench-engine.json [--backend vllm]
    python -m pipelines.bench spec --out bench-spec.json [--num-problems 20] [--max-new-tokens 96] [--scripted-only]
    python -m pipelines.bench quant --out bench-quant.json
    python -m pipelines.bench sapo --out bench-sapo.json [--num-problems 12] [--train-problems 128]
    python -m pipelines.bench kernels --out bench-kernels.json [--skip-moe] [--milo-checkpoint DIR]
    python -m pipelines.bench cluster --out bench-cluster.json [--cluster-layers 2] [--cluster-experts 96]
    python -m pipelines.bench.agreement HELD_OUT/trajectories.jsonl DRAFT [DRAFT ...] --out FILE.json

One module per suite (`pipelines.bench.<module>`, its docstring lists the keys it writes, `KEYS` names them): engine
(our engine vs transformers, token-level SD), spec (every speculative method side by side), quant (perplexity and
bits per weight of every quantization method), sapo (the draft before and after SAPO), kernels (the quantized
matmul kernels vs dense), cluster (the quantize job on a multi-node Ray: driver and task memory, spreading,
a node lost mid-run). Every JSON also records `suite`, `machine` (CPU model and vector extensions, cores, GPU)
and `wall_s`. docs/results/ has one page per suite with its numbers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import torch

from actors import zoo
from pipelines.bench.common import machine

SUITES = {"engine": "engine", "spec": "spec", "quant": "quant", "sapo": "sapo", "kernels": "kernels", "cluster": "cluster"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=list(SUITES))
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
    parser.add_argument("--backend", choices=["native", "vllm"], default="native",
                        help="engine: vllm measures vLLM's engine beside ours (needs `make venv-vllm`)")
    parser.add_argument("--engine-runs", type=int, default=3, help="engine: runs of each headline figure "
                        "(the JSON keeps every run and the median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--num-problems", type=int, default=None, help="spec, sapo: held-out problems (20, 12)")
    parser.add_argument("--offset", type=int, default=100, help="spec, sapo: first held-out problem index")
    parser.add_argument("--preset", default="demo", help="spec: evaluate preset")
    parser.add_argument("--theory-problems", type=int, default=8,
                        help="spec: problems for the theory check with a random(0.5) verifier (0: skip)")
    parser.add_argument("--scripted-steps", type=int, default=120,
                        help="spec: committed steps of each scripted-host run (fewer: faster, noisier)")
    parser.add_argument("--scripted-only", action="store_true",
                        help="spec: only the scripted-host checks of the controllers against the theory (no model)")
    parser.add_argument("--run-dir", default="runs", help="spec, quant: where the job runs go")
    parser.add_argument("--moe", default="smollm2-moe-8x", help="quant: the MoE to quantize")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="quant: pydoc tokens for perplexity")
    parser.add_argument("--rounds", type=int, default=10, help="quant: MiLo alternations (the paper: 10-20)")
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
    parser.add_argument("--throughput-steps", type=int, default=2, help="sapo: GRPO steps per throughput run (0: skip it)")
    parser.add_argument("--reps", type=int, default=20, help="kernels: timed calls per figure (median)")
    parser.add_argument("--skip-moe", action="store_true", help="kernels: skip the MoE decode comparison")
    parser.add_argument("--kernel-runs", type=int, default=3,
                        help="kernels: runs of each headline figure (the JSON keeps the median and every run)")
    parser.add_argument("--skip-cpu", action="store_true",
                        help="kernels: only the gpu figures (needs CUDA; builds no CPU extension)")
    parser.add_argument("--milo-checkpoint", default=None, help="kernels: a MiLo checkpoint of --moe (else made)")
    parser.add_argument("--codequant-checkpoint", default=None, help="kernels: a CodeQuant one (else made)")
    parser.add_argument("--cluster-layers", type=int, default=2, help="cluster: decoder layers of the synthetic MoE "
                        "(2 with 96 experts: 3.1 GB of bf16 shards)")
    parser.add_argument("--cluster-experts", type=int, default=96, help="cluster: experts per layer (Qwen3-30B-A3B "
                        "has 128; fewer for a quick check)")
    parser.add_argument("--cluster-runs", type=int, default=3, help="cluster: 1-node / 3-node quantize pairs "
                        "(interleaved; the headline ratio is their median)")
    parser.add_argument("--cluster-dir", default=None, help="cluster: where the synthetic model and runs go (kept; "
                        "default a new temporary directory)")
    args = parser.parse_args(argv)
    if args.num_problems is None:
        args.num_problems = 20 if args.suite == "spec" else 12
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.suite == "sapo" else 96
    torch.set_num_threads(args.threads or os.cpu_count())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    suite = importlib.import_module(f"pipelines.bench.{SUITES[args.suite]}")
    result = {"suite": args.suite, **suite.run(args), "machine": machine(), "wall_s": None}
    result["wall_s"] = time.perf_counter() - t0
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")
