"""`make demo`: build the demo models, collect trajectories on the local Ray instance, write a short report.

    python -m pipelines.demo             # demo preset (this machine, a few minutes)
    python -m pipelines.demo tiny        # random tiny models, seconds

1. builds SmolLM2-135M-Instruct (from its packaged GGUF), the early-exit draft and the demo MoE made from
   SmolLM2's weights, and reports the MoE's perplexity beside the dense model's on Python's pydoc text;
2. runs `pipelines.collect` (the target's step-by-step answers on GSM-style problems) on a local Ray instance;
3. quantizes the MoE with `pipelines.quantize` (MiLo 3-bit, CodeQuant 4-bit) and tabulates bits and perplexity;
4. runs `pipelines.evaluate`: ar, sd, lr_async, lr_async+sd and fpsr side by side on the same actors;
5. writes <run_dir>/report.md with tables and plots, and prints where it is.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from actors import zoo
from pipelines import collect
from pipelines.config import DemoConfig, run_cli
from pipelines.evaluate import evaluate
from pipelines.report import method_table
from pipelines.runs import make_run_dir, read_jsonl, save_config, write_json
from pipelines.tracking import Tracker
from quant.perplexity import perplexity, pydoc_text


def moe_vs_dense(cfg: DemoConfig) -> dict:
    """Perplexity of the dense target and of the MoE built from it, on the last pydoc tokens."""
    dense_name = cfg.collect.target.model.name
    out = {}
    for role, name in (("dense", dense_name), ("moe", cfg.moe_model)):
        t0 = time.perf_counter()
        model, tok = zoo.load_model(name, device="cpu")
        ids = tok(pydoc_text(), return_tensors="pt").input_ids[0, -cfg.moe_ppl_tokens:]
        out[role] = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                     "ppl": perplexity(model, ids, window=512), "load_and_eval_s": time.perf_counter() - t0}
        if role == "moe":
            c = model.config
            out[role]["experts"] = f"{c.num_experts_per_tok} of {c.num_local_experts}"
        del model
    out["ppl_tokens"] = cfg.moe_ppl_tokens
    return out


def plot(run_dir: Path, rows: list[dict], models: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [models["dense"]["model"], models["moe"]["model"]]
    ax1.bar(names, [models["dense"]["ppl"], models["moe"]["ppl"]], color=["#4c72b0", "#dd8452"])
    ax1.set_ylabel(f"perplexity (pydoc, {models['ppl_tokens']} tokens)")
    ax1.set_title("dense target vs MoE built from it")
    lengths = [len(t) for r in rows for t in r["step_token_ids"]]
    ax2.hist(lengths, bins=20, color="#55a868")
    ax2.set_xlabel("tokens per step")
    ax2.set_ylabel("steps")
    ax2.set_title(f"step lengths of {len(rows)} collected answers")
    fig.tight_layout()
    path = run_dir / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quantize_moe(cfg: DemoConfig, run_dir: Path) -> list[dict]:
    """Each quantize run on the demo MoE; its checkpoint, bits per weight and perplexity beside the source's."""
    from pipelines.config import QuantizeConfig, load_config
    from pipelines.quantize import run as quantize

    out = []
    for overrides in cfg.quantize:
        qcfg = load_config(QuantizeConfig, "quantize", [
            "demo", f"model.name={cfg.moe_model}", f"run.out_dir={run_dir / 'quantize'}",
            f"ppl_tokens={cfg.moe_ppl_tokens}", f"wandb.group={run_dir.name}"] + overrides.split())
        qcfg.run.name = f"quantize-{qcfg.method}"
        _, s = quantize(qcfg)
        out.append({"run": overrides, "method": s["method"], "bits_per_weight": s["bits_per_weight"],
                    "ppl": s.get("ppl_quantized"), "ppl_source": s.get("ppl_source"), "checkpoint": s["checkpoint"],
                    "quantize_s": s["quantize_s"]})
    return out


