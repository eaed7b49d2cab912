"""`make demo`: build the demo models, collect trajectories on the local Ray instance, write a short report.

    python -m pipelines.demo             # demo preset (this machine, a few minutes)
    python -m pipelines.demo tiny        # random tiny models, seconds

1. builds SmolLM2-135M-Instruct (from its packaged GGUF), the early-exit draft and the demo MoE made from
   SmolLM2's weights, and reports the MoE's perplexity beside the dense model's on Python's pydoc text;
2. runs `pipelines.collect` (the target's step-by-step answers on GSM-style problems) on a local Ray instance;
3. quantizes the MoE with `pipelines.quantize` (MiLo 3-bit, CodeQuant 4-bit) and tabulates bits and perplexity;
4. trains the draft with `pipelines.sapo` on the collected trajectories (warm start SFT + a short GRPO run);
5. runs `pipelines.evaluate`: ar, sd, lr_async, lr_async+sd and fpsr side by side on the same actors with the
   unaligned draft, then `sapo_methods` (lr_async+sd) again with the SAPO draft on the same held-out problems;
6. writes <run_dir>/report.md with tables and plots, and prints where it is.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from actors import storage, zoo
from pipelines import collect
from pipelines.cli import run_cli
from pipelines.schema import DemoConfig
from pipelines.evaluate import evaluate
from pipelines.report import method_table
from pipelines.runs import RunDir, make_run_dir, read_jsonl, save_config, write_json
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


def plot(run_dir: Path, rows: list[dict], models: dict, quantized: list[dict], evaluation: dict,
         aligned: list[dict] | None = None) -> Path:
    """demo.png: perplexity of the dense target, the MoE and each quantized MoE; the collected step lengths; each
    method's speedup and step accept rate (and the SAPO draft's beside the unaligned one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1.2, 1, 1.3]})
    labels = ["dense\n32 bits", "MoE\n32 bits"] + [f"{q['method']}\n{q['bits_per_weight']:.2f} bits"
                                                     for q in quantized]
    values = [models["dense"]["ppl"], models["moe"]["ppl"]] + [q["ppl"] for q in quantized]
    colors = ["#4c72b0", "#dd8452"] + ["#c44e52" if "baseline" in q["method"] else "#55a868" for q in quantized]
    ax1.bar(range(len(values)), values, color=colors)
    ax1.set_xticks(range(len(values)), labels, fontsize=7.5)
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for i, v in enumerate(values):
        ax1.text(i, v * 1.05, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel(f"perplexity (pydoc, {models['ppl_tokens']} tokens, log)")
    ax1.set_title("dense target, the MoE built from it, quantized MoEs", fontsize=10)
    lengths = [len(t) for r in rows for t in r["step_token_ids"]]
    ax2.hist(lengths, bins=20, color="#55a868")
    ax2.set_xlabel("tokens per step")
    ax2.set_ylabel("steps")
    ax2.set_title(f"step lengths of {len(rows)} collected answers", fontsize=10)
    bars = [(m, "unaligned", s) for m, s in evaluation["methods"].items() if m != "ar"]
    bars += [(a["method"], "SAPO", a) for a in (aligned or []) if a["draft"] == "SAPO"]
    x = range(len(bars))
    ax3.bar([i - 0.2 for i in x], [b[2]["step_accept_rate"] for b in bars], 0.4, label="step accept rate",
            color="#55a868")
    ax3.bar([i + 0.2 for i in x], [b[2].get("speedup") or 0.0 for b in bars], 0.4, label="speedup vs ar",
            color="#4c72b0")
    ax3.axhline(1.0, color="gray", lw=0.8)
    ax3.set_xticks(list(x), [f"{m}\n{d} draft" if m.split("+")[0] != "sd" else m for m, d, _ in bars], fontsize=7.5)
    ax3.set_title(f"methods on {evaluation['num_problems']} held-out problems, same actors", fontsize=10)
    ax3.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def quantize_configs(cfg: DemoConfig, run_location: str) -> list:
    """The quantize runs' configs (`cfg.quantize`: overrides of the quantize demo preset, one string per run)."""
    from pipelines.config import load_config
    from pipelines.schema import QuantizeConfig

    out = []
    for overrides in cfg.quantize:
        qcfg = load_config(QuantizeConfig, "quantize", [
            "demo", f"model.name={cfg.moe_model}", f"run.storage={storage.join(run_location, 'quantize')}",
            f"ppl_tokens={cfg.moe_ppl_tokens}", f"wandb.group={os.path.basename(run_location)}"] + overrides.split())
        qcfg.run.name = f"quantize-{qcfg.method}"
        out.append(qcfg)
    return out


def sapo_config(cfg: DemoConfig, run_location: str, trajectories: str):
    """The SAPO stage's config: `cfg.sapo` (a sapo preset and overrides) on the collected trajectories."""
    from pipelines.config import load_config
    from pipelines.schema import SapoConfig

    preset, *overrides = cfg.sapo.split()
    return load_config(SapoConfig, "sapo", [preset, f"trajectories={trajectories}", f"run.storage={run_location}",
                                            f"wandb.group={os.path.basename(run_location)}"] + overrides)


def preflight(cfg: DemoConfig) -> None:
    """Every stage's checks that need no model loaded, before the demo's run directory exists."""
    from pipelines.evaluate import preflight as evaluate_preflight
    from pipelines.quantize import spec_of

    collect.preflight(cfg.collect)
    evaluate_preflight(cfg.evaluate)
    zoo.check_model(cfg.moe_model)
    for qcfg in quantize_configs(cfg, cfg.run.storage):
        spec_of(qcfg).check()
    if cfg.sapo:
        zoo.check_model(sapo_config(cfg, cfg.run.storage, "trajectories.jsonl").draft.name)


def quantize_moe(cfg: DemoConfig, run_dir: RunDir) -> list[dict]:
    """Each quantize run on the demo MoE; its checkpoint, bits per weight and perplexity beside the source's."""
    from pipelines.quantize import run as quantize

    out = []
    for overrides, qcfg in zip(cfg.quantize, quantize_configs(cfg, run_dir.location)):
        _, s = quantize(qcfg)
        for method in qcfg.compare:  # baselines at the same bits, measured by that run (comparison.md)
            out.append({"run": overrides, "method": f"{method} (baseline)", "bits_per_weight": s[f"compare/{method}/bpw"],
                        "ppl": s[f"compare/{method}/ppl"], "ppl_source": s.get("ppl_source"), "checkpoint": "-",
                        "quantize_s": 0.0})
        out.append({"run": overrides, "method": s["method"], "bits_per_weight": s["bits_per_weight"],
                    "ppl": s.get("ppl_quantized"), "ppl_source": s.get("ppl_source"), "checkpoint": s["checkpoint"],
                    "quantize_s": s["quantize_s"]})
    return out


def train_draft(cfg: DemoConfig, run_dir: RunDir, trajectories: str) -> tuple[str, dict]:
    """The SAPO stage: `cfg.sapo` (a sapo preset and overrides) trained on the collected trajectories."""
    from pipelines import sapo

    draft_dir, summary = sapo.run(sapo_config(cfg, run_dir.location, trajectories))
    return str(draft_dir), summary


def draft_comparison(evaluation: dict, aligned_eval: dict, methods: list[str]) -> list[dict]:
    """Each of `methods` with the unaligned draft (the main evaluation) and with the SAPO draft."""
    out = []
    for label, ev in (("unaligned", evaluation), ("SAPO", aligned_eval)):
        for m in methods:
            s = ev["methods"].get(m)
            if s is not None:
                out.append({"draft": label, "model": ev["draft"], "method": m, "speedup": s.get("speedup", 0.0),
                            "step_accept_rate": s["step_accept_rate"], "accuracy": s["accuracy"],
                            "answer_agreement": s["answer_agreement"], "tokens_per_s": s["tokens_per_s"]})
    return out


def report(run_dir: Path, models: dict, summary: dict, rows: list[dict], collect_location: str, evaluation: dict,
           quantized: list[dict], sapo: dict | None = None, aligned: list[dict] | None = None) -> Path:
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
    for r in rows[:SHOWN]:
        lines.append(f"| {r['id']} | {r['answer']} | {r['predicted']} | {r['correct']} | {len(r['steps'])} | "
                     f"{r['num_tokens']} |")
    if len(rows) > SHOWN:
        lines.append(f"| ... {len(rows) - SHOWN} more in `collect/trajectories.jsonl` | | | | | |")
    first = rows[0]
    lines += ["", f"First answer, step by step (`{first['id']}`):", ""]
    lines += [f"{i + 1}. {json.dumps(s)}" for i, s in enumerate(first["steps"][:12])]
    lines += ["", "![demo](demo.png)", "", f"Trajectories: `{storage.join(collect_location, 'trajectories.jsonl')}`", "",
              "## The MoE, quantized", "", "| method | bits per weight | perplexity | delta vs fp | checkpoint |",
              "|---|---|---|---|---|", f"| fp32 | 32 | {models['moe']['ppl']:.2f} | +0.00 | |"]
    lines += [f"| {q['method']} | {q['bits_per_weight']:.2f} | {q['ppl']:.2f} | {q['ppl'] - models['moe']['ppl']:+.2f} "
              f"| `{q['checkpoint']}` |" for q in quantized]
    lines += ["", "Bits count codes, scales, zeros, codebooks and compensators. Serve a checkpoint with "
              "`python -m pipelines.evaluate target.model.name=<checkpoint>`.", "",
              f"## Speculative methods ({evaluation['num_problems']} problems, verifier `{evaluation['verifier']}`, "
              f"gamma {evaluation['gamma']})", "",
              f"With the unaligned draft `{evaluation['draft']}` (its steps are rarely what the target would write, so "
              "step acceptance is low); speedups are measured against `ar` on the same actors and cores.", ""]
    lines += method_table(evaluation["methods"])
    lines += ["", "![speedup](evaluate/speedup_and_accept_rate.png)", ""]
    if sapo is not None and aligned:
        rewards = sapo.get("rewards") or {}
        last = {k: (v[-1] if v else None) for k, v in rewards.items()}
        lines += ["## SAPO: the aligned draft", "",
                  f"`pipelines.sapo` trained the draft on the {sapo.get('trajectories')} collected trajectories: warm "
                  f"start (SFT on the target's answers, loss {_num(sapo.get('warm_start_loss'))}), then "
                  f"{sapo.get('grpo_steps')} GRPO steps on SAPO's rewards (last step: "
                  + ", ".join(f"{k} {_num(v)}" for k, v in last.items()) + f"). Draft: `{sapo.get('draft')}`.", "",
                  "The same held-out problems, verifier and actors' settings, with each draft:", "",
                  "| draft | method | step accept | speedup vs ar | tokens/s | accuracy | agreement with ar |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {a['draft']} | {a['method']} | {a['step_accept_rate']:.2f} | {a['speedup']:.2f} | "
                  f"{a['tokens_per_s']:.1f} | {_num(a['accuracy'])} | {_num(a['answer_agreement'])} |" for a in aligned]
        lines += ["", "Details: `evaluate-sapo/report.md`.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


SHOWN = 8  # collected answers listed in the report


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def run(cfg: DemoConfig) -> RunDir:
    t0 = time.perf_counter()
    preflight(cfg)
    run_dir = make_run_dir(cfg, "demo")
    resolved = save_config(cfg, run_dir, "demo")
    torch.manual_seed(0)
    stages: dict[str, float] = {}  # wall seconds per stage, in summary.json

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = round(now - since, 1)
        return now

    t = t0
    print("[1/6] building the demo models and measuring the MoE against the dense target")
    models = moe_vs_dense(cfg)
    print(f"      dense ppl {models['dense']['ppl']:.2f}, MoE ppl {models['moe']['ppl']:.2f}")
    t = lap("models_s", t)
    print("[2/6] collecting step-by-step answers on a local Ray instance")
    collect_dir = run_dir.child("collect")
    collect_cfg = replace(cfg.collect, wandb=replace(cfg.collect.wandb, group=run_dir.name))
    collect.run(collect_cfg, collect_dir)
    rows = read_jsonl(collect_dir / "trajectories.jsonl")
    summary = json.loads((collect_dir / "summary.json").read_text())
    t = lap("collect_s", t)
    print("[3/6] quantizing the MoE")
    quantized = quantize_moe(cfg, run_dir)
    t = lap("quantize_s", t)
    sapo_summary = draft_dir = None
    if cfg.sapo:
        print("[4/6] training the draft with SAPO (warm start + GRPO) on the collected trajectories")
        t1 = time.perf_counter()
        trajectories = storage.join(collect_dir.location, "trajectories.jsonl")
        draft_dir, sapo_summary = train_draft(cfg, run_dir, trajectories)
        sapo_summary["wall_s"] = time.perf_counter() - t1
        t = lap("sapo_s", t)
    print("[5/6] evaluating ar, sd and the step-level methods side by side (unaligned draft, then the SAPO draft)")
    eval_cfg = replace(cfg.evaluate, wandb=replace(cfg.evaluate.wandb, group=run_dir.name))
    _, evaluation = evaluate(eval_cfg, run_dir.child("evaluate"))
    t = lap("evaluate_s", t)
    aligned = aligned_eval = None
    if draft_dir:
        _, aligned_eval = evaluate(replace(eval_cfg, methods=list(cfg.sapo_methods), draft=replace(
            eval_cfg.draft, model=replace(eval_cfg.draft.model, name=draft_dir))), run_dir.child("evaluate-sapo"))
        aligned = draft_comparison(evaluation, aligned_eval, list(cfg.sapo_methods))
        t = lap("evaluate_sapo_s", t)
    print("[6/6] writing the report")
    figure = plot(run_dir.path, rows, models, quantized, evaluation, aligned)
    path = report(run_dir.path, models, summary, rows, collect_dir.location, evaluation, quantized, sapo_summary,
                  aligned)
    write_json(run_dir / "summary.json", {"models": models, "collect": summary, "evaluate": evaluation,
                                          "quantize": quantized, "sapo": sapo_summary,
                                          "evaluate_sapo": aligned_eval, "draft_comparison": aligned,
                                          "stage_wall_s": stages, "wall_s": time.perf_counter() - t0})
    tracker = Tracker(cfg.collect.wandb, run_dir.path, "demo", resolved)
    tracker.summary({"ppl_dense": models["dense"]["ppl"], "ppl_moe": models["moe"]["ppl"],
                     "accuracy": summary["accuracy"], "tokens_per_s": summary["tokens_per_s"]})
    tracker.image("demo", figure)
    tracker.finish()
    run_dir.sync()
    print(path.read_text())
    print(f"demo finished in {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in stages.items()) + "); report: "
          + storage.join(run_dir.location, "report.md"))
    return run_dir


def main(argv: list[str] | None = None) -> None:
    run_cli("demo", run, argv)


if __name__ == "__main__":
    main()