def report(run_dir: Path, models: dict, summary: dict, rows: list[dict], collect_dir: Path, evaluation: dict,
           quantized: list[dict]) -> Path:
    d, m = models["dense"], models["moe"]
    lines = [
        "# SpecMoE demo", "",
        "## Models", "",
        "| role | model | params (M) | perplexity |", "|---|---|---|---|",
        f"| dense target | {d['model']} | {d['params_M']:.1f} | {d['ppl']:.2f} |",
        f"| MoE target ({m.get('experts', '')} experts) | {m['model']} | {m['params_M']:.1f} | {m['ppl']:.2f} |",
        "", f"Perplexity on the last {models['ppl_tokens']} tokens of Python's pydoc text (512-token windows).",
        "", "## Collected trajectories", "",
        f"{summary['num_problems']} problems, accuracy {summary['accuracy']}, {summary['mean_steps']:.1f} steps "
        f"and {summary['mean_tokens']:.0f} tokens per answer, {summary['tokens_per_s']:.1f} tokens/s, "
        f"prefill tokens / (prompt + answer) = {summary['prefill_tokens_ratio']:.3f}.", "",
        "| problem | gold | predicted | correct | steps | tokens |", "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['id']} | {r['answer']} | {r['predicted']} | {r['correct']} | {len(r['steps'])} | "
                     f"{r['num_tokens']} |")
    first = rows[0]
    lines += ["", f"First answer, step by step (`{first['id']}`):", ""]
    lines += [f"{i + 1}. {json.dumps(s)}" for i, s in enumerate(first["steps"][:12])]
    lines += ["", "![demo](demo.png)", "", f"Trajectories: `{collect_dir / 'trajectories.jsonl'}`", "",
              "## The MoE, quantized", "", "| method | bits per weight | perplexity | checkpoint |", "|---|---|---|---|",
              f"| fp32 | 32 | {models['moe']['ppl']:.2f} | |"]
    lines += [f"| {q['method']} | {q['bits_per_weight']:.2f} | {q['ppl']:.2f} | `{q['checkpoint']}` |"
              for q in quantized]
    lines += ["", "Bits count codes, scales, zeros, codebooks and compensators. Serve a checkpoint with "
              "`python -m pipelines.evaluate target.model.name=<checkpoint>`.", "",
              f"## Speculative methods ({evaluation['num_problems']} problems, verifier `{evaluation['verifier']}`, "
              f"gamma {evaluation['gamma']})", "",
              "The draft is not aligned with the target yet (SAPO trains it), so step acceptance is low; speedups "
              "are measured against `ar` on the same actors and cores.", ""]
    lines += method_table(evaluation["methods"])
    lines += ["", "![speedup](evaluate/speedup_and_accept_rate.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(cfg: DemoConfig) -> Path:
    t0 = time.perf_counter()
    run_dir = make_run_dir(cfg, "demo")
    resolved = save_config(cfg, run_dir, "demo")
    torch.manual_seed(0)
    print("[1/5] building the demo models and measuring the MoE against the dense target")
    models = moe_vs_dense(cfg)
    print(f"      dense ppl {models['dense']['ppl']:.2f}, MoE ppl {models['moe']['ppl']:.2f}")
    print("[2/5] collecting step-by-step answers on a local Ray instance")
    collect_dir = run_dir / "collect"
    collect_dir.mkdir(exist_ok=True)
    collect_cfg = replace(cfg.collect, wandb=replace(cfg.collect.wandb, group=run_dir.name))
    collect.run(collect_cfg, collect_dir)
    rows = read_jsonl(collect_dir / "trajectories.jsonl")
    summary = json.loads((collect_dir / "summary.json").read_text())
    print("[3/5] quantizing the MoE")
    quantized = quantize_moe(cfg, run_dir)
    print("[4/5] evaluating ar, sd and the step-level methods side by side")
    eval_dir = run_dir / "evaluate"
    eval_dir.mkdir(exist_ok=True)
    _, evaluation = evaluate(replace(cfg.evaluate, wandb=replace(cfg.evaluate.wandb, group=run_dir.name)), eval_dir)
    print("[5/5] writing the report")
    figure = plot(run_dir, rows, models)
    path = report(run_dir, models, summary, rows, collect_dir, evaluation, quantized)
    write_json(run_dir / "summary.json", {"models": models, "collect": summary, "evaluate": evaluation,
                                          "quantize": quantized, "wall_s": time.perf_counter() - t0})
    tracker = Tracker(cfg.collect.wandb, run_dir, "demo", resolved)
    tracker.summary({"ppl_dense": models["dense"]["ppl"], "ppl_moe": models["moe"]["ppl"],
                     "accuracy": summary["accuracy"], "tokens_per_s": summary["tokens_per_s"]})
    tracker.image("demo", figure)
    tracker.finish()
    print(path.read_text())
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {path}")
    return run_dir


def main(argv: list[str] | None = None) -> None:
    run_cli("demo", run, argv)


if __name__ == "__main__":
    main()
